"""SDXL on the command line: the tiny SDXL models (epsilon and v-prediction) train, resume bit-exactly, get each
image's real size/crop ids, and export a kohya file with the original UNet's block names that agrees with the
diffusers file."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import TOL, diffusers_loader  # noqa: F401  (a fixture)
from test_train import StopAt, make_cfg

from lora_trainer.config import config_from_dict
from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.data.images import load_image, shown_sizes
from lora_trainer.engine.trainer import train
from lora_trainer.export.kohya import LdmUnetNames, peft_to_kohya
from lora_trainer.models.base import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from lora_trainer.models.conditioning import Conditioning
from lora_trainer.models.factory import load_backend
from lora_trainer.models.sdxl_backend import SdxlBackend, is_sdxl_model, load_sdxl_backend
from lora_trainer.models.tiny_sdxl import (
    TINY_SDXL_NAME,
    TINY_SDXL_V_NAME,
    build_tiny_sdxl_components,
    tiny_sdxl_model_path,
)

CPU = torch.device("cpu")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]


def sdxl_cfg(data_dir, out_dir, model=TINY_SDXL_NAME, **training):
    cfg = make_cfg(data_dir, out_dir, **training)
    cfg.model.base_model = str(tiny_sdxl_model_path(model))
    return cfg


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)


# --- the model and its loading ------------------------------------------------------------------------

def test_an_sdxl_folder_makes_the_sdxl_backend(tmp_path):
    eps, v = tiny_sdxl_model_path(TINY_SDXL_NAME), tiny_sdxl_model_path(TINY_SDXL_V_NAME)
    assert is_sdxl_model(str(eps)) and is_sdxl_model(TINY_SDXL_NAME) and not is_sdxl_model("tiny-demo")
    assert not is_sdxl_model(str(tmp_path))
    cfg = config_from_dict({"data": {"train_data_dir": str(tmp_path)}, "model": {"base_model": str(v)},
                            "training": {"mixed_precision": "no"}})
    backend = load_backend(cfg)
    assert isinstance(backend, SdxlBackend) and backend.family == "sdxl"
    assert backend.prediction_type == "v_prediction" and backend.uses_time_ids
    assert set(backend.components()) == {UNET, TEXT_ENCODER, TEXT_ENCODER_2}
    assert backend.kohya_prefixes == {UNET: "lora_unet_", TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}
    assert load_sdxl_backend(str(eps), CPU, torch.float32).prediction_type == "epsilon"
    assert not any(p.requires_grad for m in backend.components().values() for p in m.parameters())


def test_conditioning_is_both_encoders_and_the_pooled_second():
    backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
    captions = ["a red circle, soft light", "a (blue:1.3) square"]
    with torch.no_grad():
        cond = backend.encode_prompts(captions)
        ids_1 = backend.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids_2 = backend.tokenizer_2(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden_1 = backend.text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]
        out_2 = backend.text_encoder_2(ids_2, output_hidden_states=True)
        weighted = backend.encode_prompts(captions, weighted=True)
        plain = backend.encode_prompts(captions[:1], weighted=True)
    assert cond.context.shape == (2, 77, 64) and cond.pooled.shape == (2, 32) and cond.time_ids is None
    assert torch.equal(cond.context, torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1))
    assert torch.equal(cond.pooled, out_2.text_embeds)
    assert ids_2[0, -1] != ids_1[0, -1]  # the second tokenizer pads with "!", as SDXL's does
    torch.testing.assert_close(plain.context, cond.context[:1])  # no emphasis: as the literal caption
    assert not torch.allclose(weighted.context[1], cond.context[1])


def test_predict_takes_the_time_ids():
    backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
    with torch.no_grad():
        cond = backend.encode_prompts(["a red circle"])
        x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        with pytest.raises(ValueError, match="size/crop ids"):
            backend.predict(x, t, cond)
        a = backend.predict(x, t, cond.with_time_ids(torch.tensor([[64.0, 64, 0, 0, 64, 64]])))
        b = backend.predict(x, t, cond.with_time_ids(torch.tensor([[1024.0, 768, 0, 32, 64, 64]])))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="1×6"):
        cond.with_time_ids(torch.zeros(2, 6))


def test_conditioning_rows_keep_time_ids_and_sd1_has_none():
    cond = Conditioning(torch.ones(2, 3, 4), torch.ones(2, 5)).with_time_ids(torch.arange(12.0).reshape(2, 6))
    rows = cond.rows()
    assert torch.equal(Conditioning.cat(rows).time_ids, cond.time_ids) and rows[1].time_ids.tolist() == [[6, 7, 8, 9,
                                                                                                            10, 11]]
    assert Conditioning(torch.ones(1, 3, 4)).time_ids is None


# --- kohya names ----------------------------------------------------------------------------------------

def ldm_state(unet, names):
    out = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        out[f"model.diffusion_model.{names(module)}.{param}"] = value
    return out


def test_ldm_names_are_the_inverse_of_diffusers_checkpoint_conversion():
    """Every parameter of the UNet named the LDM way converts back, through diffusers' own single-file
    converter, to the same diffusers parameter: the tiny SDXL UNet, and SDXL's real shapes (meta device)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tiny = build_tiny_sdxl_components()["unet"]
    real_config = dict(tiny.config, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=2816, sample_size=128)
    with torch.device("meta"):
        real = UNet2DConditionModel.from_config(real_config)
    for unet in (tiny, real):
        names = LdmUnetNames(unet.config)
        back = convert_ldm_unet_checkpoint(ldm_state(unet, names), dict(unet.config))
        assert back.keys() == unet.state_dict().keys()
    names = LdmUnetNames(real.config)
    assert names("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert names("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj") == \
        "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj"
    assert names("mid_block.attentions.0.proj_out") == "middle_block.1.proj_out"
    assert names("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"
    assert names("up_blocks.1.resnets.0.conv1") == "output_blocks.3.0.in_layers.2"
    assert names("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert names("add_embedding.linear_1") == "label_emb.0.0"
    with pytest.raises(ValueError, match="no LDM name"):
        names("down_blocks.1.attentions.0.something")
    with pytest.raises(ValueError, match="no LDM name"):
        names("down_blocks.0.resnets.0.mystery")


def test_peft_to_kohya_renames_unet_paths():
    state = {"down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.ones(2, 3),
             "down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.ones(3, 2)}
    names = LdmUnetNames(build_tiny_sdxl_components()["unet"].config)
    assert sorted(peft_to_kohya(state, "lora_unet_", 1.0, rename=names)) == [
        "lora_unet_input_blocks_4_1_proj_in.alpha", "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight"]


# --- each image's size and crop ----------------------------------------------------------------------------

def sized_images(folder):
    """Images of several sizes and kinds, with their SDXL ids at resolution 64 worked out by hand:
    (original h, w, crop top, left, target h, w); the crop offsets in the picture scaled to 64 on its short side."""
    folder.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "wide.png")  # 96×64 → left (96-64)//2
    Image.new("RGB", (64, 128), (30, 200, 30)).save(folder / "tall.png")  # → top 32
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120×80, shown turned: 80 wide, 120 high → 64×96, top 16
    Image.new("RGB", (120, 80), (30, 30, 200)).save(folder / "turned.jpg", exif=exif.tobytes())
    # 1000×700 JPEG read at 1/4 (fast_jpeg_decode, draft 128): 250×175 → 91×64 (round(250·64/175)), left 13
    Image.new("RGB", (1000, 700), (90, 90, 90)).save(folder / "photo.jpg", quality=90)
    (folder / "metadata.csv").write_text("file_name,text\nwide.png,a wide red\ntall.png,a tall green\n"
                                         "turned.jpg,a turned blue\nphoto.jpg,a grey photo\n")
    return {"wide.png": (64, 96, 0, 16, 64, 64), "tall.png": (128, 64, 32, 0, 64, 64),
            "turned.jpg": (120, 80, 16, 0, 64, 64), "photo.jpg": (700, 1000, 0, 13, 64, 64)}


def mirrored(ids, scaled_width):
    h, w, top, left, th, tw = ids
    return (h, w, top, scaled_width - 64 - left, th, tw)


SCALED_WIDTH = {"wide.png": 96, "tall.png": 64, "turned.jpg": 64, "photo.jpg": 91}


def test_time_ids_are_each_images_real_size_and_crop(tmp_path):
    want = sized_images(tmp_path / "imgs")
    samples = scan_dataset(tmp_path / "imgs").samples
    dataset = ImageDataset(samples, 64, fast_jpeg_decode=True)
    names = [s.path.name for s in samples]
    ids = dataset.time_ids(torch.arange(len(samples)))
    assert {n: tuple(row) for n, row in zip(names, ids.tolist())} == want
    flipped = dataset.time_ids(torch.arange(len(samples)), flip=torch.ones(len(samples), dtype=torch.bool))
    assert {n: tuple(row) for n, row in zip(names, flipped.tolist())} == {
        n: mirrored(want[n], SCALED_WIDTH[n]) for n in names}
    for s in samples:  # the header says what the decode gives
        assert shown_sizes(s.path, 128)[1] == load_image(s.path, draft=128).size


@pytest.mark.parametrize("cached", [True, False])
def test_time_ids_reach_the_unet(tmp_path, cached):
    want = sized_images(tmp_path / "imgs")
    backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
    seen = []
    backend.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    cfg = sdxl_cfg(tmp_path / "imgs", tmp_path / "out", random_flip=True, max_train_steps=3, batch_size=4,
                   cache_latents=cached, cache_latents_to_disk=cached)
    cfg.data.fast_jpeg_decode = True
    train(cfg, backend=backend, progress=False)
    assert len(seen) == 3
    allowed = {v for n, ids in want.items() for v in (ids, mirrored(ids, SCALED_WIDTH[n]))}
    rows = [tuple(r) for batch in seen for r in batch.tolist()]
    assert set(rows) <= allowed, set(rows) - allowed
    assert {r[:2] for r in rows} == {ids[:2] for ids in want.values()}  # every image in every batch
    if cached:  # a second run takes every latent from the disk cache: the ids are still each image's
        seen.clear()
        train(sdxl_cfg(tmp_path / "imgs", tmp_path / "out", random_flip=False, max_train_steps=1, batch_size=4,
                       cache_latents=True, cache_latents_to_disk=True), backend=backend, progress=False)
        assert sorted(tuple(r) for r in seen[0].tolist()) == sorted(want.values())


# --- train, export, resume ---------------------------------------------------------------------------------

def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g),
            {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [1024.0, 768, 16, 0, 64, 64]])})


