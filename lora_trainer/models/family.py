"""A model's family read from its files, without loading it: what the per-family defaults (``config.FAMILY_DEFAULTS``)
are keyed on before a model loads (the dataset check's resolution, the standalone tab's fields). Once a model is
loaded, ``engine.run.model_family(backend)`` says the same from the backend.

A diffusers folder: ``model_index.json`` (an SDXL pipeline class or a second text encoder: ``sdxl``, as
``sdxl_backend.is_sdxl_model`` decides), else the UNet's cross-attention width (1024: SD 2.x, as
``DiffusersBackend`` decides) and the scheduler's prediction type (SD 2.x with v-prediction: ``sd_v2_768_v``). A single
``.safetensors`` file: its key names (``single_file.detect_family``). The built-in tiny models by name.
"""

from __future__ import annotations

import json
from pathlib import Path

KNOWN = ("sd_v1", "sd_v2", "sdxl")  # what the files can tell; sd_v2 + v-prediction → sd_v2_768_v


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _folder_family(folder: Path) -> tuple[str | None, str | None]:
    """(family, the scheduler's prediction type) of a diffusers folder; (None, None) if it is not one."""
    index = _json(folder / "model_index.json")
    if index is None:
        return None, None
    scheduler = _json(folder / "scheduler" / "scheduler_config.json") or {}
    prediction = scheduler.get("prediction_type")
    if str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return "sdxl", prediction
    unet = _json(folder / "unet" / "config.json")
    if unet is None or "cross_attention_dim" not in unet:
        return None, prediction
    return ("sd_v2" if unet["cross_attention_dim"] == 1024 else "sd_v1"), prediction


def _file_family(path: Path) -> str | None:
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.models.single_file import detect_family

    if path.suffix.lower() != ".safetensors":
        return None
    try:
        family = detect_family(path)
    except ModelLoadError:
        return None
    return family if family in KNOWN else None


def family_of(base_model: str | None, prediction_type: str = "auto") -> str | None:
    """``sdxl``, ``sd_v2_768_v``, ``sd_v2`` or ``sd_v1`` for a ``model.base_model`` value, read from its files
    (nothing is loaded); None where they do not say (no such path, not a model we know, unreadable).
    ``prediction_type``: the config's ``model.prediction_type`` (``auto``: the model's scheduler's)."""
    from lora_trainer.models.tiny import TINY_NAME
    from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAMES

    if not base_model or not str(base_model).strip():
        return None
    base_model = str(base_model).strip()
    if base_model == TINY_NAME:
        return "sd_v1"
    if base_model in TINY_SDXL_NAMES:
        return "sdxl"
    path = Path(base_model).expanduser()
    if path.is_dir():
        family, prediction = _folder_family(path)
    elif path.is_file():
        family, prediction = _file_family(path), None  # (a single file does not name its prediction type)
    else:
        return None
    if prediction_type != "auto":
        prediction = prediction_type
    return "sd_v2_768_v" if family == "sd_v2" and prediction == "v_prediction" else family
