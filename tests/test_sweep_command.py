"""``python -m lora_trainer sweep``: a trained LoRA at several strengths from the command line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.errors import LoraTrainerError
from lora_trainer.sweep import parse_strengths, run_sweep


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--output", str(root), "--steps", "4", "--images", "4", "--set", "learning_rate=1e-2"]) == 0
    return root / "run" / "demo_lora.safetensors"


def test_the_sweep_command_writes_each_strength_and_a_grid(demo_lora, tmp_path, capsys):
    """On the base model the run's config.yaml names (no --base); 0 is the base model alone, 1 the LoRA's change;
    a second sweep to the same name writes new files beside the first. (Where diffusers has no PEFT backend, as under
    the WebUI's transformers 4.30, the command says so before any work.)"""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        with pytest.raises(LoraTrainerError, match=r"^sweep: diffusers loads a LoRA .* needs transformers >= 4.34"):
            run_sweep(demo_lora, tmp_path / "g.png", "a", [1.0])
        assert not (tmp_path / "g.png").exists()
        return
    out = tmp_path / "sweep" / "grid.png"
    args = ["sweep", "--lora", str(demo_lora), "--prompt", "a red square", "--strengths", "0, 1", "--steps", "2",
            "--size", "64", "--out", str(out)]
    assert main(args) == 0
    assert f"grid:   {out}" in capsys.readouterr().out
    base, full = (np.asarray(Image.open(out.with_name(f"grid_s{s}.png")), dtype=np.int16) for s in ("0", "1"))
    assert base.shape == full.shape == (64, 64, 3) and np.abs(base - full).max() > 0
    assert Image.open(out).size == (128, 64 + 20)
    assert main(args) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png", "grid_1.png", "grid_s0.png", "grid_s0_1.png",
                                                          "grid_s1.png", "grid_s1_1.png"]


def test_the_sweep_command_names_what_is_wrong(demo_lora, tmp_path):
    with pytest.raises(LoraTrainerError, match="sweep --strengths: 'x' is not a number"):
        parse_strengths("0.5, x")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(demo_lora.read_bytes())  # (no run folder beside it: no config.yaml)
    with pytest.raises(LoraTrainerError, match="sweep: no --base given and .*config.yaml does not name the base model"):
        run_sweep(alone, tmp_path / "g.png", "a", [1.0])
    with pytest.raises(LoraTrainerError, match="sweep --out: .*g.jpg must end in .png"):
        run_sweep(demo_lora, tmp_path / "g.jpg", "a", [1.0])
    with pytest.raises(LoraTrainerError, match="sweep --lora: .*missing.safetensors is not a .safetensors file"):
        run_sweep(tmp_path / "missing.safetensors", tmp_path / "g.png", "a", [1.0])
    assert not (tmp_path / "g.png").exists()
