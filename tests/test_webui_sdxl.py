"""The Train LoRA tab on SDXL inside the WebUI: the stand-in of A1111 v1.10's sgm model (tests/sgm_model.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

STUB = Path(__file__).resolve().parent / "webui_stub"
sys.path.insert(0, str(STUB))

from lora_file import learned_prefixes  # noqa: E402
from modules import processing, shared  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sgm_model import TinySgmDiffusion  # noqa: E402
from webui_session import webui_with  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.data.demo_set import make_demo_dataset  # noqa: E402
from lora_trainer.engine.lora import add_lora  # noqa: E402
from lora_trainer.models.conditioning import Conditioning  # noqa: E402
from lora_trainer.ui.session import TrainingSession  # noqa: E402
from lora_trainer.webui.host import WebUIHost  # noqa: E402


class SdConditioning(list):
    """modules.prompt_parser.SdConditioning: the prompts, with the generation's width and height."""

    def __init__(self, prompts, width, height):
        super().__init__(prompts)
        self.width, self.height = width, height


@pytest.fixture
def sdxl(tmp_path):
    yield from webui_with(TinySgmDiffusion(), tmp_path)


def make_cfg(tmp_path, **extra):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    settings = {"train_data_dir": str(data), "resolution": 64, "max_train_steps": 4, "batch_size": 2,
                "learning_rate": 1e-2, "save_steps": 0, "lora_dropout": 0.0, "lora_rank": 4, "lora_alpha": 4,
                "output_dir": str(tmp_path / "run"), "output_name": "sdxl_lora", "log_with": "none", **extra}
    return config_from_dict(settings)


def outputs(sd_model):
    torch.manual_seed(3)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([100])
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(SdConditioning(["demo style"], 128, 96))
        return cond, sd_model.apply_model(x, t, cond)


def state(sd_model):
    return ({n: p.requires_grad for n, p in sd_model.named_parameters()},
            [e.is_trainable for e in sd_model.conditioner.embedders],
            [n for n, m in sd_model.named_modules() if vars(m).keys() & {"forward", "_lora_trainer_checkpoint"}])


def test_the_tab_trains_sdxl_in_place_exports_kohya_sdxl_and_restores_the_model_bitwise(sdxl, tmp_path):
    pristine, before = outputs(sdxl), state(sdxl)
    host = WebUIHost()
    cfg = make_cfg(tmp_path, train_text_encoder=True, gradient_checkpointing=True, cache_text_embeddings=False)
    status = TrainingSession.start(host, cfg, sample_prompt="demo style", sample_every=2).wait(300)
    assert status.state == "done", status.message
    with safe_open(str(status.published), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    unet = {k for k in keys if k.startswith("lora_unet_")}
    te1 = {k for k in keys if k.startswith("lora_te1_")}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in unet
    assert not any("down_blocks" in k for k in unet)  # one naming only: the original UNet's
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in te1
    assert learned_prefixes(status.published) == {"lora_unet_", "lora_te1_"}
    assert keys == unet | te1  # nothing of the second encoder (open_clip in the WebUI), nothing unprefixed
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert [p.prompt for p in processing.calls] == ["demo style", "demo style"]  # samples through txt2img
    after = outputs(sdxl)
    assert all(torch.equal(after[0][k], pristine[0][k]) for k in pristine[0]) and torch.equal(after[1], pristine[1])
    assert state(sdxl) == before
    assert not any(hasattr(m, "lora_A") for m in sdxl.modules())

    processing.calls.clear()
    host.sweep(status.published, "a cat", "", [0, 1.0], seed=7)
    assert [p.prompt for p in processing.calls] == ["a cat", "a cat <lora:sdxl_lora:1>"]
    assert host.native_image_size() == 1024 and host.model_family() == "sdxl"


def test_each_image_is_conditioned_as_the_webui_conditions_a_generation_of_its_size(sdxl):
    """Our predict with an image's ids (original = target = its size, crop 0) equals the WebUI's apply_model on
    the conditioning its txt2img makes at that size; other sizes give other outputs."""
    backend = WebUIHost().make_backend(make_cfg_plain())
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([20, 700])
    captions = ["a red cube", "two cats"]
    cond = backend.encode_prompts(captions)
    ids = torch.tensor([[96.0, 128, 0, 0, 96, 128], [512, 384, 0, 0, 512, 384]])
    ours = backend.predict(x, t, cond.with_time_ids(ids))
    with torch.no_grad():
        theirs = torch.cat([sdxl.apply_model(x[i:i + 1], t[i:i + 1],
                                             sdxl.get_learned_conditioning(SdConditioning([c], w, h)))
                            for i, (c, (h, w)) in enumerate(zip(captions, [(96, 128), (512, 384)]))])
    assert torch.allclose(ours, theirs, atol=1e-5)
    other = backend.predict(x, t, cond.with_time_ids(ids.flip(1)))
    assert not torch.allclose(ours, other, atol=1e-3)


def make_cfg_plain(**extra):
    return config_from_dict({"train_data_dir": ".", "resolution": 64, **extra})


def test_first_text_encoder_lora_gets_gradients_through_the_conditioner_and_its_flag_is_put_back(sdxl):
    backend = WebUIHost().make_backend(make_cfg_plain(train_text_encoder=True))
    add_lora(backend.text_encoder, rank=2, alpha=2, target_modules=["q_proj", "v_proj"], dropout=0.0)
    # the last layer's LoRA gets none: SDXL conditions on the penultimate layer's output
    lora = [p for n, p in backend.text_encoder.named_parameters() if "lora_B" in n and "layers.2." not in n]
    with torch.no_grad():
        for p in lora:
            p.normal_()
    cond = backend.encode_prompts(["a cat"]).with_time_ids(torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert [e.is_trainable for e in sdxl.conditioner.embedders] == [False] * 5


def test_checkpointing_sgm_blocks_gives_the_same_gradients_and_is_taken_out_again(sdxl):
    backend = WebUIHost().make_backend(make_cfg_plain())
    add_lora(backend.unet, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.0)
    lora = [p for n, p in backend.unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.1)
    cond = backend.encode_prompts(["a cat"]).with_time_ids(torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])

    def grads():
        for p in lora:
            p.grad = None
        backend.predict(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in lora]

    plain = grads()
    backend.enable_gradient_checkpointing(text_encoder=False)
    wrapped = [n for n, m in backend.unet.named_modules() if "_lora_trainer_checkpoint" in vars(m)]
    assert len(wrapped) == sum(type(m).__name__ in ("ResBlock", "BasicTransformerBlock")
                               for m in backend.unet.modules()) > 0
    checkpointed = grads()
    backend.disable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert not any(vars(m).keys() & {"forward", "_lora_trainer_checkpoint"} for m in backend.unet.modules())


def _with_keys(tmp_path, sdxl, *markers):
    path = tmp_path / "noob_vpred.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), **{k: torch.tensor([]) for k in markers}},
              str(path))
    sdxl.sd_checkpoint_info = type("Info", (), {"filename": str(path), "model_name": "noob_vpred"})()


