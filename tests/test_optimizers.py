"""training.optimizer beyond AdamW: Prodigy (prodigyopt; it finds its own step size, the learning rates default to
1.0) and Adafactor (transformers'), with training.optimizer_args as a mapping or as kohya's configs write them; an
argument the optimizer does not take is refused before the model loads."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import StopAt, make_cfg

from lora_trainer.config import config_from_dict, with_family_defaults
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine import optim
from lora_trainer.engine.guard import optimizer_state_bytes
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError

HAS_PRODIGY = importlib.util.find_spec("prodigyopt") is not None


def training(**keys):
    return config_from_dict({"train_data_dir": "unused", **keys}).training


@pytest.mark.parametrize("written", [
    {"d_coef": 2, "decouple": True, "betas": [0.9, 0.99]},
    ["d_coef=2", "decouple=True", "betas=0.9,0.99"],  # (kohya's toml)
    "d_coef=2 decouple=True betas=0.9,0.99",  # (kohya_ss's GUI field)
])
def test_optimizer_args_are_read_as_written(written):
    args = training(optimizer_type="Prodigy", optimizer_args=written).optimizer_args
    assert args["d_coef"] == 2 and args["decouple"] is True and tuple(args["betas"]) == (0.9, 0.99)


def test_optimizer_args_that_are_not_arguments_say_so():
    with pytest.raises(ConfigError, match="training.optimizer_args: expected name=value, got 'decouple'"):
        training(optimizer_args=["decouple"])
    with pytest.raises(ConfigError, match="expected a mapping of argument names"):
        training(optimizer_args=3)


def test_prodigy_learning_rates_default_to_one_even_for_sdxl(caplog):
    caplog.set_level(logging.INFO, logger="lora_trainer")
    cfg = config_from_dict({"train_data_dir": "unused", "optimizer": "prodigy"})
    assert (cfg.training.learning_rate, cfg.training.text_encoder_lr) == (1.0, 1.0)
    assert with_family_defaults(cfg, "sdxl")[0].training.learning_rate == 1.0  # (not SDXL's 1e-4)
    assert any("learning_rate and text_encoder_lr 1 (not set in the config" in r.message for r in caplog.records)
    caplog.clear()
    assert training(optimizer="prodigy", learning_rate=1e-4).learning_rate == 1e-4
    assert any("learning_rate 0.0001 scales its own step size" in r.message for r in caplog.records)


def test_an_argument_the_optimizer_does_not_take_stops_before_the_model_loads():
    with pytest.raises(ConfigError, match=r"adamw refused them .*'d_coef'.*its arguments: lr, betas, eps"):
        optim.check_optimizer(training(optimizer_args={"d_coef": 2}))
    with pytest.raises(ConfigError, match="relative_step: true makes Adafactor pick its own learning rate"):
        optim.check_optimizer(training(optimizer="adafactor", optimizer_args={"relative_step": True}))


def test_a_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ConfigError, match="'prodigy' needs the prodigyopt package \\(pip install prodigyopt\\)"):
        optim.check_optimizer(training(optimizer="prodigy"))


def test_a_rollback_restores_the_optimizers_own_step_size():
    """The NaN guard's rollback puts back each parameter group's own state too (Prodigy keeps its step size d there),
    then lowers the learning rate."""
    from collections import deque
    from types import SimpleNamespace

    from lora_trainer.engine.guard import NanGuard

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}])
    opt.param_groups[0]["d"] = 1e-6
    run = SimpleNamespace(step=0, params=lambda: [p], optimizer=opt, generator=torch.Generator(), losses=deque(),
                          first_loss=None, bar=None, grad_norm=None,
                          lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    guard = NanGuard(every=1, max_retries=3)
    guard.take(run)
    opt.param_groups[0]["d"] = 5.0  # (grown in the steps that went non-finite)
    guard._restore(run, guard.snapshot_)
    assert opt.param_groups[0]["d"] == 1e-6 and opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_estimate_counts_each_optimizers_state():
    assert [optimizer_state_bytes(training(optimizer=o)) for o in ("adamw", "prodigy", "adafactor")] == [8, 16, 0]
    assert optimizer_state_bytes(training(optimizer="adafactor", optimizer_args={"beta1": 0.9})) == 4


@pytest.mark.parametrize("name", [
    pytest.param("prodigy", marks=pytest.mark.skipif(not HAS_PRODIGY, reason="needs prodigyopt")),
    "adafactor",
])
def test_each_optimizer_trains_and_resumes_to_the_same_lora(name, tmp_path):
    """It moves the LoRA, its state goes into the checkpoint (read back with weights_only) and a resumed run ends
    where the straight one does; the LoRA's metadata names it with its arguments."""
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    args = {"d_coef": 2.0} if name == "prodigy" else {"beta1": 0.9}
    settings = dict(max_train_steps=4, save_steps=2, optimizer=name, optimizer_args=args)
    if name == "adafactor":
        settings["learning_rate"] = 1e-3
    else:
        settings.update(learning_rate=1.0, text_encoder_lr=1.0)
    straight = train(make_cfg(data, tmp_path / "a", **settings), progress=False)
    first = train(make_cfg(data, tmp_path / "b", **settings), callbacks=StopAt(2), progress=False)
    assert first.status == "stopped" and first.steps == 2
    resumed = train(make_cfg(data, tmp_path / "b", resume_from_checkpoint="latest", **settings), progress=False)
    assert resumed.steps == 4
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))
    with safe_open(str(straight.lora_path), "pt") as f:
        expected = "prodigy(d_coef=2.0)" if name == "prodigy" else "adafactor(beta1=0.9)"
        assert f.metadata()["ss_optimizer"] == expected


