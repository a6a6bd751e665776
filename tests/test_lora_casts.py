"""Under autocast the trainer lets peft's LoRA layers take their input as it comes (engine.lora.lora_input_casts_off):
the same loss and gradients bit for bit, fewer full-size copies a step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine import run as run_module
from lora_trainer.engine.lora import add_lora, lora_input_casts_off, uncastable_lora_layers
from lora_trainer.engine.trainer import train
from lora_trainer.models import factory
from tests.test_train import make_cfg


def lora_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16)  # frozen, half precision
    add_lora(model, rank=4, alpha=4, dropout=0.0, target_modules=["0", "2"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.1  # the LoRA in fp32, B not zero: its branch counts
    layers = uncastable_lora_layers([model])
    if not layers:
        import peft

        pytest.skip(f"peft {peft.__version__} casts every LoRA input (no cast_input_dtype_enabled): nothing to skip")
    return model, layers


def step(model, x, casts_off: list):
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16), lora_input_casts_off(casts_off):
            loss = model(x).float().pow(2).mean()
        loss.backward()
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, copies


def test_skipping_the_input_casts_gives_the_same_loss_and_gradients_with_fewer_copies():
    model, layers = lora_model()
    assert len(layers) == 2
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    loss, grads, copies = step(model, x, [])
    loss_off, grads_off, copies_off = step(model, x, layers)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and len(grads) == 4  # A and B of both layers
    assert all(torch.equal(grads[n], grads_off[n]) for n in grads)
    assert copies_off < copies  # the input's cast to fp32 (and autocast's back) is gone from both layers
    assert all(layer.cast_input_dtype_enabled for layer in layers)  # restored on the way out


def test_the_casts_are_back_when_the_block_raises():
    model, layers = lora_model()
    with pytest.raises(RuntimeError), lora_input_casts_off(layers):
        raise RuntimeError("a step that fails")
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    with torch.no_grad():  # outside autocast the cast is what makes half-precision input meet fp32 LoRA weights
        assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("training", [{}, {"gradient_checkpointing": True}])
def test_a_bf16_run_trains_the_same_lora_with_and_without_the_casts(tmp_path, monkeypatch, training):
    """The trainer in bf16 (on the CPU here: the GPU's autocast path), three steps: the same LoRA file bit for bit
    whether peft casts the inputs or not; with gradient checkpointing the casts stay (the recomputed forward must
    save what the first one did)."""
    monkeypatch.setattr(factory, "pick_device", lambda mixed_precision: (torch.device("cpu"), "bf16"))
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    seen = []
    real = run_module.uncastable_lora_layers
    monkeypatch.setattr(run_module, "uncastable_lora_layers", lambda modules: seen.append(real(modules)) or seen[-1])
    files = [load_file(train(make_cfg(data, tmp_path / "uncast", max_train_steps=3, **training),
                             progress=False).lora_path)]
    if training:
        assert seen == []  # not asked: the casts stay with gradient checkpointing
        return
    if not seen[0]:
        import peft

        pytest.skip(f"peft {peft.__version__} casts every LoRA input: there is no other run to compare")
    monkeypatch.setattr(run_module, "uncastable_lora_layers", lambda modules: [])
    files.append(load_file(train(make_cfg(data, tmp_path / "cast", max_train_steps=3), progress=False).lora_path))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert any(bool(v.abs().sum()) for k, v in files[0].items() if "lora_up" in k)  # it trained
