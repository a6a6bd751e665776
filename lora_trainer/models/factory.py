"""The one place a backend is made from a config (command line and standalone app), and its precision named.

The WebUI makes its own backend over the model it has loaded (``lora_trainer.webui.host``); whichever way
a backend came, ``precision_of`` reads the run's precision back from it.
"""

from __future__ import annotations

import torch

from lora_trainer.config import resolve_mixed_precision
from lora_trainer.models.tiny import TINY_NAME
from lora_trainer.models.tiny_sdxl import TINY_SDXL_NAMES

# the names model.base_model may take besides a path: the tiny models, built in code on first use
BUILTIN_MODELS = (TINY_NAME, *TINY_SDXL_NAMES)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(mixed_precision: str) -> tuple[torch.device, str]:
    """The GPU if there is one, and the precision ``mixed_precision`` resolves to on it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, resolve_mixed_precision(mixed_precision, device.type, bf16)


def load_backend(cfg):
    """A diffusers backend of ``cfg.model.base_model`` on the best device, at the precision the config asks:
    an SDXL one for an SDXL diffusers folder, a single-file SDXL checkpoint or a tiny SDXL model
    (``sdxl_backend.is_sdxl_model``), else the SD 1.x/2.x one. Where the latents are cached, the UNet waits on the
    CPU until the caches are built (the trainer's set-up: models.offload)."""
    from lora_trainer.models.diffusers_backend import load_diffusers_backend
    from lora_trainer.models.sdxl_backend import is_sdxl_model, load_sdxl_backend

    device, precision = pick_device(cfg.training.mixed_precision)
    load = load_sdxl_backend if is_sdxl_model(cfg.model.base_model) else load_diffusers_backend
    return load(cfg.model.base_model, device, DTYPES[precision], cfg.model.prediction_type,
                unet_waits=cfg.training.cache_latents)


def precision_of(backend) -> str:
    """The mixed_precision value that a backend's weight dtype stands for ("no" = fp32)."""
    return {v: k for k, v in DTYPES.items()}[backend.weight_dtype]