def test_a_resume_with_another_optimizer_stops_before_the_model_loads(tmp_path, monkeypatch):
    """Its state cannot carry over (AdamW's moments are not Adafactor's): refused, naming both, before any model
    loads (it crashed at the first step, after the caches, with a KeyError)."""
    from lora_trainer.engine import trainer

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    first = train(make_cfg(data, tmp_path / "b", max_train_steps=4, save_steps=2), callbacks=StopAt(2),
                  progress=False)
    assert first.status == "stopped"

    def no_model(cfg):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "load_backend", no_model)
    with pytest.raises(ConfigError, match=r"training.optimizer: .*checkpoint-000002 was trained with 'adamw' and "
                                          r"this run has 'adafactor'.*set optimizer: adamw, or start a new run"):
        train(make_cfg(data, tmp_path / "b", max_train_steps=4, save_steps=2, optimizer="adafactor",
                       resume_from_checkpoint="latest"), progress=False)
    with pytest.raises(ConfigError, match=r"training.optimizer_args: amsgrad: None in the checkpoint, True now"):
        train(make_cfg(data, tmp_path / "b", max_train_steps=4, save_steps=2, optimizer_args={"amsgrad": True},
                       resume_from_checkpoint="latest"), progress=False)


def test_a_resume_applies_the_learning_rate_and_arguments_changed_since(tmp_path, caplog, monkeypatch):
    """The checkpoint's optimizer state holds its learning rate and arguments; those the config changed since apply
    (the learning rate at the schedule's current step), and the log says which."""
    from lora_trainer.engine import trainer

    seen = {}
    real = trainer.resume

    def resume(run, restored, resume_from):
        real(run, restored, resume_from)
        seen.update(lr=run.optimizer.param_groups[0]["lr"], wd=run.optimizer.param_groups[0]["weight_decay"],
                    base=list(run.lr_scheduler.base_lrs))

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    settings = dict(max_train_steps=4, save_steps=2, lr_scheduler="linear")
    train(make_cfg(data, tmp_path / "b", **settings), callbacks=StopAt(2), progress=False)
    caplog.set_level(logging.INFO, logger="lora_trainer")
    monkeypatch.setattr(trainer, "resume", resume)
    train(make_cfg(data, tmp_path / "b", resume_from_checkpoint="latest", learning_rate=4e-3, weight_decay=0.3,
                   **settings), progress=False)
    assert seen["base"] == [4e-3] and seen["wd"] == 0.3
    assert seen["lr"] == pytest.approx(4e-3 * 2 / 4)  # (linear decay over 4 steps, at step 2)
    assert any("unet weight_decay 0.01 → 0.3; unet learning rate 0.001 → 0.004" in r.message for r in caplog.records)
