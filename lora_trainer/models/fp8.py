"""``training.fp8_base``: the frozen UNet's weights stored in float8 (e4m3) and upcast layer by layer when used.

diffusers' layerwise casting does it (``ModelMixin.enable_layerwise_casting``, diffusers 0.33 and newer): a hook on
each Linear and Conv layer casts its weights to the compute dtype (the run's precision) just before the layer runs
and back to float8 after; the norms keep their dtype (the UNet's own skip list). It is applied once the LoRA layers
are in: diffusers then leaves peft's adapter layers alone, so the LoRA weights stay fp32 and trainable. (The other
order does not: peft moves a new adapter to its base layer's dtype, which would round LoRA A's initial values to
float8's three mantissa bits before they are cast back to fp32.)

For training, one thing is added: diffusers casts a layer's weights in place (``module.to``), and autograd keeps a
frozen layer's weight for the backward pass by reference, so the cast back to float8 after the layer ran would reach
the saved weight too (a convolution's backward then finds a float8 weight: "expected scalar type Float but found
Float8_e4m3fn"). While a cast layer runs, torch makes new Parameter objects on conversion instead
(``torch.__future__.set_overwrite_module_params_on_conversion``; the layer's own frozen weights only, never a LoRA
weight the optimizer holds): the saved weight stays the compute-dtype tensor the layer used, until the backward pass
is done with it. Gradient checkpointing recomputes each block to its end, so every layer it ran is float8 again.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

STORAGE_DTYPE = getattr(torch, "float8_e4m3fn", None)  # (torch 2.1 and newer)
KEY = "training.fp8_base"
HOOK = "lora_trainer_new_parameters_on_cast"


def is_diffusers_model(module) -> bool:
    """Whether ``module`` is a diffusers model (``ModelMixin``), whose layerwise casting stores it in float8."""
    from diffusers import ModelMixin

    return isinstance(module, ModelMixin)


def check_fp8_base(backend=None) -> None:
    """Before any model loads: refuse ``training.fp8_base`` where it cannot work, saying what it needs. ``backend``: the
    one the caller brought, if any (the WebUI's loaded model is not a diffusers model: refused)."""
    if backend is not None and not getattr(backend, "can_fp8_base", False):
        raise ConfigError(f"{KEY}: this model ({type(backend).__name__}) cannot keep its UNet in float8: it works on a "
                          "diffusers model (the command line and the standalone app), not on the WebUI's loaded model; "
                          "set fp8_base: false")
    if STORAGE_DTYPE is None:
        raise ConfigError(f"{KEY}: needs PyTorch 2.1 or newer (torch.float8_e4m3fn); this is torch "
                          f"{torch.__version__}. Upgrade torch or set fp8_base: false")
    import diffusers
    from diffusers import ModelMixin

    if not hasattr(ModelMixin, "enable_layerwise_casting"):
        raise ConfigError(f"{KEY}: needs diffusers 0.33 or newer (its layerwise casting, "
                          f"ModelMixin.enable_layerwise_casting); this is diffusers {diffusers.__version__}. It works "
                          "on the command line and in the standalone app with a newer diffusers, not in the WebUI tab "
                          "(the WebUI's libraries keep an older one); set fp8_base: false")


def _checkpoint(module: nn.Module, *args):
    """torch's non-reentrant checkpoint, as diffusers calls it, recomputing each block to its end (else the layer
    where the recompute stops stays in the compute dtype until its next use)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    with set_checkpoint_early_stop(False):
        return checkpoint(module.__call__, *args, use_reentrant=False)


@functools.cache
def _new_parameters_on_cast():
    """A diffusers hook class around a cast layer's forward (its casts included): the casts make new Parameter objects
    (torch's switch is process-wide: it is on only while such a layer runs)."""
    from diffusers.hooks import ModelHook

    class NewParametersOnCast(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            before = torch.__future__.get_overwrite_module_params_on_conversion()
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                torch.__future__.set_overwrite_module_params_on_conversion(before)

    return NewParametersOnCast


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def store_unet_in_fp8(backend, checkpointing: bool) -> int:
    """The frozen UNet weights of ``backend`` in float8 from now on, computed in the backend's weight dtype (fp32 on
    the CPU, the mixed precision on a GPU); after the LoRA layers are injected and gradient checkpointing is on.
    Returns the bytes of UNet weights saved."""
    from diffusers.hooks import HookRegistry

    from lora_trainer.models.base import UNET

    check_fp8_base(backend)
    unet = backend.components()[UNET]
    before = weight_bytes(unet)
    unet.enable_layerwise_casting(storage_dtype=STORAGE_DTYPE, compute_dtype=backend.weight_dtype)
    for layer in unet.modules():  # the layers diffusers casts: those with float8 weights of their own now
        if any(p.dtype == STORAGE_DTYPE for p in layer.parameters(recurse=False)):
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(_new_parameters_on_cast()(), HOOK)
    if checkpointing:
        unet.enable_gradient_checkpointing(_checkpoint)
    else:
        log.warning("fp8_base without gradient_checkpointing: the UNet's weights take half the memory between steps, "
                    "but the backward pass keeps every layer's weights in %s until it is done, so a step's peak "
                    "drops little; turn on training.gradient_checkpointing to save memory there too",
                    str(backend.weight_dtype).replace("torch.", ""))
    after = weight_bytes(unet)
    stored = sum(p.numel() for p in unet.parameters() if p.dtype == STORAGE_DTYPE)
    log.info("fp8_base: %.1f M frozen UNet weights stored in float8, computed in %s: UNet weights %.0f MB → %.0f MB",
             stored / 1e6, str(backend.weight_dtype).replace("torch.", ""), before / 2**20, after / 2**20)
    return before - after