def test_a_v_pred_checkpoint_the_webui_loaded_as_eps_trains_v_with_zero_snr_and_says_so(sdxl, tmp_path, caplog):
    _with_keys(tmp_path, sdxl, "v_pred", "ztsnr")
    caplog.set_level("INFO", logger="lora_trainer")
    backend = WebUIHost().make_backend(make_cfg_plain())
    assert backend.prediction_type == "v_prediction"
    assert backend.noise_scheduler.config.rescale_betas_zero_snr and backend.noise_scheduler.alphas_cumprod[-1] < 1e-6
    assert "loaded it as epsilon" in caplog.text and "its 'ztsnr' key" in caplog.text
    assert "Noise schedule for sampling" in caplog.text
    sdxl.sd_checkpoint_info.filename = str(tmp_path / "missing.safetensors")  # unreadable: as the WebUI says
    assert WebUIHost().make_backend(make_cfg_plain()).prediction_type == "epsilon"


def test_the_kohya_file_says_v_prediction_for_a_v_model(sdxl, tmp_path):
    sdxl.parameterization = "v"
    shared.opts.data["sd_noise_schedule"] = "Zero Terminal SNR"
    try:
        status = TrainingSession.start(WebUIHost(), make_cfg(tmp_path, max_train_steps=1)).wait(300)
    finally:
        shared.opts.data.pop("sd_noise_schedule")
    assert status.state == "done", status.message
    with safe_open(str(status.published), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "True"


@pytest.mark.parametrize("change, words", [
    ("te2", "second text encoder is not supported inside the WebUI"),
    ("refiner", "not a refiner"),
    ("inpaint", "inpainting"),
    ("fp8", "FP8 weight"),
])
def test_sdxl_refusals_are_clear_and_touch_nothing(sdxl, tmp_path, change, words):
    extra = {}
    if change == "te2":
        extra = {"train_text_encoder_2": True}
    elif change == "fp8":  # A1111's fp8_storage: every Linear/Conv2d weight of the UNet in float8_e4m3fn
        layer = sdxl.model.diffusion_model.input_blocks[4][1].proj_in
        layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    elif change == "refiner":
        sdxl.conditioner.embedders[2].input_key = "aesthetic_score"
    else:
        sdxl.is_sdxl_inpaint = True
    before = state(sdxl)
    status = TrainingSession.start(WebUIHost(), make_cfg(tmp_path, **extra)).wait(60)
    assert status.state == "error" and words in status.message
    assert state(sdxl) == before


def test_the_sgm_conditioning_rows_are_independent_of_batch_mates(sdxl):
    backend = WebUIHost().make_backend(make_cfg_plain())
    alone = backend.encode_prompts(["a cat"])
    together = backend.encode_prompts(["a cat", "a (very:1.5) large dog"])
    assert isinstance(alone, Conditioning)
    assert torch.equal(alone.context[0], together.context[0]) and torch.equal(alone.pooled[0], together.pooled[0])


def test_on_a_gpu_the_vae_and_text_encoders_wait_on_the_cpu_and_come_back_for_samples(sdxl, monkeypatch):
    """The moves the backend asks for (recorded: this machine has no GPU): parked before the steps, on the GPU
    for a sample, back on the CPU after it, and on the GPU again when training ends."""
    host = WebUIHost()
    backend = host.make_backend(make_cfg_plain())
    moves = []
    for name, module in (("vae", sdxl.first_stage_model), ("text", sdxl.conditioner)):
        monkeypatch.setattr(module, "to", lambda device, name=name, module=module: moves.append((name, str(device)))
                            or module)
    assert backend.offload_idle_encoders(text_encoder=True) == 0 and moves == []  # on the CPU: nothing moves
    backend.device = torch.device("cuda")
    assert backend.offload_idle_encoders(text_encoder=True) > 0
    assert moves == [("vae", "cpu"), ("text", "cpu")]
    moves.clear()
    host.sample(backend, "a cat", seed=1)
    assert moves == [("vae", "cuda"), ("text", "cuda"), ("vae", "cpu"), ("text", "cpu")] and processing.calls
    moves.clear()
    backend.restore_encoders()
    assert moves == [("vae", "cuda"), ("text", "cuda")]
    moves.clear()
    backend.offload_idle_encoders(text_encoder=False)  # the text encoder trains: it stays
    assert moves == [("vae", "cpu")]