@pytest.mark.parametrize("model, prediction", [(TINY_SDXL_NAME, "epsilon"), (TINY_SDXL_V_NAME, "v")])
def test_sdxl_trains_and_exports_kohya_names(demo_data, tmp_path, model, prediction):
    cfg = sdxl_cfg(demo_data, tmp_path / "out", model=model, max_train_steps=3, target_modules=TARGETS,
                   train_text_encoder=True, min_snr_gamma=5.0)
    result = train(cfg, progress=False)
    assert result.status == "finished" and result.steps == 3
    with safe_open(result.lora_path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == prediction
    unet = [k for k in keys if k.startswith("lora_unet_")]
    te = [k for k in keys if not k.startswith("lora_unet_")]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in unet
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.alpha" in unet
    assert "lora_unet_output_blocks_3_0_in_layers_2.lora_up.weight" in unet  # a ResBlock's conv1
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in unet), "a UNet key not in LDM naming"
    assert te and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te


def test_sdxl_diffusers_file_agrees_with_the_kohya_file(demo_data, tmp_path, diffusers_loader):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
    cfg = sdxl_cfg(demo_data, tmp_path / "out", max_train_steps=4, target_modules=TARGETS, lora_rank=4,
                   lora_alpha=2, learning_rate=1e-2)
    result = train(cfg, backend=backend, progress=False)
    x, t, context, added = unet_inputs()
    with torch.no_grad():
        want = backend.unet.eval()(x, t, context, added_cond_kwargs=added).sample
    outputs = {}
    for name, lora_file in [("kohya", result.lora_path), ("diffusers", result.diffusers_path)]:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_path(), local_files_only=True)
        with torch.no_grad():
            before = pipe.unet(x, t, context, added_cond_kwargs=added).sample
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
            outputs[name] = pipe.unet(x, t, context, added_cond_kwargs=added).sample
        assert not torch.allclose(before, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
    torch.testing.assert_close(outputs["kohya"], want, **TOL)
    torch.testing.assert_close(outputs["diffusers"], want, **TOL)


def test_the_command_line_trains_tiny_sdxl_by_name(demo_data, tmp_path, capsys):
    """``base_model: tiny-sdxl`` (the name, not its folder) passes the path checks and trains an SDXL LoRA."""
    import yaml

    from lora_trainer.cli import main

    cfg_path = tmp_path / "sdxl.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data": {"train_data_dir": str(demo_data), "resolution": 64},
        "model": {"base_model": TINY_SDXL_NAME},
        "training": {"max_train_steps": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
        "output": {"output_dir": str(tmp_path / "run"), "output_name": "xl", "save_diffusers_format": False,
                   "log_with": "none"}}))
    assert main(["train", "--config", str(cfg_path)]) == 0, capsys.readouterr().err
    with safe_open(tmp_path / "run" / "xl.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert f.metadata()["ss_sd_model_name"] == TINY_SDXL_NAME


@pytest.mark.parametrize("encoders", [{}, {"train_text_encoder_2": True, "text_encoder_2_lr": 1e-3}])
def test_sdxl_resume_gives_the_same_lora(demo_data, tmp_path, encoders):
    settings = dict(max_train_steps=4, batch_size=2, gradient_accumulation_steps=1, lora_dropout=0.1,
                    noise_offset=0.05, min_snr_gamma=5.0, save_steps=2, cache_latents=True, **encoders)
    straight = train(sdxl_cfg(demo_data, tmp_path / "a", model=TINY_SDXL_V_NAME, **settings), progress=False)
    first = train(sdxl_cfg(demo_data, tmp_path / "b", model=TINY_SDXL_V_NAME, **settings), callbacks=StopAt(2),
                  progress=False)
    assert first.status == "stopped" and first.steps == 2
    resumed = train(sdxl_cfg(demo_data, tmp_path / "b", model=TINY_SDXL_V_NAME, resume_from_checkpoint="latest",
                             **settings), progress=False)
    assert resumed.steps == 4 and resumed.status == "finished"
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))
    if encoders:
        assert any(k.startswith("lora_te2_") and k.endswith("lora_up.weight") and a[k].abs().sum() > 0 for k in a)


