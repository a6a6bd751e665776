"""The exported LoRA: kohya keys and true alpha, metadata, hashes, never-clobber, and interop with diffusers.

The reference for every interop check is a peft-injected copy of the tiny model loaded from the same
folder the pipeline loads (``tiny_model_path()``), with random lora_B so the LoRA is not zero.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import save

from lora_trainer.config import config_from_dict
from lora_trainer.export.diffusers_format import WEIGHT_NAME, save_diffusers_lora
from lora_trainer.export.hashes import file_hashes, legacy_hash, model_hash
from lora_trainer.export.kohya import clip_text_model_path, peft_to_kohya, read_kohya_lora, save_kohya_lora
from lora_trainer.export.metadata import ModelFacts, RunFacts, build_metadata
from lora_trainer.models.tiny import tiny_model_path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["proj_in", "conv1"]  # 1x1 and 3x3 convolutions in the tiny UNet
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model_path(), subfolder="unet").eval()


def tiny_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(tiny_model_path(), subfolder="text_encoder").eval()


def with_lora(model, rank, alpha, targets, seed=0):
    """Inject peft LoRA layers into ``model`` and give lora_B random values (peft starts it at zero)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def peft_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def kohya_tensors(alpha, unet=None, te=None) -> dict:
    tensors = peft_to_kohya(peft_state(unet), "lora_unet_", alpha) if unet is not None else {}
    if te is not None:
        tensors.update(peft_to_kohya(peft_state(te), "lora_te_", alpha))
    return tensors


def unet_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    latents, cond = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    return latents, torch.tensor([10, 700]), cond


def token_ids(seed=1):
    return torch.randint(0, 512, (2, 77), generator=torch.Generator().manual_seed(seed))


def metadata(base_model_version="sd_v1", prediction_type="epsilon", clip_skip=None, extra=None, rank=4, alpha=2.0,
             comment="hello", **config):
    cfg = config_from_dict({
        "train_data_dir": "data", "output_name": "x", "lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "resolution": 64, "learning_rate": 1e-4, "seed": 1, "batch_size": 1, "gradient_accumulation_steps": 1,
        "lr_scheduler": "constant", "optimizer": "adamw", "mixed_precision": "no", "noise_offset": 0.0,
        "min_snr_gamma": None, "training_comment": comment, "target_modules": UNET_TARGETS, **config})
    run = RunFacts(steps=10, max_train_steps=10, epoch=1, num_epochs=1, num_train_images=3,
                   tag_frequency={"data": {"demo style": 3, "café": 1}}, trained_text_encoder=False,
                   started_at=1700000000.5, finished_at=1700000100.25)
    return build_metadata(cfg, ModelFacts(base_model_version, prediction_type, "tiny-demo", clip_skip), run, extra)


# --- keys, shapes, alpha -------------------------------------------------------------------------------

