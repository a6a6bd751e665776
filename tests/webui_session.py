"""Test helper: the stand-in WebUI (tests/webui_stub) with a model loaded, as a fixture body for the WebUI tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_stub"))

import networks  # noqa: E402
from modules import paths, processing, sd_models, shared  # noqa: E402


def webui_with(sd_model, tmp_path: Path):
    """Load ``sd_model`` as ``shared.sd_model`` in a fresh stub WebUI rooted at ``tmp_path``; yields it, then
    unloads it."""
    shared.sd_model = sd_model
    shared.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
    shared.cmd_opts.lowvram = shared.cmd_opts.medvram = False
    paths.data_path = str(tmp_path)
    sd_models.model_path = str(tmp_path / "models" / "Stable-diffusion")
    processing.calls.clear()
    networks.loaded_networks.clear()
    yield sd_model
    shared.sd_model = None
