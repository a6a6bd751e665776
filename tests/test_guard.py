"""Guard rails: the NaN guard rolls back and goes on (engine.guard); the disk is checked before a run and a full disk
mid-run keeps the last good checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_cfg

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.checkpoint import DiskFull, list_checkpoints, load_checkpoint
from lora_trainer.engine.events import Callbacks
from lora_trainer.engine.trainer import TrainingError, train
from lora_trainer.models.diffusers_backend import load_diffusers_backend


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=6, resolution=64, seed=0)


@pytest.fixture
def backend():
    return load_diffusers_backend("tiny-demo", torch.device("cpu"), torch.float32)


class Steps(Callbacks):
    def __init__(self):
        self.seen = []  # (step, loss, lr)

    def on_step(self, info):
        self.seen.append((info.step, info.loss, info.lr))


class NanGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, backend, calls: set[int], how="loss"):
    """The backend's prediction goes NaN (or gives NaN gradients) on the given calls (1-based); returns the
    count of calls so far."""
    count, predict = {"n": 0}, backend.predict

    def predict_with_nan(*args):
        count["n"] += 1
        out = predict(*args)
        if count["n"] not in calls:
            return out
        return out * float("nan") if how == "loss" else NanGradient.apply(out)

    monkeypatch.setattr(backend, "predict", predict_with_nan)
    return count


def finite_lora(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(path).values())


def test_a_nan_loss_rolls_back_skips_the_batch_lowers_the_lr_and_finishes(demo_data, tmp_path, monkeypatch, backend,
                                                                          caplog):
    # batch 2, no accumulation: one prediction per step; the 3rd goes NaN, the 4th is the diagnosis' re-run
    count = poison(monkeypatch, backend, {3})
    steps = Steps()
    with caplog.at_level(logging.WARNING, logger="lora_trainer.engine.guard"):
        result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=5, nan_guard_every=2), backend=backend,
                       callbacks=steps, progress=False)
    assert result.status == "finished" and result.steps == 5 and finite_lora(result.lora_path)
    # steps 1-2, step 3 NaN + its diagnosis, back to step 2; step 3's batch skipped (no update), steps 4-5
    assert count["n"] == 6
    assert [s for s, *_ in steps.seen] == [1, 2, 4, 5]
    assert [lr for *_, lr in steps.seen] == [1e-3, 1e-3, 5e-4, 5e-4]
    [rollback] = json.loads((result.run_dir / "summary.json").read_text())["nan_rollbacks"]
    assert rollback["at_step"] == 3 and rollback["rolled_back_to"] == 2 and rollback["cause"] == "loss"
    assert rollback["learning_rates"] == [5e-4] and "loss became nan at step 3" in rollback["diagnosis"]
    files = [p.split("/")[-1] for p in rollback["skipped"]]
    assert len(files) == 2 and all(f.startswith("demo_") for f in files)
    [line] = [r.getMessage() for r in caplog.records if "NaN guard" in r.getMessage()]
    assert "rolled back to step 2" in line.lower() and all(f in line for f in files) and "lowered to 0.0005" in line


def test_a_rollback_replays_the_kept_steps_with_the_same_noise(demo_data, tmp_path, monkeypatch, backend):
    # default guard (every 10 steps): a NaN at step 3 goes back to step 0; step 1 runs again on the same batch,
    # noise and timesteps (the RNG states came back with the weights), so its loss is the same to the bit
    poison(monkeypatch, backend, {3})
    steps = Steps()
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=4, lora_dropout=0.1), backend=backend,
                   callbacks=steps, progress=False)
    assert result.status == "finished" and finite_lora(result.lora_path)
    assert [s for s, *_ in steps.seen] == [1, 2, 1, 2, 4]
    assert steps.seen[2][1] == steps.seen[0][1]  # (step 2's differs: step 1's update had half the lr)
    assert steps.seen[3][1] != steps.seen[1][1]


def test_nan_gradients_roll_back_before_the_optimizer_applies_them(demo_data, tmp_path, monkeypatch, backend):
    poison(monkeypatch, backend, {3}, how="gradients")
    result = train(make_cfg(demo_data, tmp_path / "out", max_train_steps=4, nan_guard_every=1), backend=backend,
                   progress=False)
    assert result.status == "finished" and finite_lora(result.lora_path)
    [rollback] = result.extra["nan_rollbacks"]
    assert rollback["cause"] == "gradients" and rollback["at_step"] == 3 and rollback["rolled_back_to"] == 2
    assert "gradients became non-finite at step 3 although its loss was finite" in rollback["diagnosis"]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_more_nans_than_retries_stop_with_the_diagnosis(demo_data, tmp_path, monkeypatch, backend, max_grad_norm):
    poison(monkeypatch, backend, set(range(3, 100)))  # every prediction from the 3rd on
    with pytest.raises(TrainingError, match=r"loss became nan at step 5: .*learning_rate.* \(the NaN guard had "
                                            r"rolled back 2 times, to step 2 last, lowering the learning rate to "
                                            r"0\.00025\)"):
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=8, nan_guard_every=2, nan_max_retries=2,
                       max_grad_norm=max_grad_norm), backend=backend, progress=False)
    # step 3: NaN, back to 2; step 3 skipped (no update), step 4: NaN, back to 2; steps 3-4 skipped, step 5: NaN.
    # The last good state is saved: step 2's weights, at step 4 (steps 3 and 4 took no update)
    [(step, path)] = list_checkpoints(tmp_path / "out")
    assert step == 4 and finite_lora(path / "lora_state.safetensors")


def test_without_the_guard_the_first_nan_stops(demo_data, tmp_path, monkeypatch, backend):
    count = poison(monkeypatch, backend, {3})
    with pytest.raises(TrainingError, match="loss became nan at step 3") as e:
        train(make_cfg(demo_data, tmp_path / "out", max_train_steps=5, nan_max_retries=0), backend=backend,
              progress=False)
    assert "NaN guard" not in str(e.value) and count["n"] == 4
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_run_without_nan_is_the_same_with_the_guard_on_and_off(demo_data, tmp_path, max_grad_norm):
    # everything that draws random numbers, accumulation over an uneven epoch; the guard keeps state every step
    settings = dict(max_train_steps=5, gradient_accumulation_steps=2, lora_dropout=0.1, lr_scheduler="cosine",
                    lr_warmup_steps=2, noise_offset=0.05, min_snr_gamma=5.0, save_steps=2, max_grad_norm=max_grad_norm)
    on = train(make_cfg(demo_data, tmp_path / "on", nan_guard_every=1, **settings), progress=False)
    off = train(make_cfg(demo_data, tmp_path / "off", nan_guard_every=0, **settings), progress=False)
    a, b = load_file(on.lora_path), load_file(off.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on.final_loss == off.final_loss and on.extra["nan_rollbacks"] == []
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))


def test_guard_settings_are_checked():
    from lora_trainer.config import config_from_dict
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training.nan_lr_factor: 1.5 is out of range: must be > 0 and <= 1"):
        config_from_dict({"train_data_dir": "x", "nan_lr_factor": 1.5})
    with pytest.raises(ConfigError, match=r"training.nan_max_retries: -1 is out of range"):
        config_from_dict({"train_data_dir": "x", "nan_max_retries": -1})
    assert math.isclose(config_from_dict({"train_data_dir": "x"}).training.nan_lr_factor, 0.5)


# --- the disk
def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_run_that_would_not_fit_on_the_disk_is_refused_before_step_1(demo_data, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5 << 20))  # 5 MB free
    out = tmp_path / "out"
    with pytest.raises(DiskFull, match=rf"not enough free disk space for {out}: the run will write about "
                                       r"[\d.]+ MB \(checkpoints [\d.]+ [KM]B, latent cache [\d.]+ KB, LoRA files .*\) "
                                       r"and 5\.0 MB is free there.*checkpoints_total_limit"):
        train(make_cfg(demo_data, out, save_steps=1, cache_latents_to_disk=True), progress=False)
    assert not out.exists()  # (nothing trained: no run folder left behind)


def test_the_estimate_counts_what_the_run_writes(demo_data):
    from lora_trainer.engine.batches import Plan
    from lora_trainer.engine.guard import disk_estimate

    cfg = make_cfg(demo_data, "out", save_steps=1, max_train_steps=10, checkpoints_total_limit=3,
                   cache_latents_to_disk=True)
    n = 1_000_000
    est = disk_estimate(cfg, Plan.from_config(cfg, 6), n)
    assert est["checkpoints"] == 4 * (12 * n + (1 << 20))  # 3 kept + the one being written; fp32 LoRA + AdamW's 2
    assert est["latent cache"] == 6 * 2 * (2 * 4 * 4 * 8 * 8 + 4096)  # 6 images and their mirror, mean and std
    assert est["LoRA files"] == 2 * (4 * n + (1 << 18))  # kohya + diffusers, fp32
    unlimited = make_cfg(demo_data, "out", save_steps=2, max_train_steps=10, checkpoints_total_limit=0)
    assert disk_estimate(unlimited, Plan.from_config(unlimited, 6), n)["checkpoints"] == 6 * (12 * n + (1 << 20))


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one_and_says_so(demo_data, tmp_path, monkeypatch):
    import lora_trainer.engine.checkpoint as ckpt_module

    real, saves = ckpt_module.torch.save, []

    def disk_full_at_the_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"partial")  # half of it made it to the disk
            full_disk()
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full_at_the_second_checkpoint)
    out = tmp_path / "out"
    with pytest.raises(DiskFull, match=r"the disk is full: writing checkpoint .*checkpoint-000004 failed \(No space "
                                       r"left on device\).*the last good checkpoint, .*checkpoint-000002 \(step 2\), "
                                       r"is intact.*resume_from_checkpoint: latest"):
        train(make_cfg(demo_data, out, max_train_steps=6, save_steps=2, checkpoints_total_limit=1), progress=False)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002"]  # no temp folder left
    restored = load_checkpoint(out / "checkpoints" / "checkpoint-000002")
    assert restored.step == 2 and all(bool(torch.isfinite(v).all()) for v in restored.weights.values())
    assert not (out / "test_lora.safetensors").exists()


def test_a_full_disk_while_writing_the_lora_names_the_last_checkpoint(demo_data, tmp_path, monkeypatch):
    import lora_trainer.engine.outputs as outputs

    monkeypatch.setattr(outputs, "save_kohya_lora", full_disk)
    out = tmp_path / "out"
    # (the run's final checkpoint was saved before the export: it is the last good one)
    with pytest.raises(DiskFull, match=r"writing the LoRA files of step 4 into .*out failed.*checkpoint-000004 "
                                       r"\(step 4\), is intact"):
        train(make_cfg(demo_data, out, max_train_steps=4, save_steps=3), progress=False)


def test_a_copy_that_fails_leaves_no_half_written_file(tmp_path, monkeypatch):
    from lora_trainer.utils import fsio

    def no_hard_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    def half_a_copy(src, out):
        out.write(src.read(3))
        full_disk()

    monkeypatch.setattr(fsio.os, "link", no_hard_links)
    monkeypatch.setattr(fsio.shutil, "copyfileobj", half_a_copy)
    with pytest.raises(OSError, match="No space left"):
        fsio.write_new(tmp_path / "lora.safetensors", lambda p: p.write_bytes(b"0123456789"))
    assert list(tmp_path.iterdir()) == []
