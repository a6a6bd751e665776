"""Every switch between library versions the models need (A1111's pins and the newest releases)."""

from __future__ import annotations

import torch


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns in new releases, the new one is
    unknown to diffusers 0.30 as pinned with A1111)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present where dtype= exists)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
