"""The optimizer: AdamW, or 8-bit AdamW where bitsandbytes is installed."""

from __future__ import annotations

import importlib.util

import torch

from lora_trainer.errors import ConfigError


def check_optimizer(name: str) -> None:
    """Fail before any model loads if the optimizer cannot be built here."""
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("training.optimizer: 'adamw8bit' needs the bitsandbytes package "
                          "(pip install bitsandbytes, CUDA only); or use 'adamw'")


def build_optimizer(t, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # fused: one kernel for all LoRA tensors instead of a few per tensor (CUDA; the params are fp32 there)
    return torch.optim.AdamW(param_groups, fused=device.type == "cuda", **kwargs)
