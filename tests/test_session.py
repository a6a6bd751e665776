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
