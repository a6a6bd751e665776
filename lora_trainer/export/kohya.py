"""The kohya-format LoRA file that AUTOMATIC1111, Forge, ComfyUI and diffusers load.

Keys: ``<prefix><module path, '.'→'_'>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r] and
``.alpha`` (0-d, the true lora_alpha: strength scale = alpha / r).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from lora_trainer.export.hashes import legacy_hash, model_hash
from lora_trainer.utils.fsio import write_new

log = logging.getLogger(__name__)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def peft_to_kohya(state_dict: dict, prefix: str, alpha: float, dtype: torch.dtype | None = None) -> dict:
    """peft LoRA weights (``<path>.lora_A.weight`` / ``.lora_B.weight``) → kohya keys with the true alpha."""
    out = {}
    for key, tensor in state_dict.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise ValueError(f"not a peft LoRA weight key: {key!r}")
        name = prefix + m["module"].replace(".", "_")
        part = "lora_down" if m["ab"] == "A" else "lora_up"
        t = tensor.detach().to("cpu").contiguous()
        out[f"{name}.{part}.weight"] = t.to(dtype) if dtype is not None else t
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out


def serialize_with_hashes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """The file's bytes: hashes computed on the file with the ss_* metadata only, then added (as kohya)."""
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a string, got {type(value).__name__}")
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    data = save(tensors, metadata=meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash(data), legacy_hash(data)
    return save(tensors, metadata=meta)


def save_kohya_lora(path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write the LoRA with hashes; never overwrites (``name_1.safetensors`` if the name is taken)."""
    data = serialize_with_hashes(tensors, metadata)
    path = Path(path)
    written = write_new(path, lambda p: p.write_bytes(data))
    if written != path:
        log.warning("%s already exists; not overwriting it: wrote %s instead", path, written.name)
    return written


def read_kohya_lora(path) -> tuple[dict, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
