"""The diffusers-format LoRA (``pytorch_lora_weights.safetensors``), for ``pipe.load_lora_weights``.

Older diffusers store no alpha in this file and load it with alpha = rank. So that this file and the
kohya file give the same output whatever the loader assumes, alpha / rank is folded into lora_B here.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from lora_trainer.utils.fsio import write_new

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LORA_B = re.compile(r"\.lora_B(\.[^.]+)?\.weight$")


def fold_alpha(state: dict, rank: int, alpha: float, dtype: torch.dtype | None = None) -> dict:
    """Scale every lora_B by alpha / rank, so a loader that assumes alpha = rank gets the right strength."""
    scale = float(alpha) / float(rank)
    out = {k: (v.float() * scale if _LORA_B.search(k) else v.float()).detach().cpu() for k, v in state.items()}
    return {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in out.items()}


def save_diffusers_lora(output_dir, unet_state: dict, text_encoder_state: dict | None = None, *,
                        rank: int, alpha: float, dtype: torch.dtype | None = None) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` (never over an existing file); return its path."""
    from diffusers import StableDiffusionPipeline

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".diffusers-lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=fold_alpha(unet_state, rank, alpha, dtype),
            text_encoder_lora_layers=fold_alpha(text_encoder_state, rank, alpha, dtype) if text_encoder_state else None,
            safe_serialization=True,
        )
        data = (Path(tmp) / WEIGHT_NAME).read_bytes()
    return write_new(output_dir / WEIGHT_NAME, lambda p: p.write_bytes(data))