def test_unet_keys_shapes_and_true_alpha():
    unet = with_lora(tiny_unet(), 4, 8, UNET_TARGETS + CONV_TARGETS)
    tensors = peft_to_kohya(peft_state(unet), "lora_unet_", 8)
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    inner = unet.config.block_out_channels[0]
    assert tensors[f"{block}_attn1_to_q.lora_down.weight"].shape == (4, inner)
    assert tensors[f"{block}_attn1_to_q.lora_up.weight"].shape == (inner, 4)
    assert f"{block}_attn2_to_out_0.lora_up.weight" in tensors
    alpha = tensors[f"{block}_attn1_to_q.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 8.0  # lora_alpha, not rank
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, inner, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (inner, 4, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[2:] == (1, 1)
    # every module has down, up and alpha, and nothing else is there; all contiguous
    names = {k.split(".")[0] for k in tensors}
    parts = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(tensors) == {f"{n}.{p}" for n in names for p in parts}
    assert len(names) == len(peft_state(unet)) // 2
    assert all(t.is_contiguous() for t in tensors.values())


def test_text_encoder_keys_have_the_checkpoint_names():
    te = with_lora(tiny_text_encoder(), 4, 2, TE_TARGETS)
    tensors = peft_to_kohya(peft_state(te), "lora_te_", 2, dtype=torch.float16)
    for proj in TE_TARGETS:
        # with ``text_model`` whatever the transformers version (5.x dropped that level from CLIPTextModel)
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
        assert tensors[f"{name}.lora_down.weight"].shape == (4, 32)
        assert tensors[f"{name}.alpha"].item() == 2.0
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_peft_key_forms_and_errors():
    down, up = torch.ones(2, 3), torch.ones(5, 2)
    module = "text_model.encoder.layers.0.mlp.fc1"
    with_adapter_name = {f"{module}.lora_A.default.weight": down, f"{module}.lora_B.default.weight": up}
    name = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert set(peft_to_kohya(with_adapter_name, "lora_te2_", 1)) == {
        f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    with pytest.raises(ValueError, match=r"'foo\.weight'"):
        peft_to_kohya({"foo.weight": down}, "lora_unet_", 1.0)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        peft_to_kohya({"a.lora_magnitude_vector.weight": down}, "lora_unet_", 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        peft_to_kohya({"a.lora_A.weight": down}, "lora_unet_", 1.0)
    with pytest.raises(ValueError, match="prefix"):
        peft_to_kohya({"a.lora_A.weight": down}, "unet.", 1.0)


# --- metadata ------------------------------------------------------------------------------------------

REQUIRED = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout", "ss_network_args",
    "ss_base_model_version", "ss_v2", "ss_output_name", "ss_tag_frequency", "ss_num_train_images",
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_steps", "ss_epoch", "ss_num_epochs",
    "ss_max_train_steps", "ss_training_started_at", "ss_training_finished_at", "ss_sd_model_name",
    "ss_resolution", "ss_seed", "ss_training_comment", "ss_batch_size_per_device",
    "ss_gradient_accumulation_steps", "ss_lr_scheduler", "ss_optimizer", "ss_mixed_precision",
    "ss_noise_offset", "ss_min_snr_gamma", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date",
    "modelspec.prediction_type", "modelspec.description",
]


def test_metadata_has_every_key_as_a_string():
    meta = metadata()
    assert [k for k in REQUIRED if k not in meta] == []
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"demo style": 3, "café": 1}}
    assert json.loads(meta["ss_network_args"]) == {"target_modules": UNET_TARGETS}
    assert meta["ss_network_train_unet_only"] == "True" and meta["ss_text_encoder_lr"] == "None"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert (meta["ss_resolution"], meta["modelspec.resolution"]) == ("(64, 64)", "64x64")
    assert (meta["ss_training_started_at"], meta["ss_min_snr_gamma"]) == ("1700000000.5", "None")
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.title"] == "x" and meta["modelspec.description"] == "hello"
    date = meta["modelspec.date"]
    assert date.startswith("2023-11-1") and len(date) == 19  # ISO 8601, whole seconds, local time as kohya
    no_comment = metadata(comment="")
    assert "modelspec.description" not in no_comment and no_comment["ss_training_comment"] == "None"


def test_metadata_per_family():
    v = metadata(base_model_version="sd_v2", prediction_type="v_prediction", resolution=768)
    assert v["ss_v2"] == "True" and v["ss_base_model_version"] == "sd_v2_v"  # kohya appends _v
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.prediction_type"] == "v"
    assert metadata(base_model_version="sd_v2")["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    xl = metadata(base_model_version="sdxl_base_v1-0", resolution=1024, clip_skip=2, extra={"ss_flip_aug": True})
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0" and xl["ss_v2"] == "False"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.resolution"] == "1024x1024" and xl["ss_resolution"] == "(1024, 1024)"
    assert (xl["modelspec.encoder_layer"], xl["ss_clip_skip"], xl["ss_flip_aug"]) == ("2", "2", "True")
    with pytest.raises(ValueError, match="base_model_version"):
        metadata(base_model_version="sd_v3")


# --- hashes --------------------------------------------------------------------------------------------

def test_hashes_match_their_definitions(tmp_path):
    data = save({"a": torch.arange(10, dtype=torch.float32)}, metadata={"k": "v"})
    n = int.from_bytes(data[:8], "little")
    tensor_bytes_sha = hashlib.sha256(data[8 + n:]).hexdigest()
    small = tmp_path / "small.safetensors"
    small.write_bytes(data)
    assert model_hash(data) == tensor_bytes_sha
    empty_window = hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB
    assert file_hashes(small) == (tensor_bytes_sha, empty_window)

    big = save({"a": torch.randn(400_000)})  # 1.6 MB: the legacy window [1 MiB, 1 MiB + 64 KiB) is inside
    assert len(big) > 0x110000
    assert legacy_hash(big) == hashlib.sha256(big[0x100000:0x110000]).hexdigest()[:8] != legacy_hash(b"")
    path = tmp_path / "big.safetensors"
    path.write_bytes(big)
    assert file_hashes(path) == (model_hash(big), legacy_hash(big))


def test_saved_file_carries_kohyas_hashes(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(4, 100_000),  # 1.6 MB: the legacy hash sees data
               "lora_unet_a.lora_up.weight": torch.randn(8, 4), "lora_unet_a.alpha": torch.tensor(2.0)}
    path = save_kohya_lora(tmp_path / "x.safetensors", tensors, metadata())
    loaded, meta = read_kohya_lora(path)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta["modelspec.title"] == "x" and meta["ss_output_name"] == "x"
    # kohya's precalculate_safetensors_hashes: the file serialized with the ss_* metadata only
    ss_only = save(loaded, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert (model_hash(ss_only), legacy_hash(ss_only)) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    assert meta["sshs_model_hash"] == file_hashes(path)[0]  # the tensor bytes are the same in the final file
    with pytest.raises(TypeError, match="ss_steps"):
        save_kohya_lora(tmp_path / "y.safetensors", tensors, {"ss_steps": 3})
    assert not (tmp_path / "y.safetensors").exists()


def test_never_overwrites_an_existing_lora(tmp_path, caplog):
    tensors = {"lora_unet_a.lora_down.weight": torch.ones(1, 2)}
    first = save_kohya_lora(tmp_path / "name.safetensors", tensors, metadata())
    before = first.read_bytes()
    with caplog.at_level(logging.INFO, logger="lora_trainer.export.kohya"):
        second = save_kohya_lora(tmp_path / "name.safetensors", tensors, metadata(comment="other"))
    assert (first.name, second.name) == ("name.safetensors", "name_1.safetensors")
    assert first.read_bytes() == before and read_kohya_lora(second)[1]["ss_training_comment"] == "other"
    assert "name_1.safetensors" in caplog.text

    state = {"a.lora_A.weight": torch.ones(1, 2), "a.lora_B.weight": torch.ones(2, 1)}
    d1 = save_diffusers_lora(tmp_path / "d", state, rank=1, alpha=1)
    d2 = save_diffusers_lora(tmp_path / "d", state, rank=1, alpha=1)
    assert (d1.name, d2.name) == (WEIGHT_NAME, "pytorch_lora_weights_1.safetensors")
    assert sorted(p.name for p in d1.parent.iterdir()) == [WEIGHT_NAME, "pytorch_lora_weights_1.safetensors"]


# --- interop: both files give diffusers the trained model's outputs -------------------------------------

@pytest.fixture
def diffusers_loader(monkeypatch):
    """Make ``pipe.load_lora_weights`` usable for UNet LoRAs; return whether text-encoder LoRAs load too.

    diffusers 0.30.3 (the A1111 pins) switches its PEFT backend off, and with it ``load_lora_weights``,
    when transformers < 4.34: it loads text-encoder LoRAs through transformers' PEFT integration
    (``PreTrainedModel.load_adapter``), which transformers 4.30.2 lacks. Its UNet path needs only peft
    (0.13.2 is fine), so for UNet LoRAs we lift that version gate: the kohya key conversion, alpha
    handling and peft injection that then run are 0.30.3's own.
    """
    import diffusers.utils

    if diffusers.utils.USE_PEFT_BACKEND:
        return True
    import diffusers.loaders.lora_pipeline
    import diffusers.loaders.unet

    monkeypatch.setattr(diffusers.loaders.lora_pipeline, "USE_PEFT_BACKEND", True)
    monkeypatch.setattr(diffusers.loaders.unet, "USE_PEFT_BACKEND", True)
    return False


def outputs_before_and_after(lora_file, run):
    """``run(pipe)`` on a fresh pipeline of the tiny model, before and after ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), local_files_only=True,
                                                   safety_checker=None)
    with torch.no_grad():
        before = run(pipe)
        # weight_name always: offline (conftest sets HF_HUB_OFFLINE) diffusers 0.30.3 will not guess it,
        # not even in a local folder or from the file's own path
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        return before, run(pipe)


@pytest.mark.parametrize("rank, alpha, targets", [(4, 2.0, UNET_TARGETS), (4, 8.0, UNET_TARGETS),
                                                  (4, 2.0, UNET_TARGETS + CONV_TARGETS)])
def test_kohya_and_diffusers_files_give_the_trained_unet(tmp_path, diffusers_loader, rank, alpha, targets):
    unet = with_lora(tiny_unet(), rank, alpha, targets)
    x, t, cond = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, cond).sample
    kohya = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(alpha, unet=unet),
                            metadata(rank=rank, alpha=alpha))
    diffusers_file = save_diffusers_lora(tmp_path / "diffusers", peft_state(unet), rank=rank, alpha=alpha)

    for name, lora_file in [("kohya", kohya), ("diffusers", diffusers_file)]:
        base, got = outputs_before_and_after(lora_file, lambda pipe: pipe.unet(x, t, cond).sample)
        assert not torch.allclose(base, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{name} file: {m}")


def test_kohya_and_diffusers_files_give_the_trained_text_encoder(tmp_path, diffusers_loader):
    if not diffusers_loader:
        pytest.skip("diffusers 0.30.3 loads text-encoder LoRAs via transformers' load_adapter, which needs "
                    "transformers >= 4.34 (A1111 pins 4.30.2); the WebUI-way test covers the text encoder")
    rank, alpha = 4, 2.0
    te = with_lora(tiny_text_encoder(), rank, alpha, TE_TARGETS)
    unet = with_lora(tiny_unet(), rank, alpha, UNET_TARGETS)
    ids = token_ids()
    with torch.no_grad():
        want = te(ids)[0]
    kohya = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(alpha, unet=unet, te=te), metadata())
    diffusers_file = save_diffusers_lora(tmp_path / "diffusers", peft_state(unet), peft_state(te),
                                         rank=rank, alpha=alpha)

    for name, lora_file in [("kohya", kohya), ("diffusers", diffusers_file)]:
        base, got = outputs_before_and_after(lora_file, lambda pipe: pipe.text_encoder(ids)[0])
        assert not torch.allclose(base, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{name} file: {m}")


def test_kohya_file_applied_the_webui_way_gives_the_trained_model(tmp_path):
    """A1111's Lora loader: W += up @ down * alpha / dim on the layer each key names (dim = down's rows)."""
    rank, alpha = 4, 3.0
    unet = with_lora(tiny_unet(), rank, alpha, UNET_TARGETS + CONV_TARGETS)
    te = with_lora(tiny_text_encoder(), rank, alpha, TE_TARGETS)
    x, t, cond = unet_inputs()
    ids = token_ids()
    with torch.no_grad():
        want_unet, want_te = unet(x, t, cond).sample, te(ids)[0]
    path = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(alpha, unet=unet, te=te), metadata())
    tensors, _ = read_kohya_lora(path)

    fresh_unet, fresh_te = tiny_unet(), tiny_text_encoder()
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in fresh_unet.named_modules() if n}
    layers |= {"lora_te_" + clip_text_model_path(n).replace(".", "_"): m
               for n, m in fresh_te.named_modules() if n}
    names = {k.split(".")[0] for k in tensors}
    assert names <= set(layers), sorted(names - set(layers))[:3]
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            weight = layers[name].weight
            updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)  # conv: 1x1 up after k x k down
            weight += updown * (tensors[f"{name}.alpha"].item() / down.shape[0])
        torch.testing.assert_close(fresh_unet(x, t, cond).sample, want_unet, **TOL)
        torch.testing.assert_close(fresh_te(ids)[0], want_te, **TOL)


@pytest.mark.parametrize("te_targets", [["q_proj", "k_proj", "v_proj"], ["q_proj", "v_proj"]], ids=["qkv", "qv"])
def test_a_text_encoder_without_out_proj_loads_in_diffusers(tmp_path, diffusers_loader, te_targets):
    """diffusers tells kohya's text-encoder keys by an out_proj: the exporter adds a zero one (up = 0) to each layer
    that has attention projections but no out_proj, and the file gives the trained encoder like the diffusers file."""
    rank, alpha = 4, 2.0
    te = with_lora(tiny_text_encoder(), rank, alpha, te_targets)
    unet = with_lora(tiny_unet(), rank, alpha, UNET_TARGETS)
    tensors = kohya_tensors(alpha, unet=unet, te=te)
    out_proj = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    assert tensors[f"{out_proj}.lora_down.weight"].shape == (rank, 32) and tensors[f"{out_proj}.alpha"] == alpha
    assert not tensors[f"{out_proj}.lora_up.weight"].any()
    assert not any("mlp" in k for k in tensors)  # (only the attention is completed)
    if not diffusers_loader:
        pytest.skip("diffusers 0.30.3 loads text-encoder LoRAs via transformers' load_adapter, which needs "
                    "transformers >= 4.34 (A1111 pins 4.30.2)")
    ids = token_ids()
    with torch.no_grad():
        want = te(ids)[0]
    kohya = save_kohya_lora(tmp_path / "k.safetensors", tensors, metadata())
    diffusers_file = save_diffusers_lora(tmp_path / "diffusers", peft_state(unet), peft_state(te),
                                         rank=rank, alpha=alpha)
    base, got = outputs_before_and_after(kohya, lambda pipe: pipe.text_encoder(ids)[0])
    assert not torch.allclose(base, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, outputs_before_and_after(diffusers_file, lambda pipe: pipe.text_encoder(ids)[0])[1],
                               **TOL)


def te_q_v_state(width: int) -> dict:
    """A peft text-encoder state of layer 0's q and v projections and its fc1, ``width`` wide."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for proj in ("q_proj", "v_proj"):
        state[f"text_model.encoder.layers.0.self_attn.{proj}.lora_A.weight"] = torch.randn(4, width, generator=gen)
        state[f"text_model.encoder.layers.0.self_attn.{proj}.lora_B.weight"] = torch.randn(width, 4, generator=gen)
    state["text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.randn(4, width, generator=gen)
    state["text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.randn(4 * width, 4, generator=gen)
    return state


TE_LAYER = "lora_te_text_model_encoder_layers_0_self_attn_"


def added_attention(tensors: dict, width: int) -> set[str]:
    """The attention projections of layer 0 added as zero modules (besides the trained q and v), checked."""
    assert {k.split(".")[0] for k in tensors} >= {f"{TE_LAYER}q_proj", f"{TE_LAYER}v_proj",
                                                  "lora_te_text_model_encoder_layers_0_mlp_fc1"}
    added = {k.split(".")[0][len(TE_LAYER):-len("_proj")] for k in tensors if k.startswith(TE_LAYER)} - {"q", "v"}
    for proj in added:
        assert tensors[f"{TE_LAYER}{proj}_proj.lora_down.weight"].shape == (4, width)
        assert not tensors[f"{TE_LAYER}{proj}_proj.lora_up.weight"].any()
        assert tensors[f"{TE_LAYER}{proj}_proj.alpha"] == 2.0
    return added


@pytest.mark.parametrize("width", [768, 1024], ids=["sd1", "sd2"])
def test_sd2_text_encoder_attention_gets_all_four_projections(width):
    """AUTOMATIC1111 runs SD 2.x's text encoder as open_clip's (its attention one fused nn.MultiheadAttention) and
    changes a layer's attention only when its q, k, v and out_proj modules are all in the file (as for SDXL's
    second encoder): a ``lora_te_`` LoRA 1024 wide (SD 2.x's) trained on q and v gets zero k and out modules;
    SD 1.x's (768, CLIP's own Linear layers) gets only the zero out_proj diffusers needs."""
    tensors = peft_to_kohya(te_q_v_state(width), "lora_te_", 2.0)
    assert added_attention(tensors, width) == ({"k", "out"} if width == 1024 else {"out"})


@pytest.mark.parametrize(("width", "family", "added"), [
    (1024, "sd_v1", {"out"}),  # an SD 1.x model with a 1024-wide custom text encoder: CLIP's Linear layers
    (768, "sd_v2", {"k", "out"}),  # an SD 2.x model's encoder, whatever its width: open_clip's in the WebUI
    (1024, "sd_v2_768_v", {"k", "out"}),
    (1024, None, {"k", "out"}),  # (a caller that does not know the family: the width tells)
], ids=["sd1-1024", "sd2-768", "sd2-768-v", "unknown-1024"])
def test_the_model_family_decides_whether_lora_te_is_open_clip(width, family, added):
    """Where the trainer knows the model's family (backend.family), it, not the encoder's width, tells whether the
    WebUI runs the ``lora_te_`` encoder as open_clip's (all four attention projections, or the layer is dropped) or
    as CLIP's (a zero out_proj only, for diffusers)."""
    tensors = peft_to_kohya(te_q_v_state(width), "lora_te_", 2.0, family=family)
    assert added_attention(tensors, width) == added


@pytest.mark.parametrize("family", ["sd_v1", "sd_v2"])
def test_the_trainers_export_passes_the_models_family(monkeypatch, tmp_path, family):
    """engine.outputs writes the run's LoRA with the backend's family: a 1024-wide text encoder of an SD 1.x model
    gets no open_clip modules (k_proj), one of an SD 2.x model does."""
    from types import SimpleNamespace

    from lora_trainer.engine import outputs
    from lora_trainer.models.base import TEXT_ENCODER

    written = {}
    monkeypatch.setattr(outputs, "build_metadata", lambda *args, **kwargs: {})
    monkeypatch.setattr(outputs, "save_kohya_lora", lambda path, tensors, meta: written.update(tensors) or path)
    cfg = SimpleNamespace(training=SimpleNamespace(lora_alpha=2.0, prior_loss_weight=1.0),
                          output=SimpleNamespace(save_precision="fp32"))
    backend = SimpleNamespace(kohya_prefixes={TEXT_ENCODER: "lora_te_"}, family=family,
                              kohya_module_path=lambda name, path: path, prediction_type="epsilon",
                              model_name="custom")
    scan = SimpleNamespace(samples=[], tag_frequencies=dict, folders=dict, root=tmp_path, reg_dirs={})
    plan = SimpleNamespace(total_steps=1, steps_per_epoch=1, epochs=1, effective_batch=1)
    outputs._kohya_file(tmp_path / "x.safetensors", {TEXT_ENCODER: te_q_v_state(1024)}, cfg, backend,
                        {TEXT_ENCODER: torch.nn.Module()}, scan, 0.0, 1, plan, None)
    assert added_attention(written, 1024) == ({"out"} if family == "sd_v1" else {"k", "out"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_an_alpha_the_save_dtype_cannot_hold_keeps_the_trained_scale(dtype):
    """lora_alpha 0.3 is 0.30005 in fp16 (+0.016%) and 0.30078 in bf16 (+0.26%: the scale of every weight of every
    module off by that): the alpha is written as the dtype holds it and lora_up takes the rest, so alpha · up is the
    trained 0.3 · B up to the weights' own rounding, which is unbiased (its mean over 4096 weights: a tenth of the
    dtype's precision, where the alpha's rounding alone was 3x (fp16) and 7x (bf16) that precision)."""
    state = te_q_v_state(1024)
    tensors = peft_to_kohya(state, "lora_te_", 0.3, dtype=dtype)
    name = f"{TE_LAYER}q_proj"
    alpha = tensors[f"{name}.alpha"]
    assert alpha.dtype == dtype and float(alpha) == float(torch.tensor(0.3, dtype=dtype))
    want = 0.3 * state["text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"].double()
    got = float(alpha) * tensors[f"{name}.lora_up.weight"].double()
    bias = float((got / want).mean()) - 1
    # (eps: 2⁻¹⁰ fp16, 2⁻⁷ bf16, the rounding's bound half that; float32's own 4e-8 on 0.3 is left as it is)
    assert abs(bias) < max(torch.finfo(dtype).eps / 20, 1e-7), bias
    assert {t.dtype for t in tensors.values()} == {dtype}


def test_a_conv_rank_lora_loads_as_trained_in_diffusers_and_the_webui_way(tmp_path, diffusers_loader):
    """kohya's conv_dim (training.conv_rank): the ResNet blocks' 3x3 convolutions at their own rank and alpha, the
    rest at lora_rank/lora_alpha; each file module carries its own alpha, and each loader gives the trained UNet."""
    from lora_trainer.engine.lora import add_lora, lora_alphas, resnet_layers

    unet = tiny_unet()
    add_lora(unet, rank=4, alpha=2.0, dropout=0.0, target_modules=UNET_TARGETS,
             layers=resnet_layers(unet, 4, 2.0, conv_rank=2, conv_alpha=3.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x, t, cond = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, cond).sample
    alphas = lora_alphas(unet)
    tensors = peft_to_kohya(peft_state(unet), "lora_unet_", 2.0, alphas=alphas)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape[:2] == (2, 32) and float(tensors[f"{conv}.alpha"]) == 3.0
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"]) == 2.0
    kohya = save_kohya_lora(tmp_path / "k.safetensors", tensors, metadata(rank=4, alpha=2.0, conv_rank=2,
                                                                          conv_alpha=3.0))
    diffusers_file = save_diffusers_lora(tmp_path / "diffusers", peft_state(unet), rank=4, alpha=2.0,
                                         unet_alphas=alphas)
    for name, lora_file in [("kohya", kohya), ("diffusers", diffusers_file)]:
        base, got = outputs_before_and_after(lora_file, lambda pipe: pipe.unet(x, t, cond).sample)
        assert not torch.allclose(base, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{name} file: {m}")

    fresh = tiny_unet()  # (A1111: W += up @ down * alpha / dim, dim = down's rows, per module)
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in fresh.named_modules() if n}
    with torch.no_grad():
        for name in {k.split(".")[0] for k in tensors}:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            weight = layers[name].weight
            updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)  # (a 1x1 up after a k x k down)
            weight += updown * (tensors[f"{name}.alpha"].item() / down.shape[0])
        torch.testing.assert_close(fresh(x, t, cond).sample, want, **TOL)
