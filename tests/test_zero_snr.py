"""Zero terminal SNR (model.zero_terminal_snr): the betas rescaled so the last timestep is pure noise, as the model
says (auto) or the config; v-prediction required; min-SNR in its v form stays finite there; the value used is in
the snapshot, the resume settings and the LoRA's metadata."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from safetensors import safe_open
from test_train import StopAt, make_cfg

import lora_trainer.engine.run as run_module
from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.loss import LossSettings, diffusion_loss, sample_timesteps, zero_terminal_snr_schedule
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError
from lora_trainer.models.tiny_sdxl import TINY_SDXL_V_NAME, tiny_sdxl_model_path


def sd_scheduler(**config):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config)


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)


def test_the_setting_reads_yaml_booleans_and_refuses_epsilon():
    base = {"train_data_dir": "x"}
    for given, want in [(True, "true"), (False, "false"), ("auto", "auto"), ("TRUE", "true")]:
        assert config_from_dict({**base, "zero_terminal_snr": given}).model.zero_terminal_snr == want
    with pytest.raises(ConfigError, match="model.zero_terminal_snr: 'maybe' is not one of auto, true, false"):
        config_from_dict({**base, "zero_terminal_snr": "maybe"})
    with pytest.raises(ConfigError, match="zero_terminal_snr: true needs the v-prediction target"):
        config_from_dict({**base, "zero_terminal_snr": True, "prediction_type": "epsilon"})


def test_the_schedule_follows_the_setting_and_the_model():
    plain, rescaled = sd_scheduler(), sd_scheduler(rescale_betas_zero_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 0 and float(rescaled.alphas_cumprod[-1]) == 0
    s, on = zero_terminal_snr_schedule(plain, "auto", "v_prediction")
    assert s is plain and not on
    s, on = zero_terminal_snr_schedule(plain, "true", "v_prediction")
    assert on and float(s.alphas_cumprod[-1]) == 0 and torch.equal(s.betas, rescaled.betas)
    s, on = zero_terminal_snr_schedule(rescaled, "auto", "v_prediction")  # the model says so
    assert s is rescaled and on
    s, on = zero_terminal_snr_schedule(rescaled, "false", "v_prediction")
    assert not on and torch.equal(s.alphas_cumprod, plain.alphas_cumprod)
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr: true.*predicts epsilon"):
        zero_terminal_snr_schedule(rescaled, "auto", "epsilon")
    with pytest.raises(ConfigError, match="model.zero_terminal_snr: true"):
        zero_terminal_snr_schedule(plain, "true", "epsilon")


def test_timesteps_include_the_terminal_step():
    scheduler = sd_scheduler()
    t = sample_timesteps(scheduler, 20000, torch.Generator().manual_seed(0), "cpu")
    assert int(t.min()) == 0 and int(t.max()) == scheduler.config.num_train_timesteps - 1


def test_min_snr_loss_stays_finite_at_the_last_timestep():
    """At SNR 0 the v form min(snr, γ)/(snr + 1) weighs the step 0; the epsilon form would be 0/0."""
    scheduler, _ = zero_terminal_snr_schedule(sd_scheduler(prediction_type="v_prediction"), "true", "v_prediction")
    backend = SimpleNamespace(noise_scheduler=scheduler, prediction_type="v_prediction",
                              predict=lambda noisy, t, cond: noisy * 0.5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    last = torch.full((2,), scheduler.config.num_train_timesteps - 1)
    mixed = torch.tensor([0, scheduler.config.num_train_timesteps - 1])
    for timesteps in (last, mixed):
        for gamma in (None, 5.0):
            loss = diffusion_loss(backend, latents, None, torch.Generator().manual_seed(1),
                                  loss_settings=LossSettings(min_snr_gamma=gamma),
                                  timesteps=timesteps)
            assert torch.isfinite(loss), (timesteps, gamma)
    weighted = diffusion_loss(backend, latents, None, torch.Generator().manual_seed(1),
                              loss_settings=LossSettings(min_snr_gamma=5.0), timesteps=last)
    assert float(weighted) == 0.0


def schedules_used(monkeypatch):
    seen = []
    real = run_module.diffusion_loss

    def spy(*args, scheduler=None, **kwargs):
        seen.append(scheduler)
        return real(*args, scheduler=scheduler, **kwargs)

    monkeypatch.setattr(run_module, "diffusion_loss", spy)
    return seen


def meta_of(result):
    with safe_open(result.lora_path, "pt") as f:
        return f.metadata()


def test_sd1_v_prediction_trains_with_zero_terminal_snr_and_records_it(demo_data, tmp_path, monkeypatch, caplog):
    seen = schedules_used(monkeypatch)
    cfg = make_cfg(demo_data, tmp_path / "out", max_train_steps=4, save_steps=2, min_snr_gamma=5.0)
    cfg.model.prediction_type, cfg.model.zero_terminal_snr = "v_prediction", "true"
    first = train(cfg, callbacks=StopAt(2), progress=False)
    assert seen and all(float(s.alphas_cumprod[-1]) == 0 for s in seen)
    assert meta_of(first)["ss_zero_terminal_snr"] == "True"
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["model"]["zero_terminal_snr"] == "true"
    checkpoint = yaml.safe_load((first.run_dir / "checkpoints" / "checkpoint-000002" / "checkpoint.json").read_text())
    assert checkpoint["settings"]["zero_terminal_snr"] == "true"
    # resumed with auto: the tiny model does not say so, so the schedule changes, and the run says it
    cfg.model.zero_terminal_snr, cfg.training.resume_from_checkpoint = "auto", "latest"
    seen.clear()
    with caplog.at_level(logging.WARNING):
        resumed = train(cfg, progress=False)
    assert "zero_terminal_snr 'true' → 'false'" in caplog.text
    assert resumed.steps == 4 and all(float(s.alphas_cumprod[-1]) > 0 for s in seen)
    assert meta_of(resumed)["ss_zero_terminal_snr"] == "False"


def test_auto_follows_an_sdxl_v_models_scheduler(demo_data, tmp_path, monkeypatch):
    model = tmp_path / "ztsnr-model"
    shutil.copytree(tiny_sdxl_model_path(TINY_SDXL_V_NAME), model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), rescale_betas_zero_snr=True)))
    seen = schedules_used(monkeypatch)
    cfg = make_cfg(demo_data, tmp_path / "out", max_train_steps=1, min_snr_gamma=5.0)
    cfg.model.base_model = str(model)
    result = train(cfg, progress=False)
    assert float(seen[0].alphas_cumprod[-1]) == 0 and meta_of(result)["ss_zero_terminal_snr"] == "True"
    assert meta_of(result)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_epsilon_model_with_zero_terminal_snr_is_refused_before_any_step(demo_data, tmp_path):
    cfg = make_cfg(demo_data, tmp_path / "out")
    cfg.model.zero_terminal_snr = "true"  # tiny-demo predicts epsilon (prediction_type auto)
    steps = StopAt(99)
    with pytest.raises(ConfigError, match="model.zero_terminal_snr: true.*predicts epsilon"):
        train(cfg, callbacks=steps, progress=False)
    assert steps.seen == []
