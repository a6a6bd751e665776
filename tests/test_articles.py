"""The lora-scripts articles' configs train as written (issue 17), paths aside: their data folder is a generated
demo set, the base model the tiny one, at its resolution. The output folder holds what the articles promise:
the diffusers-format ``pytorch_lora_weights.safetensors``, ``logs/`` (TensorBoard) and ``config.yaml``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_config import ARTICLE_FLAT, ARTICLE_NESTED

from lora_trainer.cli import main
from lora_trainer.data.demo_set import make_demo_dataset

# the articles' second config: the first with checkpoints every 100 steps
ARTICLE_SAVE_STEPS = ARTICLE_FLAT.replace("epochs: 15", "epochs: 15\nsave_steps: 100")


def as_written(text: str, tmp_path: Path) -> Path:
    """The article's config with its paths pointing into ``tmp_path``, every other line untouched."""
    data = make_demo_dataset(tmp_path / "data" / "style_train", n=4, resolution=64)
    text = text.replace("./data/style_train", str(data)).replace("./output/", f"{tmp_path}/output/")
    for model in ("./models/sd-v1-5-pruned.safetensors", "./models/Stable-diffusion/v1-5-pruned.safetensors"):
        text = text.replace(model, "tiny-demo")
    path = tmp_path / "article.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("article", [ARTICLE_FLAT, ARTICLE_SAVE_STEPS, ARTICLE_NESTED],
                         ids=["flat-q_proj", "flat-save_steps", "nested"])
def test_the_articles_configs_train_as_written(article, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = as_written(article, tmp_path)
    assert main(["train", "-c", str(path), "--set", "data.resolution=64"]) == 0
    out_dir = Path(yaml.safe_load(path.read_text())["output"]["output_dir"] if "output:" in article
                   else yaml.safe_load(path.read_text())["output_dir"])
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (out_dir / "config.yaml").is_file() and any((out_dir / "logs").glob("events.out.tfevents.*"))
    assert len(list(out_dir.glob("*.safetensors"))) == 2  # and the kohya file for the WebUI
    assert "finished:" in capsys.readouterr().out


@pytest.mark.parametrize("script, command", [("train.py", "train"), ("auto_label.py", "label")])
def test_the_articles_commands_are_ours(script, command):
    """``python train.py --config`` and ``python auto_label.py --input --output`` run our CLI's commands."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert done.returncode == 0 and f"usage: lora-trainer {command}" in done.stdout
    if command == "label":
        assert "--input" in done.stdout and "--output" in done.stdout
