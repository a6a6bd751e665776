"""training.fp8_base: the frozen UNet's weights stored in float8 while the LoRA trains in fp32 (models.fp8).

With a diffusers that has layerwise casting (0.33+): the tiny SD 1.x and SDXL models train with every frozen Linear/Conv
weight of the UNet in float8 at each step, the LoRA weights fp32 with fp32 gradients, the same kohya file as without,
and a resume that gives the same LoRA. With the WebUI's pins (diffusers 0.30.3) and for the WebUI's own model: refused
before any model loads, naming the key and what it needs.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import StopAt, make_cfg
from torch import nn

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.run import add_lora_layers, prepare_backend
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError
from lora_trainer.models.base import UNET
from lora_trainer.models.factory import load_backend
from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAME, tiny_sdxl_model_path

FP8 = getattr(torch, "float8_e4m3fn", None)


def _has_layerwise_casting() -> bool:
    from diffusers import ModelMixin

    return hasattr(ModelMixin, "enable_layerwise_casting")


LAYERWISE = _has_layerwise_casting()
needs_layerwise = pytest.mark.skipif(not LAYERWISE, reason="this diffusers has no layerwise casting: fp8_base is "
                                     "refused (test_an_old_diffusers_is_refused_before_the_model_loads)")


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)


def fp8_cfg(data, out, model="tiny-demo", **training):
    cfg = make_cfg(data, out, random_flip=False, **{"max_train_steps": 2, "save_steps": 0, **training})
    cfg.output.log_with, cfg.output.save_diffusers_format = "none", False
    if model != "tiny-demo":
        cfg.model.base_model = str(tiny_sdxl_model_path(model))
    return cfg


def frozen_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's frozen Linear/Conv layers that fp8_base stores in float8: all but the LoRA adapters' own and the
    norms' (diffusers leaves the UNet's norm layers as they are)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and "lora_" not in n and "norm" not in n}


class Probe(Callbacks):
    """At each step: the dtypes of the UNet's frozen layer weights and of the LoRA weights and their gradients."""

    def __init__(self, backend):
        self.unet, self.steps, self.grads = backend.components()[UNET], [], []

    def on_start(self, total_steps, run_dir):  # (after set-up: LoRA layers in, fp8 storage on)
        for name, p in self.unet.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.grads.append((name, p.dtype, p.grad.dtype, bool(p.grad.abs().sum() > 0),
                                                            bool(torch.isfinite(p.grad).all()))))

    def on_step(self, info):
        layers = frozen_layers(self.unet)
        self.steps.append({
            "frozen": {str(m.weight.dtype) for m in layers.values()},
            "n_frozen": len(layers),
            "lora": {str(p.dtype) for n, p in self.unet.named_parameters() if "lora_" in n},
            "trainable": {n for n, p in self.unet.named_parameters() if p.requires_grad},
            "loss": info.loss,
        })


# --- training with fp8_base ---------------------------------------------------------------------------------

@needs_layerwise
@pytest.mark.parametrize("model, checkpointing", [("tiny-demo", False), (TINY_SDXL_NAME, True)])
def test_fp8_base_trains_with_float8_unet_weights_and_fp32_lora(demo_data, tmp_path, model, checkpointing):
    cfg = fp8_cfg(demo_data, tmp_path / "fp8", model, fp8_base=True, gradient_checkpointing=checkpointing)
    backend = load_backend(cfg)
    probe = Probe(backend)
    result = train(cfg, backend=backend, callbacks=probe, progress=False)
    assert result.status == "finished" and result.steps == 2 and math.isfinite(result.final_loss)
    assert len(probe.steps) == 2
    for step in probe.steps:
        assert step["frozen"] == {"torch.float8_e4m3fn"} and step["n_frozen"] > 20
        assert step["lora"] == {"torch.float32"} and math.isfinite(step["loss"])
        assert step["trainable"] and all("lora_" in n for n in step["trainable"])
    named = {name for name, *_ in probe.grads}
    assert named == probe.steps[0]["trainable"], "a LoRA weight got no gradient"
    assert all(dtype == grad == torch.float32 and finite for _, dtype, grad, _, finite in probe.grads)
    assert any(nonzero for *_, nonzero, _ in probe.grads)
    # the same kohya file as without fp8_base: the same tensors, shapes and dtypes; the metadata says which
    plain = train(fp8_cfg(demo_data, tmp_path / "plain", model, max_train_steps=1), progress=False)
    a, b = load_file(result.lora_path), load_file(plain.lora_path)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))
    for path, flag in ((result.lora_path, "True"), (plain.lora_path, "False")):
        with safe_open(path, "pt") as f:
            assert f.metadata()["ss_fp8_base"] == f.metadata()["ss_fp8_base_unet"] == flag


