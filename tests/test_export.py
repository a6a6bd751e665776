"""The kohya file: key names, true alpha, metadata, hashes, never-clobber, and interop with diffusers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save

from lora_trainer.engine.lora import add_lora, lora_state_dict
from lora_trainer.engine.outputs import canonical_text_encoder_keys
from lora_trainer.export.diffusers_format import save_diffusers_lora
from lora_trainer.export.hashes import file_hashes, legacy_hash, model_hash
from lora_trainer.export.kohya import peft_to_kohya, read_kohya_lora, save_kohya_lora
from lora_trainer.export.metadata import build_metadata
from lora_trainer.models.diffusers_backend import load_diffusers_backend
from lora_trainer.models.tiny import tiny_model_path

def _diffusers_peft_backend() -> bool:
    from diffusers.utils import USE_PEFT_BACKEND

    return USE_PEFT_BACKEND


needs_diffusers_loader = pytest.mark.skipif(
    not _diffusers_peft_backend(),
    reason="diffusers' load_lora_weights needs its PEFT backend (transformers >= 4.34); under the A1111 pins "
           "(transformers 4.30.2) it is off, and inside the WebUI its own Lora loader reads the file",
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_backend(rank, alpha, text_encoder=False, seed=0):
    """The tiny model with LoRA layers whose B is random (a fresh LoRA would be all zero)."""
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    torch.manual_seed(seed)
    modules = {"unet": (backend.unet, UNET_TARGETS)}
    if text_encoder:
        modules["text_encoder"] = (backend.text_encoder, TE_TARGETS)
    for module, targets in modules.values():
        add_lora(module, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        module.eval()
    return backend


def metadata(**over):
    kw = dict(output_name="x", rank=4, alpha=2.0, dropout=0.0, base_model_version="sd_v1", prediction_type="epsilon",
              sd_model_name="tiny-demo", resolution=64, tag_frequency={"data": {"demo style": 3}}, num_train_images=3,
              learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=None, steps=10, max_train_steps=10, epoch=1,
              num_epochs=1, seed=1, batch_size=1, gradient_accumulation_steps=1, lr_scheduler="constant",
              optimizer="adamw", mixed_precision="no", noise_offset=0.0, min_snr_gamma=None,
              training_started_at=1700000000.0, training_finished_at=1700000100.0, comment="hello")
    kw.update(over)
    return build_metadata(**kw)


def kohya_tensors(backend, alpha, text_encoder=False):
    tensors = peft_to_kohya(lora_state_dict(backend.unet), "lora_unet_", alpha)
    if text_encoder:
        te = canonical_text_encoder_keys(lora_state_dict(backend.text_encoder))
        tensors.update(peft_to_kohya(te, "lora_te_", alpha))
    return tensors


def test_kohya_keys_shapes_and_true_alpha():
    backend = lora_backend(rank=4, alpha=8, text_encoder=True)
    tensors = kohya_tensors(backend, 8, text_encoder=True)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    inner = backend.unet.config.block_out_channels[0]
    assert tensors[f"{name}.lora_down.weight"].shape == (4, inner)
    assert tensors[f"{name}.lora_up.weight"].shape == (inner, 4)
    assert tensors[f"{name}.alpha"].ndim == 0 and tensors[f"{name}.alpha"].item() == 8.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in tensors} == {
        "lora_down", "lora_up", "alpha"}
    # one alpha per module, all modules of every targeted kind
    n_modules = sum(1 for k in tensors if k.endswith(".alpha"))
    assert n_modules == sum(1 for k in tensors if k.endswith("lora_down.weight"))
    with pytest.raises(ValueError, match="not a peft LoRA weight key"):
        peft_to_kohya({"foo.weight": torch.zeros(1)}, "lora_unet_", 1.0)


def test_metadata_keys_all_strings():
    meta = metadata()
    required = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "ss_output_name", "ss_tag_frequency", "ss_num_train_images", "ss_learning_rate", "ss_steps",
                "ss_epoch", "ss_training_started_at", "ss_training_finished_at", "ss_sd_model_name",
                "ss_resolution", "ss_seed", "ss_training_comment", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.title", "modelspec.resolution", "modelspec.date",
                "modelspec.prediction_type"]
    assert not [k for k in required if k not in meta]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"demo style": 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "64x64"
    v = metadata(base_model_version="sd_v2", prediction_type="v_prediction")
    assert v["ss_v2"] == "True" and v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.prediction_type"] == "v"


def test_hashes_match_their_definitions(tmp_path):
    data = save({"a": torch.arange(10, dtype=torch.float32)}, metadata={"k": "v"})
    n = int.from_bytes(data[:8], "little")
    assert model_hash(data) == hashlib.sha256(data[8 + n:]).hexdigest()
    big = save({"a": torch.randn(400_000)})  # 1.6 MB: the legacy window at 1 MiB is inside
    assert len(big) > 0x110000
    assert legacy_hash(big) == hashlib.sha256(big[0x100000:0x110000]).hexdigest()[:8]
    path = tmp_path / "big.safetensors"
    path.write_bytes(big)
    assert file_hashes(path) == (model_hash(big), legacy_hash(big))


def test_saved_file_hashes_recompute(tmp_path):
    backend = lora_backend(rank=4, alpha=2)
    tensors = kohya_tensors(backend, 2)
    path = save_kohya_lora(tmp_path / "x.safetensors", tensors, metadata())
    loaded, meta = read_kohya_lora(path)
    assert meta["sshs_model_hash"] == file_hashes(path)[0]
    without = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    again = save(loaded, metadata=without)
    assert (model_hash(again), legacy_hash(again)) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    with pytest.raises(TypeError, match="ss_steps"):
        save_kohya_lora(tmp_path / "y.safetensors", tensors, {"ss_steps": 3})


def test_never_overwrites_an_existing_lora(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.ones(1, 2)}
    first = save_kohya_lora(tmp_path / "name.safetensors", tensors, metadata())
    before = first.read_bytes()
    second = save_kohya_lora(tmp_path / "name.safetensors", tensors, metadata(comment="other"))
    assert first.name == "name.safetensors" and second.name == "name_1.safetensors"
    assert first.read_bytes() == before


@needs_diffusers_loader
@pytest.mark.parametrize("rank, alpha", [(4, 2.0), (4, 8.0)])
def test_kohya_and_diffusers_files_reproduce_the_trained_unet(tmp_path, rank, alpha):
    from diffusers import StableDiffusionPipeline

    backend = lora_backend(rank, alpha)
    torch.manual_seed(1)
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = backend.unet(x, t, cond).sample
    kohya = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(backend, alpha), metadata(rank=rank, alpha=alpha))
    diffusers_dir = tmp_path / "d"
    diffusers_dir.mkdir()
    save_diffusers_lora(diffusers_dir, lora_state_dict(backend.unet), rank=rank, alpha=alpha)

    def unet_output(lora_file):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), local_files_only=True, safety_checker=None)
        with torch.no_grad():
            base = pipe.unet(x, t, cond).sample
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
            return base, pipe.unet(x, t, cond).sample

    base, from_kohya = unet_output(kohya)
    assert not torch.allclose(base, want, atol=1e-3), "the LoRA does not change the output: test cannot fail"
    torch.testing.assert_close(from_kohya, want, atol=1e-5, rtol=1e-4)
    _, from_diffusers = unet_output(diffusers_dir / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(from_diffusers, want, atol=1e-5, rtol=1e-4)


@needs_diffusers_loader
def test_text_encoder_lora_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    alpha = 2.0
    backend = lora_backend(4, alpha, text_encoder=True)
    ids = backend.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = backend.text_encoder(ids)[0]
    kohya = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(backend, alpha, text_encoder=True), metadata())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), local_files_only=True, safety_checker=None)
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(tmp_path), weight_name=kohya.name)
        got = pipe.text_encoder(ids)[0]
    assert not torch.allclose(base, want, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kohya_file_applied_the_webui_way_reproduces_the_unet(tmp_path):
    """What the WebUI's Lora loader does: W += up @ down * alpha / rank on the layer the key names."""
    alpha, rank = 3.0, 4
    backend = lora_backend(rank, alpha)
    torch.manual_seed(2)
    x, t, cond = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        want = backend.unet(x, t, cond).sample
    path = save_kohya_lora(tmp_path / "k.safetensors", kohya_tensors(backend, alpha), metadata())
    tensors, _ = read_kohya_lora(path)

    fresh = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32).unet
    by_name = {"lora_unet_" + n.replace(".", "_"): m for n, m in fresh.named_modules() if n}
    names = {k.split(".")[0] for k in tensors}
    assert names <= set(by_name), sorted(names - set(by_name))[:3]
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            scale = tensors[f"{name}.alpha"].item() / down.shape[0]
            by_name[name].weight += (up @ down) * scale
        got = fresh(x, t, cond).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