# --- the second text encoder ------------------------------------------------------------------------------

def test_each_text_encoder_gets_its_own_learning_rate(tmp_path):
    from lora_trainer.engine.run import add_lora_layers

    def groups(**training):
        backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
        cfg = sdxl_cfg(tmp_path, tmp_path / "out", learning_rate=1e-4, text_encoder_lr=1e-5, **training)
        modules, groups = add_lora_layers(cfg, backend)
        return list(modules), [g["lr"] for g in groups]

    assert groups() == ([UNET], [1e-4])
    assert groups(train_text_encoder_2=True) == ([UNET, TEXT_ENCODER_2], [1e-4, 1e-5])  # None: text_encoder_lr
    assert groups(train_text_encoder=True, train_text_encoder_2=True, text_encoder_2_lr=2e-5) == (
        [UNET, TEXT_ENCODER, TEXT_ENCODER_2], [1e-4, 1e-5, 2e-5])


def test_a_second_text_encoder_on_a_model_without_one_is_refused_before_any_step(demo_data, tmp_path):
    from lora_trainer.errors import ConfigError

    steps = StopAt(99)
    with pytest.raises(ConfigError, match="training.train_text_encoder_2: this model \\(sd_v1\\) has one text"):
        train(make_cfg(demo_data, tmp_path / "out", train_text_encoder_2=True), callbacks=steps, progress=False)
    assert steps.seen == [] and not (tmp_path / "out").exists()