@pytest.fixture
def one_thread():
    """One CPU thread: torch's plain convolution kernels, which check that a weight has the input's dtype."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_layerwise
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_starts_as_without_fp8_and_trains_on_the_rounded_weights(tmp_path, one_thread, checkpointing):
    """LoRA A's initial values are not rounded to float8 (peft would move adapters injected after the casting to their
    base layer's float8), and the output and every LoRA gradient are those of the same model whose weights are rounded
    to float8 and computed without it, bit for bit: the backward pass uses the weights the forward used (a 1×1
    convolution's backward fails on a weight that became float8 again), with and without gradient checkpointing."""
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(tiny_sdxl_model_path()),
                            "mixed_precision": "no", "lora_rank": 4, "lora_dropout": 0.0,
                            "gradient_checkpointing": checkpointing,
                            "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]})
    plain, fp8 = load_backend(cfg), load_backend(cfg)
    for backend in (plain, fp8):
        add_lora_layers(cfg, backend)
        torch.manual_seed(1)  # B away from zero, so gradients reach A and the base weights matter
        for n, p in backend.unet.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.05)
    prepare_backend(cfg, plain)
    prepare_backend(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, fp8_base=True)), fp8)
    lora = {n: p for n, p in fp8.unet.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, dict(plain.unet.named_parameters())[n]) for n, p in lora.items())
    stored = {n for n, p in fp8.unet.named_parameters() if p.dtype == FP8}
    assert stored and all(p.dtype == torch.float32 for p in lora.values())
    with torch.no_grad():  # the reference: the plain model with the same weights rounded to float8
        rounded = {n: p.float() for n, p in fp8.unet.named_parameters() if n in stored}
        for n, p in plain.unet.named_parameters():
            if n in stored:
                p.copy_(rounded[n])
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    outs = {}
    for name, backend in (("plain", plain), ("fp8", fp8)):
        out = backend.unet(x, t, ctx, added_cond_kwargs=added).sample
        out.pow(2).mean().backward()
        outs[name] = out.detach(), {n: p.grad for n, p in backend.unet.named_parameters() if p.requires_grad}
    assert torch.equal(outs["fp8"][0], outs["plain"][0])
    assert outs["fp8"][1].keys() == outs["plain"][1].keys() == lora.keys()
    assert all(torch.equal(outs["fp8"][1][n], outs["plain"][1][n]) for n in lora)
    after = {n: p.dtype for n, p in fp8.unet.named_parameters() if n in stored}
    assert set(after.values()) == {FP8}, "a layer was left in the compute dtype"
    assert all(p is lora[n] for n, p in fp8.unet.named_parameters() if p.requires_grad), "a LoRA weight was replaced"


@needs_layerwise
def test_a_checkpointed_fp8_run_resumes_to_the_same_lora(demo_data, tmp_path, caplog):
    settings = dict(max_train_steps=2, save_steps=1, fp8_base=True)
    straight = train(fp8_cfg(demo_data, tmp_path / "a", **settings), progress=False)
    first = train(fp8_cfg(demo_data, tmp_path / "b", **settings), callbacks=StopAt(1), progress=False)
    assert first.status == "stopped" and first.steps == 1
    resumed = train(fp8_cfg(demo_data, tmp_path / "b", resume_from_checkpoint="latest", **settings), progress=False)
    assert resumed.status == "finished" and resumed.steps == 2
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming it without fp8_base would continue on other base weights: it says so
    path = ckpt.find_latest(tmp_path / "b")
    plain = fp8_cfg(demo_data, tmp_path / "b", max_train_steps=2)
    settings = ckpt.run_settings(plain.training, 4, 2, plain.data, plain.model)
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(ckpt.load_checkpoint(path), settings, path)
    assert "fp8_base True → False" in caplog.text


# --- refused, before any model loads ------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were refused")

    monkeypatch.setattr("lora_trainer.engine.trainer.load_backend", load)


def test_an_old_diffusers_is_refused_before_the_model_loads(demo_data, tmp_path, monkeypatch, no_model_load):
    """The WebUI's pin (diffusers 0.30.3) has no layerwise casting; with a newer one it is taken away here."""
    import diffusers
    from diffusers import ModelMixin

    if LAYERWISE:
        monkeypatch.delattr(ModelMixin, "enable_layerwise_casting")
    with pytest.raises(ConfigError, match=r"training\.fp8_base: needs diffusers 0\.33 or newer .*this is diffusers "
                                          + diffusers.__version__.replace(".", r"\.")):
        train(fp8_cfg(demo_data, tmp_path / "out", fp8_base=True), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_torch_without_float8_is_refused(demo_data, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setattr("lora_trainer.models.fp8.STORAGE_DTYPE", None)
    with pytest.raises(ConfigError, match=r"training\.fp8_base: needs PyTorch 2\.1 or newer"):
        train(fp8_cfg(demo_data, tmp_path / "out", fp8_base=True), progress=False)


def test_the_webui_model_is_refused_and_left_untouched(demo_data, tmp_path):
    """The WebUI's LDM UNet is not a diffusers model: refused whether the backend comes made or from make_backend,
    before a LoRA layer goes in."""
    pytest.importorskip("ldm")
    from ldm_model import TinyLatentDiffusion

    from lora_trainer.models.ldm import LdmBackend

    sd_model = TinyLatentDiffusion()
    backend = LdmBackend(sd_model, "tiny-ldm", torch.device("cpu"), torch.float32)
    before = {n: p.clone() for n, p in sd_model.state_dict().items()}
    assert not backend.can_fp8_base and load_backend(fp8_cfg(demo_data, tmp_path)).can_fp8_base
    refused = r"training\.fp8_base: this model \(LdmBackend\) cannot keep its UNet in float8"
    with pytest.raises(ConfigError, match=refused):
        train(fp8_cfg(demo_data, tmp_path / "a", fp8_base=True), backend=backend, progress=False)
    if LAYERWISE:  # (else the diffusers version is refused first, as above)
        with pytest.raises(ConfigError, match=refused):
            train(fp8_cfg(demo_data, tmp_path / "b", fp8_base=True), make_backend=lambda: backend, progress=False)
    assert sd_model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in sd_model.state_dict().items())


def test_fp8_base_with_compile_unet_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.fp8_base: true does not combine with training\.compile_unet"):
        config_from_dict({"train_data_dir": str(tmp_path), "fp8_base": True, "compile_unet": True})
    assert config_from_dict({"train_data_dir": str(tmp_path)}).training.fp8_base is False
