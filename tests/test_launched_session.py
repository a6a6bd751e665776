"""The standalone app's runs on several GPUs (ui.launched_session): torchrun's processes (gloo on the CPU here) train,
the session follows their event file (engine.event_log) into the tab's status, samples, Stop and the published LoRA."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from test_train import make_cfg

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine.event_log import EventLog, EventReader, step_info, stop_path, train_result
from lora_trainer.engine.events import StepInfo, TrainResult
from lora_trainer.ui.launched_session import LaunchedSession, last_error
from lora_trainer.ui.standalone_host import DiffusersHost


def test_the_event_file_round_trips_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "events.jsonl"
    log, reader = EventLog(path), EventReader(path)
    assert reader.read() == []
    log.on_start(4, tmp_path / "run")
    info = StepInfo(step=1, total_steps=4, epoch=1, loss=0.5, loss_avg=0.5, lr=1e-4, elapsed_s=1.0, steps_per_s=1.0)
    log.on_step(info)
    with open(path, "a", encoding="utf-8") as f:  # another line, still being written
        f.write('{"event": "validation", "st')
    events = reader.read()
    assert [e["event"] for e in events] == ["start", "step"] and step_info(events[1]) == info
    with open(path, "a", encoding="utf-8") as f:
        f.write('ep": 1, "loss": 0.25}\n')
    assert reader.read() == [{"event": "validation", "step": 1, "loss": 0.25}]
    log.on_samples(2, [tmp_path / "run" / "samples" / "a_step000002_prompt00.png"])
    assert reader.read() == [{"event": "samples", "step": 2,
                              "paths": [str(tmp_path / "run" / "samples" / "a_step000002_prompt00.png")]}]
    assert not log.should_stop()
    stop_path(path).touch()
    assert log.should_stop()
    result = TrainResult("stopped", tmp_path / "run", tmp_path / "run" / "a.safetensors", None, 1, 4, 0.5, 0.5, 3, 0,
                         2.0, skipped=[{"path": "x.png", "reason": "unreadable"}])
    log.on_end(result)
    assert train_result(reader.read()[0]) == result


def test_a_failed_run_names_what_the_command_line_said(tmp_path):
    log = tmp_path / "torchrun.log"
    log.write_text("[rank 1] WARNING something\nerror: data.train_data_dir: /x does not exist\nTraceback ...\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert last_error(log) == "data.train_data_dir: /x does not exist"
    log.write_text("Traceback (most recent call last):\nRuntimeError: boom\nmore\n")
    assert last_error(log) == "RuntimeError: boom"


@pytest.fixture
def app(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)
    return data, DiffusersHost(lora_dir=tmp_path / "Lora", run_root=tmp_path / "runs")


@pytest.mark.slow  # (two processes of two runs: about a minute on 2 CPU cores)
def test_two_processes_train_publish_and_show_progress_samples_and_stop(app, tmp_path, monkeypatch):
    data, host = app
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # (where the session keeps its config and events)
    (tmp_path / "tmp").mkdir()
    cfg = make_cfg(data, tmp_path / "run", max_train_steps=4, batch_size=1, save_steps=2)
    session = LaunchedSession.start(host, cfg, processes=2, sample_prompt="a red square", sample_every=2)
    s = session.wait(timeout=600)
    assert s.state == "done", s.message
    assert (s.step, s.total_steps) == (4, 4) and [step for step, _ in s.losses] == [1, 2, 3, 4]
    assert [step for step, _ in s.samples] == [2, 4] and s.samples[0][1].size == (64, 64)
    assert s.published == tmp_path / "Lora" / "test_lora.safetensors" and s.published.exists()
    summary = json.loads((s.run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["effective_batch"]) == (2, 2)
    assert list((tmp_path / "tmp").iterdir()) == []  # the session's own files went with its end

    # Stop after the first step: both processes stop after the same step, rank 0 saves and exports
    cfg = make_cfg(data, tmp_path / "stopped", max_train_steps=50, batch_size=1, save_steps=0)

    class StopEarly(LaunchedSession):
        def on_step(self, info):
            super().on_step(info)
            self.stop()

    s = StopEarly.start(host, cfg, processes=2).wait(timeout=600)
    assert s.state == "stopped", s.message
    assert 1 <= s.step < 50 and s.result.status == "stopped"
    assert s.published.exists() and s.published.parent == tmp_path / "Lora"
    assert s.published.name != "test_lora.safetensors"  # (published beside the first run's, never over it)


def test_a_run_that_fails_says_why(app, tmp_path, monkeypatch):
    _, host = app
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = make_cfg(tmp_path / "no such folder", tmp_path / "run")
    s = LaunchedSession.start(host, cfg, processes=2).wait(timeout=600)
    assert s.state == "error"
    assert "no such folder" in s.message and "2-process run" in s.message
    log = s.message.rsplit("(the whole log: ", 1)[1].rstrip(")")
    assert Path(log).parent.parent == tmp_path / "tmp" and "no such folder" in Path(log).read_text()  # kept


def test_a_run_that_ends_and_then_fails_keeps_its_log(app, tmp_path, monkeypatch, caplog):
    """The processes said "end" (the LoRA is saved), then exited with an error (a process's teardown, say): the result
    is published and the torchrun log stays, named in a warning, where a clean exit removes the session's folder."""
    import subprocess
    import sys

    from lora_trainer.ui import launched_session

    data, host = app
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lora = tmp_path / "run" / "test_lora.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"a LoRA")
    said = tmp_path / "said.jsonl"
    EventLog(said).on_end(TrainResult("done", lora.parent, lora, None, 4, 4, 0.5, 0.5, 3, 0, 2.0))
    popen = subprocess.Popen

    def torchrun(exit_code):
        def run(cmd, **kw):  # (a stand-in for torchrun: it says the run's end, then exits with ``exit_code``)
            events = cmd[cmd.index("--events") + 1]
            return popen([sys.executable, "-c", f"import shutil, sys; shutil.copyfile({str(said)!r}, {events!r}); "
                          f"print('process 1 failed in its teardown'); sys.exit({exit_code})"], **kw)
        return run

    for exit_code in (3, 0):
        monkeypatch.setattr(launched_session.subprocess, "Popen", torchrun(exit_code))
        caplog.clear()
        s = LaunchedSession.start(host, make_cfg(data, tmp_path / "out"), processes=2).wait(timeout=600)
        assert s.state == "done" and s.published.read_bytes() == b"a LoRA", s.message
        kept = list((tmp_path / "tmp").glob("*/torchrun.log"))
        if exit_code:
            assert len(kept) == 1 and "teardown" in kept[0].read_text() and str(kept[0]) in caplog.text
            for path in kept[0].parent.iterdir():
                path.unlink()
            kept[0].parent.rmdir()
        else:
            assert kept == [] and "exited with" not in caplog.text
