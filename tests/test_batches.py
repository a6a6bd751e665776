"""The order of the micro-batches, and the stream that decodes them ahead: one for the whole run."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.batches import Plan, batch_stream, epoch_batches, schedule
from lora_trainer.engine.trainer import train
from test_train import StopAt, make_cfg


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=5, resolution=64, seed=0)


def test_schedule_is_the_epochs_in_a_row_and_a_resume_continues_it():
    plan = Plan(num_images=5, batch_size=2, grad_accum=2, total_steps=5)  # 3 batches = 2 steps an epoch
    assert plan.epochs == 3
    whole = list(schedule(plan, seed=3, step=0))
    assert [b for _, _, b in whole] == [b for e in range(3) for b in epoch_batches(5, 2, 3, e)]
    assert [(e, i) for e, i, _ in whole] == [(e, i) for e in range(3) for i in range(3)]
    assert epoch_batches(5, 2, 3, 0) != epoch_batches(5, 2, 3, 1)  # each epoch shuffled anew
    # after step 3 (epoch 1's first step: its 2 micro-batches done) the run goes on at epoch 1, batch 2
    assert list(schedule(plan, seed=3, step=3)) == whole[5:]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_decodes_every_batch_in_order(demo_data, workers):
    samples = scan_dataset(demo_data).samples
    dataset = ImageDataset(samples, 64)
    plan = Plan(num_images=5, batch_size=2, grad_accum=1, total_steps=7)
    got = list(batch_stream(plan, 3, 0, dataset, [s.caption for s in samples], workers))
    assert [(e, i) for e, i, _ in got] == [(e, i) for e, i, _ in schedule(plan, 3, 0)]
    for (_, _, want), (_, _, batch) in zip(schedule(plan, 3, 0), got):
        assert batch["indices"].tolist() == want
        assert batch["captions"] == [samples[j].caption for j in want]
        assert torch.equal(batch["pixel_values"], torch.stack([dataset[j]["pixel_values"] for j in want]))


def test_stream_stopped_early_lets_its_threads_go(demo_data):
    samples = scan_dataset(demo_data).samples
    before = threading.active_count()
    stream = batch_stream(Plan(5, 1, 1, 50), 0, 0, ImageDataset(samples, 64), [s.caption for s in samples])
    next(stream)
    assert threading.active_count() > before  # decoding ahead
    stream.close()
    assert threading.active_count() == before


class PidRecorder(ImageDataset):
    """Writes the pid of the process that decoded each image into ``folder``."""

    folder = None

    def __getitem__(self, i):
        (self.folder / f"{os.getpid()}-{i}-{os.urandom(4).hex()}").touch()
        return super().__getitem__(i)


def test_workers_start_once_per_run_and_train_as_the_main_process(demo_data, tmp_path, monkeypatch):
    # 5 images, batch 2: 3 micro-batches an epoch; 8 steps: 3 epochs, a stop and a resume (uncached path)
    settings = {"max_train_steps": 8, "cache_latents": False, "lora_dropout": 0.1}
    in_process = train(make_cfg(demo_data, tmp_path / "a", **settings), progress=False)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(PidRecorder, "folder", pids)
    monkeypatch.setattr("lora_trainer.engine.trainer.ImageDataset", PidRecorder)
    cfg = make_cfg(demo_data, tmp_path / "b", dataloader_num_workers=2, save_steps=4, **settings)
    first = train(cfg, callbacks=StopAt(4), progress=False)
    assert first.status == "stopped" and first.steps == 4
    assert len({p.name.split("-")[0] for p in pids.iterdir()}) == 2, "one set of 2 workers for the run"
    resumed = train(make_cfg(demo_data, tmp_path / "b", dataloader_num_workers=2, resume_from_checkpoint="latest",
                             **settings), progress=False)
    assert resumed.steps == 8 and resumed.status == "finished"
    assert len({p.name.split("-")[0] for p in pids.iterdir()}) == 4
    assert str(os.getpid()) not in {p.name.split("-")[0] for p in pids.iterdir()}
    a, b = load_file(in_process.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