def test_resume_must_match_the_second_text_encoder(tmp_path):
    from lora_trainer.engine.checkpoint import Restored, check_resume, run_settings
    from lora_trainer.errors import ConfigError

    cfg = sdxl_cfg(tmp_path, tmp_path / "out", train_text_encoder_2=True)
    settings = run_settings(cfg.training, 4, 4, cfg.data, cfg.model)
    assert settings["train_text_encoder_2"] is True
    old = Restored(2, {}, {}, {"settings": {k: v for k, v in settings.items() if k != "train_text_encoder_2"}})
    with pytest.raises(ConfigError, match="train_text_encoder_2: False in the checkpoint, True now"):
        check_resume(old, settings, tmp_path)  # (a checkpoint from before the key: one encoder trained)


def test_sdxl_second_text_encoder_trains_and_both_files_carry_it(demo_data, tmp_path, diffusers_loader):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    backend = load_sdxl_backend(TINY_SDXL_NAME, CPU, torch.float32)
    cfg = sdxl_cfg(demo_data, tmp_path / "out", max_train_steps=3, train_text_encoder_2=True, text_encoder_2_lr=2e-2,
                   gradient_checkpointing=True, lora_rank=4, lora_alpha=2)
    result = train(cfg, backend=backend, progress=False)
    with safe_open(result.lora_path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_text_encoder_lr"] == "0.02" and meta["ss_network_train_unet_only"] == "False"
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert not any(k.startswith(("lora_te1_", "lora_te_")) for k in keys)
    with safe_open(result.diffusers_path, "pt") as f:
        assert any(k.startswith("text_encoder_2.") for k in f.keys())
        assert not any(k.startswith("text_encoder.") for k in f.keys())
    if not diffusers_loader:
        pytest.skip("diffusers 0.30.3 loads text-encoder LoRAs via transformers' load_adapter (transformers >= 4.34)")
    ids = backend.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def second(pipe):
        return pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]

    backend.text_encoder_2.eval()
    with torch.no_grad():
        want = second(backend.pipe)  # the trained model: its second encoder with the LoRA layers in
    for lora_file in (result.lora_path, result.diffusers_path):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_path(), local_files_only=True)
        with torch.no_grad():
            before = second(pipe)
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
            got = second(pipe)
        assert not torch.allclose(before, want, atol=1e-3), "the LoRA changes nothing: the test could not fail"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, f=lora_file.name: f"{f}: {m}")


def test_metadata_names_each_text_encoders_learning_rate(tmp_path):
    from lora_trainer.export.metadata import ModelFacts, RunFacts, build_metadata

    cfg = sdxl_cfg(tmp_path, tmp_path / "out", text_encoder_lr=1e-5, text_encoder_2_lr=2e-5)

    def meta(te1, te2):
        run = RunFacts(steps=1, max_train_steps=1, epoch=1, num_epochs=1, num_train_images=1, tag_frequency={},
                       trained_text_encoder=te1, trained_text_encoder_2=te2, started_at=0.0, finished_at=1.0)
        m = build_metadata(cfg, ModelFacts("sdxl", "epsilon", TINY_SDXL_NAME), run)
        return m["ss_text_encoder_lr"], m["ss_network_train_unet_only"]

    assert meta(False, False) == ("None", "True")
    assert meta(True, False) == ("1e-05", "False")
    assert meta(False, True) == ("2e-05", "False")
    assert meta(True, True) == ("[1e-05, 2e-05]", "False")  # per encoder, as newer kohya writes its list
