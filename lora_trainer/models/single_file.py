"""Single-file SD 1.x checkpoints (what the WebUI keeps in models/Stable-diffusion), loaded offline.

diffusers' ``from_single_file`` needs the model's diffusers config files and tokenizer; they ship in
``configs/sd15`` (no weights), so nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.compat import dtype_kwargs

log = logging.getLogger(__name__)

SD15_CONFIG = Path(__file__).parent / "configs" / "sd15"
FAMILY_NAMES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                "unknown": "not a Stable Diffusion checkpoint we recognise"}


def detect_family(path) -> str:
    """``sd_v1``, ``sd_v2``, ``sdxl`` or ``unknown``, from the key names only (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"model.base_model: {path} is not a readable .safetensors file ({e})") from None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd_v2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and any(
            k.startswith("model.diffusion_model.") for k in keys):
        return "sd_v1"
    return "unknown"


def load_single_file_pipeline(path, torch_dtype: torch.dtype = torch.float32, config_dir=None):
    """Load a single-file SD 1.x ``.safetensors`` checkpoint as a StableDiffusionPipeline, offline."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model.base_model: {path} does not exist (or is not a file)")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"model.base_model: {path} is not a .safetensors file; pickle checkpoints (.ckpt, .pt, "
                             ".bin) are not loaded for safety (they can run code): convert it to .safetensors")
    family = detect_family(path)
    if family != "sd_v1":
        raise ModelLoadError(f"model.base_model: {path.name} looks like {FAMILY_NAMES[family]}; single-file "
                             "checkpoints of Stable Diffusion 1.x only are supported for now (for SD 2.x, point "
                             "base_model at a diffusers folder)")
    config = Path(config_dir) if config_dir else SD15_CONFIG
    if not (config / "model_index.json").is_file():
        # diffusers reads any other string as a hub repo id and, finding nothing cached, downloads it
        # even with local_files_only=True: refuse before that can happen
        raise ModelLoadError(f"model.base_model: the config folder {config} for {path.name} has no model_index.json "
                             "(a diffusers-format config folder is needed; a broken install misses the shipped one)")
    log.info("loading single-file checkpoint %s (config %s)", path, config)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, **dtype_kwargs(torch_dtype),
            safety_checker=None, requires_safety_checker=False,
        )
    except Exception as e:  # diffusers raises many kinds (OSError, ValueError, KeyError, RuntimeError...)
        raise ModelLoadError(f"model.base_model: could not load {path}: {type(e).__name__}: {e}") from e
