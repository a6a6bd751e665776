"""A UI's training run: background thread, status, samples, Stop, one at a time, publish, strength sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.session import TrainingSession, format_status
from lora_trainer.ui.standalone_host import DiffusersHost


def cfg_for(tmp_path, steps, **extra):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, "max_train_steps": steps,
                             "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 0,
                             "learning_rate": 1e-2, "lora_dropout": 0.0, "output_dir": str(tmp_path / "run"),
                             "output_name": "ui_lora", "save_precision": "fp32", "log_with": "none", **extra})


def test_session_trains_samples_and_publishes(tmp_path, monkeypatch):
    import contextlib

    from lora_trainer.models.diffusers_backend import DiffusersBackend

    on_device = []
    real = DiffusersBackend.encoders_on_device

    @contextlib.contextmanager
    def counted(self):  # a sample needs the encoders that wait on the CPU (on a GPU) back where the UNet is
        with real(self):
            on_device.append(True)
            yield

    monkeypatch.setattr(DiffusersBackend, "encoders_on_device", counted)
    host = DiffusersHost(tmp_path / "Lora")
    session = TrainingSession.start(host, cfg_for(tmp_path, 4), sample_prompt="demo style", sample_every=2)
    status = session.wait(120)
    assert status.state == "done", status.message
    assert status.published == tmp_path / "Lora" / "ui_lora.safetensors" and status.published.is_file()
    assert [s for s, _ in status.losses] == [1, 2, 3, 4]
    assert [s for s, _ in status.samples] == [2, 4] and status.samples[0][1].size == (64, 64)
    assert len(on_device) == 2
    assert "step 4/4" in format_status(status)
    # the model came back without LoRA layers
    again = TrainingSession.start(host, cfg_for(tmp_path, 1, output_name="ui_lora"))
    assert again.wait(120).state == "done"
    assert again.status.published.name == "ui_lora_1.safetensors"  # never over the first one


def test_stop_and_one_at_a_time(tmp_path):
    host = DiffusersHost(tmp_path / "Lora")
    session = TrainingSession.start(host, cfg_for(tmp_path, 500))
    with pytest.raises(LoraTrainerError, match="already running"):
        TrainingSession.start(host, cfg_for(tmp_path, 2))
    session.stop()
    status = session.wait(120)
    assert status.state == "stopped" and 0 < status.result.steps < 500
    assert status.published.is_file()
    assert "Its checkpoint is kept: to go on, tick 'Continue this name's stopped run" in status.message


def test_the_tabs_continue_field_goes_on_from_the_stopped_runs_checkpoint(tmp_path):
    """Stopped in the UI, the run continues from its checkpoint when the field is ticked (the same name): it ends at
    the step count of the uninterrupted run, in the same run folder; unticked, the same name starts a new run."""
    from lora_trainer.ui import run_config

    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    shown = {key: run_config.field_default(key, config_from_dict({"train_data_dir": "-"}))
             for key, *_ in run_config.ADVANCED}
    assert shown["resume_from_checkpoint"] is False

    def cfg(**changed):
        advanced = {**shown, "resolution": 64, "max_train_steps": 6, "batch_size": 2, "save_steps": 0, **changed}
        return run_config.build_config(host, str(data), "cont", "Style (defaults)", "tiny-demo", advanced)

    class StopAtTwo(TrainingSession):
        def on_step(self, info):
            super().on_step(info)
            if info.step == 2:
                self.stop()

    first = StopAtTwo.start(host, cfg()).wait(120)
    assert first.state == "stopped" and first.result.steps == 2, first.message
    assert cfg(resume_from_checkpoint=True).training.resume_from_checkpoint == "latest"
    class Seen(TrainingSession):
        def on_resume(self, step):
            super().on_resume(step)
            self.resumed_at = (step, self.status.step, self.status.message)

    session = Seen.start(host, cfg(resume_from_checkpoint=True))
    resumed = session.wait(120)
    assert session.resumed_at == (2, 2, "continuing from the checkpoint of step 2")
    assert resumed.state == "done" and resumed.result.run_dir == first.result.run_dir, resumed.message
    assert [s for s, _ in resumed.losses] == [3, 4, 5, 6]
    fresh = TrainingSession.start(host, cfg()).wait(120)
    assert fresh.state == "done" and fresh.result.run_dir != first.result.run_dir
    assert [s for s, _ in fresh.losses][0] == 1


def test_errors_reach_the_ui_before_the_model_loads(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = cfg_for(tmp_path, 2)
    cfg.data.train_data_dir = str(empty)
    loads = []
    monkeypatch.setattr(DiffusersHost, "make_backend", lambda self, cfg: loads.append(cfg))
    status = TrainingSession.start(DiffusersHost(tmp_path / "Lora"), cfg).wait(60)
    assert status.state == "error" and "no usable images" in status.message
    assert loads == []  # the dataset is checked first: no model was loaded for a run that cannot start


def test_strength_sweep(tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        pytest.skip("the standalone app's sweep uses diffusers' PEFT backend (transformers >= 4.34)")
    host = DiffusersHost(tmp_path / "Lora")
    status = TrainingSession.start(host, cfg_for(tmp_path, 3)).wait(120)
    images = host.sweep(status.published, "demo style", "", [0.0, 1.0], seed=3, steps=2)
    assert [s for s, _ in images] == [0.0, 1.0]
    import torch

    from lora_trainer.models.diffusers_backend import load_pipeline

    pipe, _ = load_pipeline("tiny-demo")  # no LoRA at all
    base = pipe("demo style", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(images[0][1]), np.asarray(base))  # strength 0 is the base model
    assert not np.array_equal(np.asarray(images[0][1]), np.asarray(images[1][1]))


def test_the_status_says_which_sample_renders_and_keeps_the_run_and_its_skipped_images(tmp_path):
    from PIL import Image

    seen = []

    class SlowSampler(DiffusersHost):
        def sample(self, backend, prompt, seed, steps=20):  # what the tab shows while a sample renders
            seen.append((session.status.message, format_status(session.status)))
            return Image.new("RGB", (8, 8))

    cfg = cfg_for(tmp_path, 4)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    session = TrainingSession(SlowSampler(tmp_path / "Lora"), cfg, sample_prompt="demo style", sample_every=2)
    session._thread.start()
    status = session.wait(120)
    assert status.state == "done", status.message
    assert [m for m, _ in seen] == ["making sample 1/2", "making sample 2/2"]
    assert seen[-1][1].endswith("— making sample 2/2")  # not "ETA 00:00:00 — training"
    assert status.run_dir == tmp_path / "run"
    assert str(status.run_dir) not in format_status(status)
    assert status.result.images_skipped == 1 and [Path(s["path"]).name for s in status.skipped] == ["broken.png"]
    assert status.skipped[0]["reason"]


# --- the model family before the model loads, and samples on the run's noise schedule (issue 16)
def test_the_dataset_check_runs_at_the_resolution_of_the_hosts_model_family(tmp_path, monkeypatch, caplog):
    """A UI's run checks the images against the resolution it will train at: the host's model (here SDXL, the
    WebUI's loaded one: the config's base_model says nothing) decides it where the config sets none."""
    import logging

    from PIL import Image

    class SdxlLoaded(DiffusersHost):
        chooses_base_model = False  # (as the WebUI: the loaded model, not model.base_model)

        def model_family(self, base_model=None):
            return "sdxl"

        def make_backend(self, cfg):
            raise LoraTrainerError("no model in this test")

    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        Image.new("RGB", (600, 600), (k * 40, 90, 200)).save(data / f"img_{k}.png")
        (data / f"img_{k}.txt").write_text(f"a picture {k}")
    cfg = config_from_dict({"train_data_dir": str(data), "output_dir": str(tmp_path / "run"), "log_with": "none"})
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        status = TrainingSession.start(SdxlLoaded(tmp_path / "Lora"), cfg).wait(60)
    assert status.state == "error" and "no model in this test" in status.message
    assert "smaller than the training resolution 1024" in caplog.text


class SpiedPipelines:
    """Records the scheduler and the arguments of every pipeline call (SD and SDXL) instead of sampling."""

    def __init__(self, monkeypatch):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from PIL import Image

        self.calls = []

        def call(pipe, prompt, **kwargs):
            self.calls.append({"pipe": pipe, "scheduler": pipe.scheduler, **kwargs})
            return type("Out", (), {"images": [Image.new("RGB", (8, 8))]})

        for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
            monkeypatch.setattr(cls, "__call__", call)


def test_samples_during_training_use_the_runs_zero_snr_schedule_and_v_prediction(tmp_path, monkeypatch):
    """model.zero_terminal_snr: true on a v-prediction model whose scheduler is not rescaled: the samples' scheduler
    is rescaled too, with trailing timesteps and guidance rescale 0.7 (arXiv 2305.08891); the pipeline's own comes
    back after. An SD model trained with prediction_type v_prediction samples with v_prediction."""
    from lora_trainer.engine.loss import has_zero_terminal_snr

    spy = SpiedPipelines(monkeypatch)
    cfg = cfg_for(tmp_path, 1, base_model="tiny-sdxl-v", zero_terminal_snr="true", output_name="ztsnr")
    status = TrainingSession.start(DiffusersHost(tmp_path / "Lora"), cfg, sample_prompt="demo",
                                   sample_every=1).wait(180)
    assert status.state == "done", status.message
    (call,) = spy.calls
    sampler = call["scheduler"].config
    assert sampler.rescale_betas_zero_snr and sampler.timestep_spacing == "trailing"
    assert sampler.prediction_type == "v_prediction" and call["guidance_rescale"] == 0.7
    assert float(call["scheduler"].alphas_cumprod[-1]) < 1e-6  # (Euler keeps 2**-24 for its last sigma)
    assert not has_zero_terminal_snr(call["pipe"].scheduler)  # the model's own scheduler is back

    spy.calls.clear()
    cfg = cfg_for(tmp_path, 1, prediction_type="v_prediction", output_name="vpred")  # tiny-demo: epsilon
    status = TrainingSession.start(DiffusersHost(tmp_path / "Lora"), cfg, sample_prompt="demo",
                                   sample_every=1).wait(180)
    assert status.state == "done", status.message
    (call,) = spy.calls
    assert call["scheduler"].config.prediction_type == "v_prediction" and "guidance_rescale" not in call
    assert not call["scheduler"].config.get("rescale_betas_zero_snr", False)


def test_a_zero_snr_sample_is_an_image(tmp_path):
    """The rescaled sampler really samples (no NaN at the pure-noise first step) on both diffusers releases."""
    host = DiffusersHost(tmp_path / "Lora")
    backend = host.make_backend(cfg_for(tmp_path, 1, base_model="tiny-sdxl-v", zero_terminal_snr="true"))
    image = np.asarray(host.sample(backend, "demo", seed=1, steps=3))
    assert image.shape[:2] == (64, 64) and image.std() > 0


def test_the_sampling_scheduler_follows_the_training():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    from lora_trainer.engine.sampling import guidance_rescale, sampling_scheduler, trained_schedule

    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    euler = EulerDiscreteScheduler(**sd)
    assert sampling_scheduler(euler, "epsilon", False) is euler  # nothing to change
    ddim = sampling_scheduler(PNDMScheduler(**sd, skip_prk_steps=True), "v_prediction", True)  # PNDM cannot rescale
    assert isinstance(ddim, DDIMScheduler) and ddim.config.rescale_betas_zero_snr and not ddim.config.clip_sample
    assert float(ddim.alphas_cumprod[-1]) == 0.0 and ddim.config.timestep_spacing == "trailing"
    off = sampling_scheduler(EulerDiscreteScheduler(**sd, prediction_type="v_prediction", rescale_betas_zero_snr=True),
                             "v_prediction", False)  # zero_terminal_snr: false on a rescaled model
    assert not off.config.rescale_betas_zero_snr
    assert (guidance_rescale("v_prediction", True), guidance_rescale("v_prediction", False)) == (0.7, 0.0)
    assert trained_schedule({"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}, euler) == (
        "v_prediction", True)
    assert trained_schedule({}, euler) == ("epsilon", False)  # a LoRA without the keys: the model's own


def test_the_sweep_samples_an_sdxl_lora_on_its_zero_snr_schedule(tmp_path, monkeypatch):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        pytest.skip("the standalone app's sweep uses diffusers' PEFT backend (transformers >= 4.34)")
    host = DiffusersHost(tmp_path / "Lora", base_model="tiny-sdxl-v")
    cfg = cfg_for(tmp_path, 1, base_model="tiny-sdxl-v", zero_terminal_snr="true", output_name="xl")
    status = TrainingSession.start(host, cfg).wait(180)
    assert status.state == "done", status.message
    spy = SpiedPipelines(monkeypatch)
    images = host.sweep(status.published, "demo", "", [0.0, 1.0], seed=3, steps=2)
    assert [s for s, _ in images] == [0.0, 1.0] and len(spy.calls) == 2
    assert all(c["scheduler"].config.rescale_betas_zero_snr and c["guidance_rescale"] == 0.7 for c in spy.calls)


def test_a_nan_rollback_replaces_the_plotted_steps_it_trains_again(tmp_path):
    """engine.guard rolls back to its last good state and trains those steps again: the loss plot keeps one point
    per step, the newest (a validation point of a rolled-back step goes too), so its steps only rise."""
    from lora_trainer.engine.events import StepInfo

    session = TrainingSession(DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs"), cfg_for(tmp_path, 6))
    for step, loss in ((1, 0.9), (2, 0.8), (3, float("nan")), (2, 0.7), (3, 0.6), (4, 0.5)):
        if step == 3 and loss != loss:
            session.on_validation(2, 0.85)
            continue
        session.on_step(StepInfo(step, 6, 1, loss, loss, 1e-4, 1.0, 1.0))
    assert session.status.losses == [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)]
    assert session.status.validation == []
