"""The order of the micro-batches, and the stream that decodes them ahead: one for the whole run."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
import torch
from safetensors.torch import load_file
from test_train import StopAt, make_cfg

from lora_trainer.data.dataset import ImageDataset, scan_dataset
from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.batches import Plan, batch_stream, epoch_batches, schedule
from lora_trainer.engine.trainer import train
from lora_trainer.errors import DatasetError


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=5, resolution=64, seed=0)


def test_schedule_is_the_epochs_in_a_row_and_a_resume_continues_it():
    plan = Plan(num_images=5, batch_size=2, grad_accum=2, total_steps=5)  # 3 batches = 2 steps an epoch
    assert plan.epochs == 3
    whole = list(schedule(plan, seed=3, step=0))
    # step 5 is the third epoch's first: its second step (the 9th micro-batch) is not part of the run
    assert [b for _, _, b in whole] == [b for e in range(3) for b in epoch_batches(5, 2, 3, e)][:8]
    assert [(e, i) for e, i, _ in whole] == [(e, i) for e in range(3) for i in range(3)][:8]
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
    monkeypatch.setattr("lora_trainer.engine.run.ImageDataset", PidRecorder)  # (run.training_dataset)
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


class Broken(ImageDataset):
    def __getitem__(self, i):
        if i == 1:
            raise DatasetError("demo_001.png: empty file (it changed after the dataset scan)")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decoding_error_reaches_the_loop_as_its_own_message(demo_data, workers):
    samples = scan_dataset(demo_data).samples
    stream = batch_stream(Plan(5, 5, 1, 1), 0, 0, Broken(samples, 64), [s.caption for s in samples], workers)
    with pytest.raises(DatasetError) as e:
        next(stream)
    assert str(e.value) == "demo_001.png: empty file (it changed after the dataset scan)"  # no worker traceback


def test_nothing_is_scheduled_past_the_last_step():
    plan = Plan(num_images=6, batch_size=2, grad_accum=2, total_steps=4)  # 3 batches: 2 steps an epoch
    whole = list(schedule(plan, 0, 0))
    assert len(whole) == 6  # steps 1-4: 2 + 1 micro-batches an epoch, 2 epochs
    assert list(schedule(plan, 0, 3)) == whole[5:]
    assert list(schedule(plan, 0, 4)) == [] and list(schedule(plan, 0, 9)) == []
    short = Plan(num_images=6, batch_size=2, grad_accum=1, total_steps=4)  # ends inside the second epoch
    assert [(e, i) for e, i, _ in schedule(short, 0, 0)] == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_resuming_a_run_stopped_at_its_last_step_trains_no_more(demo_data, tmp_path, caplog):
    # 5 images, batch 2: 3 steps an epoch; 4 steps end inside the second epoch
    straight = train(make_cfg(demo_data, tmp_path / "a"), progress=False)
    stopped = train(make_cfg(demo_data, tmp_path / "b"), callbacks=StopAt(4), progress=False)
    assert stopped.status == "stopped" and stopped.steps == 4
    with caplog.at_level("WARNING", logger="lora_trainer"):
        cfg = make_cfg(demo_data, tmp_path / "b", resume_from_checkpoint="latest")
        resumed = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fast_jpeg_decode=False)),
                        progress=False)
    assert resumed.steps == 4 and resumed.status == "finished"
    assert "fast_jpeg_decode True → False" in caplog.text  # the pixels would differ from the first run's
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_image_repeated_in_an_epoch_is_numbered_and_cut_anew_each_time(tmp_path):
    """kohya's folders train an image several times an epoch: the stream numbers each time (``repeats``, for the
    caption draws) and a random crop differs between the times; two processes number their rows as one does."""
    from PIL import Image

    from lora_trainer.data.buckets import BucketSpec

    folder = tmp_path / "img" / "6_zxq"
    folder.mkdir(parents=True)
    Image.new("RGB", (256, 128), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (128, 128), (30, 30, 200)).save(folder / "square.png")
    samples = scan_dataset(tmp_path / "img").samples
    dataset = ImageDataset(samples, 128, buckets=BucketSpec(128, 64, None, 32), random_crop=True, seed=5)
    plan = Plan(num_images=2, batch_size=2, grad_accum=1, total_steps=6, buckets=tuple(map(tuple,
                                                                                           dataset.epoch_groups())))
    got = list(batch_stream(plan, 3, 0, dataset, [s.caption for s in samples]))
    wide = [s.path.stem for s in samples].index("wide")
    numbered = [(r, c) for _, _, b in got for j, r, c in zip(b["indices"].tolist(), b["repeats"].tolist(),
                                                             b["crops"].tolist()) if j == wide]
    assert [r for r, _ in numbered] == list(range(6))  # (one epoch: the 6 times in order)
    assert len({tuple(c) for _, c in numbered}) > 1, f"every repeat was cut alike: {numbered}"
    assert [tuple(c) for _, c in numbered] == [dataset.crop(wide, 0, r) for r, _ in numbered]
    two = dataclasses.replace(plan, batch_size=1, world_size=2)
    parts = [list(batch_stream(two, 3, 0, None, [s.caption for s in samples], rank=k)) for k in range(2)]
    merged = [(j, r) for p in zip(*parts) for _, _, b in p if b["weight"] > 0
              for j, r in zip(b["indices"].tolist(), b["repeats"].tolist())]
    one = [(j, r) for _, _, b in got for j, r in zip(b["indices"].tolist(), b["repeats"].tolist())]
    assert sorted(merged) == sorted(one)
