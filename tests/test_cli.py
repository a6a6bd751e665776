"""The command line: demo, init-config, train (with overrides), and errors without tracebacks."""

from __future__ import annotations

import json

import pytest
import yaml

from lora_trainer.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="lora_trainer")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "3", "--images", "4"]) == 0
    # the run prints the dataset check before it trains: 4 images is few for a style
    assert "dataset check of" in caplog.text and "only 4 images" in caplog.text
    out = capsys.readouterr().out
    run = tmp_path / "demo" / "run"
    assert (run / "demo_lora.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert "<lora:demo_lora:0.7>" in out


def test_init_config_then_train_with_overrides(tmp_path, capsys):
    from lora_trainer.data.demo_set import make_demo_dataset

    cfg_path = tmp_path / "my.yaml"
    assert main(["init-config", str(cfg_path)]) == 0
    assert main(["init-config", str(cfg_path)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err

    data = make_demo_dataset(tmp_path / "data", n=4, resolution=64)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"]["train_data_dir"] = str(data)
    raw["data"]["resolution"] = 64
    raw["output"]["output_dir"] = str(tmp_path / "run")
    cfg_path.write_text(yaml.safe_dump(raw))
    code = main(["train", "--config", str(cfg_path), "--set", "training.max_train_steps=2", "--set", "batch_size=2",
                 "--set", "output_name=cli_lora"])
    assert code == 0
    assert (tmp_path / "run" / "cli_lora.safetensors").is_file()
    snapshot = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert snapshot["training"]["max_train_steps"] == 2 and snapshot["training"]["batch_size"] == 2


def test_config_errors_are_one_clear_message(tmp_path, capsys):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(f"train_data_dir: {tmp_path}\ntraining:\n  learnig_rate: 1e-4\n")
    assert main(["train", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "learnig_rate" in err and "did you mean 'learning_rate'" in err
    assert "Traceback" not in err


def test_demo_keeps_the_libraries_notices_off_the_terminal(tmp_path, monkeypatch):
    """demo loads the models as train does, so transformers' notices (a missing torchvision, ...) go to the run's log
    as train's do, not to the terminal of someone trying the tool for the first time."""
    import lora_trainer.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_libraries_to_the_log_file", lambda: calls.append(1))
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "1", "--images", "1"]) == 0
    assert calls == [1]


@pytest.mark.parametrize("argv, flag", [(["demo", "--images", "0"], "--images"), (["demo", "--steps", "-1"], "--steps"),
                                        (["check", "x", "--max-files", "0"], "--max-files"),
                                        (["label", "-i", "x", "--batch-size", "0"], "--batch-size")])
def test_counts_below_one_are_refused_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    """``demo --images 0`` ended in a traceback after the run had begun; a count of nothing is the usage's error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and "at least 1" in err
    assert not any(tmp_path.iterdir())  # nothing made


def test_every_commands_help_shows_its_defaults(capsys):
    for argv, shown in [(["demo"], ["default output/demo", "default 150", "default 8"]),
                        (["init-config"], ["default lora_config.yaml"]),
                        (["check"], ["default 512", "default csv", "default 5"]),
                        (["label"], ["default 4", "default blip", "default {caption}"]),
                        (["ui"], ["default 7870", "default output/Lora", "default tiny-demo"]),
                        (["generate"], ["default 128", "default 0.8", "default 0.95", "default fp32"]),
                        (["merge"], ["default 2GB"])]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # (argparse wraps the lines)
        assert all(s in text for s in shown), (argv, [s for s in shown if s not in text])


def test_merge_names_a_weight_that_is_not_a_number(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    assert main(["merge", "--lora", f"{lora}:O.8", "--out", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the weight 'O.8' is not a number" in err and "does not exist" not in err


def test_a_bad_set_is_named_as_the_command_lines_not_the_files(tmp_path, capsys):
    cfg_path = tmp_path / "my.yaml"
    cfg_path.write_text(f"train_data_dir: {tmp_path}\nnetwork_dim: 8\n")
    assert main(["train", "--config", str(cfg_path), "--set", "network_dim=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --set network_dim=abc: training.lora_rank: expected an integer >= 1 and <= 1024, got 'abc'"


def test_demo_checks_its_settings_before_it_writes_anything(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--set", "network_dim=abc"]) == 2
    assert "--set network_dim=abc: training.lora_rank" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # (the sample set was made first)
