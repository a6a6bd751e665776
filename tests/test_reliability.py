"""Issue 19, output folders and resume: where a run writes is checked before any model loads; a resumed run's
documented file names hold its newest weights; ``latest`` finds the newest run of a config and skips damaged
checkpoints; a finished run has nothing to resume unless the config asks for more; leftovers of a kill are removed."""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from test_train import StopAt, make_cfg

from lora_trainer.data.demo_set import make_demo_dataset
from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.output_checks import name_problem
from lora_trainer.engine.trainer import train
from lora_trainer.errors import ConfigError


@pytest.fixture
def demo_data(tmp_path):
    return make_demo_dataset(tmp_path / "data", n=4, resolution=64, seed=0)


def cfg(data, out, **training):
    c = make_cfg(data, out, random_flip=False, **{"max_train_steps": 4, "save_steps": 2, **training})
    c.output.log_with = "none"
    return c


def never_loaded(monkeypatch):
    import lora_trainer.engine.trainer as trainer

    def fail(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer, "load_backend", fail)


# --- where a run writes
@pytest.mark.parametrize("case,words", [
    ("file", "is a file, not a folder"),
    ("under_file", "which is a file: choose a folder path"),
    ("read_only", "read-only file system"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(demo_data, tmp_path, monkeypatch,
                                                                                  case, words):
    never_loaded(monkeypatch)
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "run", "read_only": tmp_path / "ro" / "run"}
    if case == "read_only":  # (as root a chmod does not stop writes: the file system's answer, patched)
        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match="output.output_dir") as e:
        train(cfg(demo_data, out[case]), progress=False)
    assert words in str(e.value)


@pytest.mark.parametrize("name,words", [
    ("n" * 300, "bytes long"), ("bad\0name", "NUL"), ("a/b", "'/'"), ("dots.", "ends with a dot"), ("  ", "empty"),
])
def test_an_output_name_that_is_no_file_name_is_refused_before_the_model_loads(demo_data, tmp_path, monkeypatch,
                                                                               name, words):
    never_loaded(monkeypatch)
    c = cfg(demo_data, tmp_path / "out")
    c.output.output_name = name
    with pytest.raises(ConfigError, match="output.output_name") as e:
        train(c, progress=False)
    assert words in str(e.value)
    assert not (tmp_path / "out").exists()


def test_names_that_fit_are_accepted():
    for name in ("my_lora", "Ünïcode style v2", "a" * 200, "x.y-z"):
        assert name_problem(name) is None, name


def test_the_tab_names_the_lora_name_field(tmp_path):
    from lora_trainer.ui.run_config import build_config
    from lora_trainer.ui.standalone_host import DiffusersHost

    host = DiffusersHost(tmp_path / "Lora", run_root=tmp_path / "runs")
    with pytest.raises(Exception, match="LoRA name: .* contains '/'"):
        build_config(host, str(tmp_path), "a/b", "Style (defaults)", "tiny-demo", {})


# --- resume
def test_a_resumed_run_puts_its_newest_weights_under_the_documented_names(demo_data, tmp_path):
    stopped = train(cfg(demo_data, tmp_path / "out"), callbacks=StopAt(1), progress=False)
    assert stopped.status == "stopped" and stopped.lora_path.name == "test_lora.safetensors"
    partial = load_file(stopped.lora_path)
    done = train(cfg(demo_data, tmp_path / "out", resume_from_checkpoint="latest"), progress=False)
    assert done.run_dir == stopped.run_dir and done.status == "finished"
    assert done.lora_path.name == "test_lora.safetensors"
    assert done.diffusers_path.name == "pytorch_lora_weights.safetensors"
    kept = done.run_dir / f"test_lora-step{stopped.steps}.safetensors"
    assert kept.is_file() and (done.run_dir / f"pytorch_lora_weights-step{stopped.steps}.safetensors").is_file()
    assert all(torch.equal(load_file(kept)[k], v) for k, v in partial.items())  # the partial one, kept as it was
    newest = load_file(done.lora_path)
    assert any(not torch.equal(newest[k], v) for k, v in partial.items())
    assert not list(done.run_dir.glob("*_1.safetensors"))


def test_latest_takes_the_newest_run_of_the_config_and_says_which(demo_data, tmp_path, caplog):
    first = train(cfg(demo_data, tmp_path / "out"), progress=False)  # finished, with checkpoints
    second = train(cfg(demo_data, tmp_path / "out"), callbacks=StopAt(2), progress=False)  # newer, interrupted
    assert second.run_dir != first.run_dir and second.run_dir.name.startswith("out-")
    caplog.set_level("INFO", logger="lora_trainer")
    resumed = train(cfg(demo_data, tmp_path / "out", resume_from_checkpoint="latest"), progress=False)
    assert resumed.run_dir == second.run_dir and resumed.status == "finished"
    assert any("latest is" in r.message and str(second.run_dir) in r.message for r in caplog.records)
    # another config's folder whose name starts the same ("out-anime") is not a run of this one, however new
    other = train(cfg(demo_data, tmp_path / "out-anime", max_train_steps=8), callbacks=StopAt(2), progress=False)
    assert other.status == "stopped"
    more = train(cfg(demo_data, tmp_path / "out", max_train_steps=6, resume_from_checkpoint="latest"),
                 progress=False)
    assert more.run_dir == second.run_dir and more.steps == 6


def test_a_finished_run_has_nothing_to_resume_unless_the_config_asks_for_more(demo_data, tmp_path):
    done = train(cfg(demo_data, tmp_path / "out"), progress=False)
    with pytest.raises(ConfigError, match="finished at step 4 of 4: nothing is left to resume"):
        train(cfg(demo_data, tmp_path / "out", resume_from_checkpoint="latest"), progress=False)
    assert sorted(p.name for p in done.run_dir.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors",
                                                                         "test_lora.safetensors"]
    more = train(cfg(demo_data, tmp_path / "out", max_train_steps=6, resume_from_checkpoint="latest"), progress=False)
    assert more.run_dir == done.run_dir and more.steps == 6 and more.status == "finished"
    assert (done.run_dir / "test_lora-step4.safetensors").is_file()


def test_a_checkpoint_reads_back_where_the_webui_replaced_torch_load(demo_data, tmp_path, monkeypatch):
    """A1111 and Forge (modules/safe.py) replace torch.load with a check that refuses a newer torch's files and then
    returns None: the resume reads with torch's own loader (weights_only), and a state that is not one is named."""
    stopped = train(cfg(demo_data, tmp_path / "out", max_train_steps=4, save_steps=0), callbacks=StopAt(2),
                    progress=False)
    folder = ckpt.list_checkpoints(stopped.run_dir)[-1][1]
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # (what the WebUI's gives for a file it refuses)
    assert ckpt.load_checkpoint(folder).state["optimizer"]["param_groups"]
    torch.save([1, 2], folder / ckpt.STATE)
    with pytest.raises(ConfigError, match=r"training_state.pt is damaged \(ValueError: not a training state"):
        ckpt.load_checkpoint(folder)


def _damage(kind: str, folder):
    if kind == "truncated weights":
        path = folder / ckpt.WEIGHTS
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "info not utf-8":
        (folder / ckpt.INFO).write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "info without step":
        info = json.loads((folder / ckpt.INFO).read_text())
        del info["step"]
        (folder / ckpt.INFO).write_text(json.dumps(info))
    else:  # a torch file with a pickled callable: refused by weights_only, never run
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch pwned",))

        (folder / ckpt.STATE).write_bytes(pickle.dumps({"optimizer": Boom()}))
    return {"truncated weights": ckpt.WEIGHTS, "info not utf-8": ckpt.INFO, "info without step": ckpt.INFO,
            "tampered state": ckpt.STATE}[kind]


@pytest.mark.parametrize("kind", ["truncated weights", "info not utf-8", "info without step", "tampered state"])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back_to_an_intact_one(demo_data, tmp_path, kind, caplog,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    stopped = train(cfg(demo_data, tmp_path / "out", max_train_steps=6, save_steps=1), callbacks=StopAt(3),
                    progress=False)
    newest = ckpt.list_checkpoints(stopped.run_dir)[-1][1]
    name = _damage(kind, newest)
    with pytest.raises(ConfigError, match="is damaged") as e:
        train(cfg(demo_data, tmp_path / "out", max_train_steps=6, save_steps=1, resume_from_checkpoint=str(newest)),
              progress=False)
    assert str(newest / name) in str(e.value)
    caplog.set_level("WARNING", logger="lora_trainer")
    resumed = train(cfg(demo_data, tmp_path / "out", max_train_steps=6, save_steps=1,
                        resume_from_checkpoint="latest"), progress=False)
    assert resumed.status == "finished" and resumed.steps == 6
    assert any(str(newest / name) in r.message and "next newest" in r.message for r in caplog.records)
    assert not (tmp_path / "pwned").exists()


def test_leftovers_of_a_kill_during_a_write_are_removed_at_the_next_start(demo_data, tmp_path):
    stopped = train(cfg(demo_data, tmp_path / "out"), callbacks=StopAt(2), progress=False)
    half = stopped.run_dir / "checkpoints" / ".checkpoint-000003.abcd1234.tmp"
    half.mkdir()
    (half / ckpt.WEIGHTS).write_bytes(b"partial")
    stray = stopped.run_dir / ".test_lora.safetensors.x1y2z3.tmp"
    stray.write_bytes(b"partial")
    train(cfg(demo_data, tmp_path / "out", resume_from_checkpoint="latest"), progress=False)
    assert not half.exists() and not stray.exists()


# --- the last bad inputs
def test_a_symlink_loop_in_the_dataset_is_skipped_with_a_reason(demo_data, tmp_path):
    from lora_trainer.data.dataset import scan_dataset

    (demo_data / "loop.png").symlink_to("loop.png")
    scan = scan_dataset(demo_data)
    assert len(scan.samples) == 4
    assert [s.reason for s in scan.skipped if s.path == "loop.png"] == [
        "a link that loops or points nowhere: remove it, or point it at an image"]


def test_extra_csv_columns_are_not_captions_and_nul_bytes_go(tmp_path):
    from lora_trainer.data.captions import read_metadata_csv

    csv = tmp_path / "metadata.csv"
    csv.write_text("file_name,text,score,source\na.png,a red cube,0.9,web\nb.png,two cats\x00,0.5,cam\n",
                   encoding="utf-8")
    entries, problems = read_metadata_csv(csv)
    assert entries["a.png"].caption == "a red cube" and entries["b.png"].caption == "two cats"
    assert sum("are not captions" in p for p in problems) == 1 and "'score', 'source'" in problems[0]
    assert any("NUL characters removed" in p for p in problems)
    csv.write_text("file_name,text\na.png,a red cube, on a table\n", encoding="utf-8")  # unquoted commas: one caption
    assert read_metadata_csv(csv)[0]["a.png"].caption == "a red cube, on a table"


def test_a_file_name_with_a_leading_space_matches_its_csv_row_exactly(demo_data):
    from lora_trainer.data.dataset import scan_dataset

    (demo_data / "demo_000.png").rename(demo_data / " spaced.png")
    (demo_data / "metadata.csv").write_text('file_name,text\n" spaced.png",a spaced caption\n'
                                            + "".join(f"demo_{i:03d}.png,demo {i}\n" for i in (1, 2, 3)),
                                            encoding="utf-8")
    scan = scan_dataset(demo_data)
    assert {s.path.name: s.caption for s in scan.samples}[" spaced.png"] == "a spaced caption"
    assert not scan.skipped


def test_a_yaml_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    from lora_trainer.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\n  lora_rank: 4\n  epochs: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'epochs' is given twice, on line 2 and line 4"):
        load_config(path)


def test_misleading_messages_now_say_what_is_wrong(demo_data, tmp_path, capsys):
    from safetensors.torch import save_file

    from lora_trainer.cli import main as cli_main
    from lora_trainer.data.dataset import scan_dataset
    from lora_trainer.errors import DatasetError, ModelLoadError
    from lora_trainer.models.diffusers_backend import load_pipeline
    from lora_trainer.models.single_file import check_single_file

    with pytest.raises(DatasetError, match="is a folder; give the metadata.csv file itself"):
        scan_dataset(demo_data, metadata_path=str(tmp_path))
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(ModelLoadError, match="a LoRA, not a base model"):
        check_single_file(lora)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no unet, vae, text_encoder, tokenizer, scheduler"):
        load_pipeline(str(folder))
    assert cli_main(["check", str(demo_data), "--resolution", "0"]) == 2
    assert "check --resolution: 0 is too small" in capsys.readouterr().err


def test_the_terminal_shows_no_library_notices(demo_data, tmp_path):
    """transformers' and diffusers' notices (e.g. transformers 5's "requires torchvision" twice per run) and Python
    warnings stay off the terminal of `python -m lora_trainer train`; our own lines are there."""
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_data_dir: {demo_data}, resolution: 64}}\ntraining: {{max_train_steps: 1, "
                      f"batch_size: 2, save_steps: 0}}\noutput: {{output_dir: {tmp_path / 'out'}, log_with: none}}\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    done = subprocess.run([sys.executable, "-W", "always", "-m", "lora_trainer", "train", "-c", str(config)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[transformers]" not in done.stderr and "Warning:" not in done.stderr, done.stderr[-2000:]
    assert "requires torchvision" not in done.stderr and "finished after 1 steps" in done.stderr
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and int(transformers.__version__.split(".")[0]) >= 5:
        log_file = (tmp_path / "out" / "logs" / "train.log").read_text(encoding="utf-8")
        assert "WARNING transformers" in log_file and "requires torchvision" in log_file  # kept in the run's log


def test_save_every_n_epochs_keeps_each_epochs_lora_as_kohya_names_it(demo_data, tmp_path):
    """A checkpoint every N epochs, and the LoRA of that epoch beside the final one (<name>-000001.safetensors, its
    ss_epoch the epoch's), to compare the epochs; the last epoch's is the final file."""
    from safetensors import safe_open

    c = cfg(demo_data, tmp_path / "out", max_train_steps=None, save_steps=0, save_every_n_epochs=1)
    c.training.epochs = 3
    result = train(c, progress=False)
    per_epoch = result.total_steps // 3
    assert [s for s, _ in ckpt.list_checkpoints(result.run_dir)] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    files = sorted(p.name for p in result.run_dir.glob("test_lora*.safetensors"))
    assert files == ["test_lora-000001.safetensors", "test_lora-000002.safetensors", "test_lora.safetensors"]
    epochs = []
    for name in files:
        with safe_open(str(result.run_dir / name), "pt") as f:
            epochs.append(f.metadata()["ss_epoch"])
    assert epochs == ["1", "2", "3"]
    first, final = (load_file(result.run_dir / n) for n in (files[0], files[2]))
    assert first.keys() == final.keys() and not all(torch.equal(first[k], final[k]) for k in first)


def test_an_earlier_checkpoint_of_a_run_that_went_on_continues_in_a_folder_of_its_own(demo_data, tmp_path, caplog):
    """Its checkpoints would mix with the run's later ones (and pruning to the newest few would delete those): the
    branch goes to a new folder, and the run stays as it is, each checkpoint and file."""
    done = train(cfg(demo_data, tmp_path / "out", max_train_steps=6, save_steps=2), progress=False)
    before = {p: p.stat().st_mtime_ns for p in done.run_dir.rglob("*") if p.is_file()}
    second = ckpt.list_checkpoints(done.run_dir)[0][1]  # (step 2)
    caplog.set_level("WARNING", logger="lora_trainer")
    branch = train(cfg(demo_data, tmp_path / "out", max_train_steps=5, save_steps=2, checkpoints_total_limit=1,
                       resume_from_checkpoint=str(second)), progress=False)
    assert branch.status == "finished" and branch.steps == 5 and branch.run_dir != done.run_dir
    assert branch.run_dir.name.startswith("out-") and "went on to step 6" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in done.run_dir.rglob("*") if p.is_file()} == before
    # a branch refused (another rank) leaves no folder behind
    folders = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="lora_rank"):
        train(cfg(demo_data, tmp_path / "out", max_train_steps=5, lora_rank=8, resume_from_checkpoint=str(second)),
              progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == folders
