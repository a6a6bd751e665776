"""The command line: demo, init-config, train (with overrides), and errors without tracebacks."""

from __future__ import annotations

import json

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
