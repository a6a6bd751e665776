"""A non-finite loss gets a diagnosis: inputs, LoRA weights, the first layer that made it (fp16 overflow, LoRA,
the base model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.diagnose import StepInputs, diagnose_nonfinite_loss, first_nonfinite
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.lora import add_lora
from lora_trainer.engine.trainer import TrainingError, train
from lora_trainer.models.conditioning import Conditioning


def tiny_net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).to(dtype)


def diagnose(net, x, lora_params=(), grad_norm=None, latents=None, cond=None, precision="no"):
    inputs = StepInputs(latents if latents is not None else torch.zeros(2, 4),
                        Conditioning(cond if cond is not None else torch.zeros(2, 3)), [Path("a.png"), Path("b.png")],
                        ["x", "y"])
    return diagnose_nonfinite_loss(float("nan"), 7, precision, inputs, list(lora_params), grad_norm, {"unet": net},
                                   lambda: net(x).float().pow(2).mean(), lambda c: f"because of {c}")


def test_non_finite_inputs_are_named_before_anything_else():
    net = tiny_net()
    latents = torch.zeros(2, 4)
    latents[1, 0] = float("inf")
    text = diagnose(net, torch.ones(1, 8), latents=latents)
    assert "its inputs were not finite: the latents of b.png" in text and "learning_rate" not in text
    cond = torch.zeros(2, 3)
    cond[0, 1] = float("nan")
    assert "text conditioning was not finite, for the caption 'x': because of x" in diagnose(net, torch.ones(1, 8),
                                                                                             cond=cond)


def test_the_base_models_own_layer_is_named():
    net = tiny_net()
    with torch.no_grad():
        net[2].weight[3, 3] = float("inf")
    text = diagnose(net, torch.ones(1, 8))
    assert "first gave non-finite values in unet.2 (float32)" in text and "damaged checkpoint" in text
    assert "learning_rate" not in text


def test_an_fp16_overflow_is_called_one():
    net = tiny_net(torch.float16)
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # 8 inputs of 3e4 sum to 2.4e5, past fp16's 65504
    text = diagnose(net, torch.full((1, 8), 3e4, dtype=torch.float16), precision="fp16")
    assert "in unet.0 (float16)" in text and "fp16 overflow" in text and "bf16" in text


def test_grown_lora_weights_and_broken_updates_blame_the_learning_rate():
    net = tiny_net()
    params = add_lora(net, rank=2, alpha=2, dropout=0.0, target_modules=["2"])
    with torch.no_grad():
        for p in params:
            p.fill_(1e30)
    text = diagnose(net, torch.ones(1, 8), lora_params=params)
    assert "a LoRA layer, whose weights have grown to |w| up to 1e+30: lower training.learning_rate" in text
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    text = diagnose(net, torch.ones(1, 8), lora_params=params, grad_norm=torch.tensor(float("inf")))
    assert "LoRA weights were already non-finite (the backward pass of step 6 gave non-finite gradients)" in text


def test_hooks_come_off():
    net = tiny_net()
    with first_nonfinite({"unet": net}) as found:
        net(torch.ones(1, 8))
    assert found == [] and all(not m._forward_hooks for m in net.modules())


class BreakLayerAt(Callbacks):
    """After ``step``, one weight of the base UNet's first convolution becomes inf (a damaged weight)."""

    def __init__(self, unet, step):
        self.unet, self.step = unet, step

    def on_step(self, info):
        if info.step == self.step:
            with torch.no_grad():
                self.unet.conv_in.weight[0, 0, 0, 0] = float("inf")


def test_the_training_loop_reruns_the_step_and_names_the_layer(tmp_path):
    from lora_trainer.models.diffusers_backend import load_diffusers_backend

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    cfg = config_from_dict({"train_data_dir": str(data), "resolution": 64, "output_dir": str(tmp_path / "out"),
                            "max_train_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 0,
                            "lora_dropout": 0.0, "log_with": "none", "nan_max_retries": 0})  # (no NaN guard)
    backend = load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3: the forward pass first gave non-finite "
                                            r"values in unet\.conv_in \(float32\).*damaged checkpoint"):
        train(cfg, backend=backend, callbacks=BreakLayerAt(backend.unet, 2), progress=False)
