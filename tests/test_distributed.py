"""Issue 21, multi-GPU training on the CPU (gloo): two processes train the LoRA that one process trains with the same
micro-batch; rank 0 alone writes; a stop asked on one process stops both after the same step; a process that dies
ends the other with its last good checkpoint kept; a two-process run resumes (with two processes, or with one of the
same micro-batch); another micro-batch over all processes is refused, naming both world sizes."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import make_cfg

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.batches import Plan, batch_stream, schedule
from lora_trainer.engine.distributed import shard_rows
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# 5 images, a micro-batch of 2 over both processes: each epoch ends with a micro-batch of 1 (rank 1 then has none)
SETTINGS = dict(batch_size=1, max_train_steps=4, save_steps=2, noise_offset=0.05)


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=5, resolution=64, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_lora(a, b, share=0.01):
    """The same LoRA, but for rounding: within ``share`` of the most a weight moved. (One process sums a micro-batch
    of 2 in another order than two processes of 1 each; AdamW turns a rounding difference of a near-zero gradient
    into a part of a step: 1.0e-5 of 4.0e-3 moved with A1111's diffusers/peft pins, 1.9e-6 with the latest. Images,
    noise or flips not shared as one process would see them differ by whole steps, 1e-3 each here.)"""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    worst = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    moved = max(ta[k].abs().max().item() for k in ta if k.endswith("lora_up.weight"))  # (lora_up starts at 0)
    assert moved > 1e-4, "the LoRA did not train: the comparison would prove nothing"
    assert worst < share * moved, f"the LoRAs differ by up to {worst} (the most a weight moved: {moved})"


# --- what each process takes
def test_the_rows_of_every_micro_batch_go_to_one_process_each():
    for n in range(1, 9):
        for world in (2, 3):
            taken = [shard_rows(n, r, world) for r in range(world)]
            real = sorted(row for rows, w in taken if w > 0 for row in rows)
            assert real == list(range(n))
            assert sum(w for _, w in taken) == pytest.approx(1.0)
            assert all(rows == [0] for rows, w in taken if w == 0)  # (a process without a row computes row 0)


def test_the_processes_streams_together_are_the_single_process_micro_batches():
    one = Plan(num_images=7, batch_size=4, grad_accum=2, total_steps=5)
    two = Plan(num_images=7, batch_size=2, grad_accum=2, total_steps=5, world_size=2)
    assert (two.global_batch, two.effective_batch, two.steps_per_epoch) == (4, 8, one.steps_per_epoch)
    captions = [f"c{i}" for i in range(7)]
    whole = [(e, i, b) for e, i, b in schedule(one, 3, 1)]
    parts = [list(batch_stream(two, 3, 1, None, captions, rank=r)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (e, i, b), p0, p1 in zip(whole, *parts):
        assert p0[:2] == p1[:2] == (e, i)
        real = [x for p in (p0, p1) if p[2]["weight"] > 0 for x in p[2]["indices"].tolist()]
        assert sorted(real) == sorted(b) and p0[2]["of"] == len(b)


# --- resume with another number of processes
def _restored(world_size, batch_size):
    return ckpt.Restored(step=2, weights={}, state={}, info={"settings": {"world_size": world_size,
                                                                          "batch_size": batch_size}})


def test_resuming_with_another_number_of_processes_needs_the_same_micro_batch(caplog):
    settings = {"world_size": 2, "batch_size": 2}
    with caplog.at_level("INFO"):
        ckpt.check_resume(_restored(1, 4), settings, Path("ck"), keys={"world_size", "batch_size"})
    assert "continue as they were" in caplog.text and "batch_size 4 → 2" not in caplog.text
    with pytest.raises(ConfigError, match=r"trained by 1 process\(es\) with batch_size 2 .*this run has 2 process\(es\)"
                                          r" with batch_size 2 .*set training.batch_size: 1"):
        ckpt.check_resume(_restored(1, 2), settings, Path("ck"), keys={"world_size", "batch_size"})
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\).* 4 process\(es\).*start 2 process"):
        ckpt.check_resume(_restored(2, 3), {"world_size": 4, "batch_size": 2}, Path("ck"), keys={"batch_size"})
    ckpt.check_resume(ckpt.Restored(2, {}, {}, {"settings": {"batch_size": 2}}), {"world_size": 1, "batch_size": 2},
                      Path("ck"), keys={"batch_size"})  # (a checkpoint from before: one process)


def test_only_train_runs_under_a_launcher(monkeypatch, capsys, tmp_path):
    from lora_trainer.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["init-config", str(tmp_path / "c.yaml")]) == 2
    assert "only the train command runs on several processes" in capsys.readouterr().err
    assert not (tmp_path / "c.yaml").exists()
    monkeypatch.delenv("RANK", raising=False)
    from lora_trainer.engine.distributed import Group

    with pytest.raises(ConfigError, match="WORLD_SIZE is 2 but RANK"):
        Group.from_environment(1, {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_sigterm_asks_a_process_of_several_to_stop_after_its_step():
    """torchrun passes a Ctrl-C on to its processes (SIGTERM in some torch versions): it stops the run after the step
    (once; the launcher's next word is SIGKILL); a single process keeps the default (SIGTERM ends it)."""
    import signal

    from lora_trainer.engine.interrupt import CtrlC

    before = signal.getsignal(signal.SIGTERM)
    with CtrlC(sigterm=True) as ctrl_c:
        os.kill(os.getpid(), signal.SIGTERM)
        assert ctrl_c.requested
        os.kill(os.getpid(), signal.SIGTERM)  # (no KeyboardInterrupt: a second SIGTERM is not a second Ctrl-C)
    assert signal.getsignal(signal.SIGTERM) == before
    with CtrlC():
        assert signal.getsignal(signal.SIGTERM) == before


def test_processes_that_would_train_other_images_or_steps_are_refused_naming_each_rank(demo_data, tmp_path):
    from lora_trainer.data.dataset import scan_dataset
    from lora_trainer.engine.trainer import _check_agreement

    class Peers:  # rank 1 saw another dataset (a machine with one image less)
        def __init__(self, other):
            self.other = other

        def gather(self, mine, what):
            return [mine, {**mine, **self.other}]

    scan, cfg = scan_dataset(demo_data), make_cfg(demo_data, tmp_path / "out", batch_size=1)
    plan = Plan.from_config(cfg, len(scan.samples), None, 2)
    _check_agreement(Peers({}), cfg, plan, scan)
    with pytest.raises(ConfigError, match=r"disagree on images \(rank 0: 5, rank 1: 4\); dataset digest \(rank 0: "
                                          r"[0-9a-f]{12}, rank 1: x\): every machine needs the same dataset"):
        _check_agreement(Peers({"images": 4, "dataset digest": "x"}), cfg, plan, scan)


# --- torchrun: two processes, the same LoRA as one process, resumed
def torchrun(config: Path, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "lora_trainer", "train", "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    (tmp_path / f"{name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_config(cfg_path: Path, data, out, **training):
    t = {"max_train_steps": 4, "batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
         "lora_rank": 4, "lora_alpha": 2, "lora_dropout": 0.0, "save_steps": 2, "seed": 7, "noise_offset": 0.05,
         **training}
    cfg_path.write_text(json.dumps({
        "data": {"train_data_dir": str(data), "resolution": 64, "random_flip": True},
        "model": {"base_model": "tiny-demo"}, "training": t,
        "output": {"output_dir": str(out), "output_name": "test_lora", "save_precision": "fp32",
                   "log_with": "tensorboard"}}))
    return cfg_path


@pytest.mark.slow  # (about a minute on 2 CPU cores: three runs, two of them of two processes)
def test_two_processes_train_the_lora_of_one_process_and_resume(demo_data, tmp_path):
    """torchrun --nproc_per_node 2, batch_size 1: 2 steps, then resumed to 4 (two processes again); the LoRA equals
    one process's with batch_size 2 (the same micro-batches, noise and flips), and only rank 0 wrote."""
    out = tmp_path / "two"
    torchrun(write_config(tmp_path / "first.yaml", demo_data, out, max_train_steps=2), tmp_path, "first")
    done = torchrun(write_config(tmp_path / "resumed.yaml", demo_data, out, resume_from_checkpoint="latest"),
                    tmp_path, "resumed")
    one = train(make_cfg(demo_data, tmp_path / "one", **dict(SETTINGS, batch_size=2)), progress=False)

    assert_same_lora(out / "test_lora.safetensors", one.lora_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert (summary["world_size"], summary["effective_batch"]) == (2, 2)
    assert summary["first_loss"] == pytest.approx(one.first_loss, rel=1e-5)  # (the loss of both processes' rows)
    meta = safe_open(out / "test_lora.safetensors", "pt").metadata()
    assert (meta["ss_total_batch_size"], meta["ss_batch_size_per_device"]) == ("2", "1")
    # rank 0 alone wrote: one run folder (a second process choosing its own would make out-<time>), one log
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]
    assert [c.name for _, c in ckpt.list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]
    log = (out / "logs" / "train.log").read_text()
    assert log.count("resumed from") == 1 and "[rank 1]" not in log
    assert "run folder" in done.stderr and "[rank 1] INFO" not in done.stderr
    assert done.stdout.count("LoRA for the WebUI") == 1  # (rank 0 reports)


# --- spawned processes: rank 1 must write nothing; a stop and a lost process
def _forbid_writes():
    """In rank 1: every writer of a run raises (a test fails if a process other than rank 0 writes)."""
    import lora_trainer.engine.cache as cache
    import lora_trainer.engine.checkpoint as checkpoint
    import lora_trainer.engine.trainer as trainer

    def refuse(what):
        def fail(*a, **k):
            raise AssertionError(f"rank 1 wrote {what}")
        return fail

    for module, name in [(trainer, "export_lora"), (trainer, "write_summary"), (trainer, "save_config"),
                         (trainer, "run_log_file"), (trainer, "_tensorboard"), (trainer, "prepare_run_dir"),
                         (trainer, "check_free_space"), (checkpoint, "save_checkpoint")]:
        setattr(module, name, refuse(name))
    cache.LatentStore.save = refuse("the latent cache")


def _rank(rank: int, port: int, settings: dict, results: str, role: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from lora_trainer.config import config_from_dict
    from lora_trainer.engine.distributed import Group
    from lora_trainer.engine.events import Callbacks

    class Role(Callbacks):
        def __init__(self):
            self.seen = []

        def on_step(self, info):
            self.seen.append(info.step)
            if role == "dies" and rank == 1 and info.step == 2:
                os._exit(3)  # (a process killed: no cleanup, no goodbye)

        def should_stop(self):
            return role == "stops" and rank == 1 and bool(self.seen) and self.seen[-1] >= 1

    if rank == 1:
        _forbid_writes()
    group = Group.from_environment(1)
    try:
        result = train(config_from_dict(settings), callbacks=Role(), progress=False, group=group)
        out = {"status": result.status, "steps": result.steps, "lora": result.lora_path and str(result.lora_path)}
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out = {"error": f"{type(e).__name__}: {e}"}
    finally:
        group.close()
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))


def spawn_two(settings: dict, results: Path, role: str, timeout: float = 240) -> list[dict | None]:
    """Two processes training ``settings``; each one's outcome (None: it wrote none, e.g. it died)."""
    results.mkdir()
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, settings, str(results), role)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    return [json.loads(f.read_text()) if (f := results / f"rank{r}.json").is_file() else None for r in range(2)]


def settings_of(data, out, **training) -> dict:
    cfg = write_config(out.parent / f"{out.name}.json", data, out, **training)
    return json.loads(cfg.read_text())


def test_a_stop_on_one_process_stops_both_after_the_same_step_and_rank_1_writes_nothing(demo_data, tmp_path):
    out = tmp_path / "out"
    ranks = spawn_two(settings_of(demo_data, out, cache_latents_to_disk=True),
                      tmp_path / "results", "stops")
    assert ranks[0] == {"status": "stopped", "steps": 1, "lora": str(out / "test_lora.safetensors")}, ranks
    assert ranks[1] == {"status": "stopped", "steps": 1, "lora": None}, ranks
    assert [c.name for _, c in ckpt.list_checkpoints(out)] == ["checkpoint-000001"]
    assert len(list((out / "latent_cache").glob("*.safetensors"))) == 10  # (5 images and their mirrors, by rank 0)


def test_a_process_that_dies_ends_the_other_with_the_last_good_checkpoint(demo_data, tmp_path):
    out = tmp_path / "out"
    ranks = spawn_two(settings_of(demo_data, out, save_steps=1), tmp_path / "results", "dies")
    assert ranks[1] is None and ranks[0] is not None, ranks
    assert ranks[0]["error"].startswith("ProcessLost: rank 0: another process of the run stopped"), ranks
    assert [c.name for _, c in ckpt.list_checkpoints(out)][-1] == "checkpoint-000002"
    assert not (out / "test_lora.safetensors").exists()
    # one process of the same micro-batch (batch_size 2) finishes the run from there, and another is refused
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\) with batch_size 1 .*1 process\(es\) with "
                                          r"batch_size 1 .*set training.batch_size: 2"):
        train(make_cfg(demo_data, out, **dict(SETTINGS, resume_from_checkpoint="latest")), progress=False)
    done = train(make_cfg(demo_data, out, **dict(SETTINGS, batch_size=2, resume_from_checkpoint="latest")),
                 progress=False)
    assert done.status == "finished" and done.steps == 4 and done.run_dir == out
    one = train(make_cfg(demo_data, tmp_path / "one", **dict(SETTINGS, batch_size=2)), progress=False)
    assert_same_lora(done.lora_path, one.lora_path)


def test_the_built_in_models_build_complete_under_a_launcher(tmp_path):
    """Both processes of a fresh two-process run ask for the built-in models, rank 1 first: transformers 5 writes
    nothing from rank 1 (its save_pretrained checks torch.distributed), so what rank 1 builds must be complete."""
    script = tmp_path / "build.py"
    script.write_text("import time\n"
                      "import torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "time.sleep(5 if dist.get_rank() == 0 else 0)  # (rank 1 builds first)\n"
                      "from lora_trainer.models.tiny import tiny_model_path\n"
                      "from lora_trainer.models.tiny_sdxl import tiny_sdxl_model_path\n"
                      "print(tiny_model_path(), tiny_sdxl_model_path())\n"
                      "dist.destroy_process_group()\n")
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LORA_TRAINER_CACHE": str(cache),
                               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    folders = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert [p.name.split("-v")[0] for p in folders] == ["tiny-demo", "tiny-sdxl"]
    for folder in folders:
        for part in ("unet", "vae", "text_encoder"):
            assert (folder / part / "config.json").is_file(), f"{folder.name}/{part} is incomplete"
    assert (folders[1] / "text_encoder_2" / "config.json").is_file()
