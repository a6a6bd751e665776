"""Which attention kernel the UNet trains with: PyTorch SDPA, or xformers where it is installed.

``training.attention``: auto (SDPA), sdpa, xformers. Both kernels are memory-efficient: neither keeps the
tokens × tokens attention matrix for the backward pass, so activation memory grows with the number of
tokens, not its square.

- diffusers UNets already default to SDPA (``AttnProcessor2_0``); xformers goes in through diffusers'
  own ``enable_xformers_memory_efficient_attention``.
- LDM UNets (the WebUI's loaded model) compute attention in ``CrossAttention.forward``, which the WebUI
  replaces with its "cross attention optimization". Its default is a sliced einsum + softmax (A1111
  v1.10's "Automatic": Doggettx on CUDA without --xformers, InvokeAI on the CPU): slicing saves memory
  in generation, but for the backward pass autograd keeps every slice's softmax, the whole matrix.
  For training, each CrossAttention instance gets its own ``forward`` here (an instance attribute, so
  the WebUI's class-level choice is untouched; a forward another extension set on the instance is kept
  and put back) and ``restore_ldm_attention`` takes it out again. The WebUI's hypernetworks, which its own
  forwards apply to the context, are not applied while training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.config import CHOICES
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)
KINDS = CHOICES["attention"]  # auto, sdpa, xformers
_MARK = "_lora_trainer_attention"  # set on the instances whose forward is ours: the kernel
_PREVIOUS = "_lora_trainer_previous_forward"  # an instance-level forward that was there before ours
_UPCAST = "_lora_trainer_upcast"


def resolve_attention(kind: str) -> str:
    """``kind`` as it will run here ("sdpa" or "xformers"); a ConfigError before any model loads if it can't."""
    if kind not in KINDS:
        raise ConfigError(f"training.attention: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("training.attention: 'xformers' needs the xformers package (pip install xformers, "
                          "CUDA only); or use 'sdpa' (PyTorch's own, as fast on PyTorch 2) or 'auto'")
    if kind == "xformers" and not torch.cuda.is_available():
        raise ConfigError("training.attention: 'xformers' runs on CUDA GPUs only and there is none here; "
                          "use 'sdpa' or 'auto'")
    return "sdpa" if kind == "auto" else kind


# --- LDM (CompVis / A1111) CrossAttention
def _is_ldm_attention(module: nn.Module) -> bool:
    # ldm's and sgm's (SDXL) CrossAttention only: MemoryEfficientCrossAttention is xformers already (the WebUI
    # aliases it to CrossAttention in ldm, and turns it off in sgm)
    cls = type(module)
    return (cls.__name__ == "CrossAttention" and cls.__module__.split(".")[0] in ("ldm", "sgm")
            and all(hasattr(module, a) for a in ("heads", "scale", "to_q", "to_k", "to_v", "to_out")))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # b n (h d) -> b h n d


def _ldm_forward(self, x, context=None, mask=None, **kwargs):
    """LDM CrossAttention's computation (q from x; k, v from the context) in a memory-efficient kernel."""
    if kwargs.get("additional_tokens") is not None or kwargs.get("n_times_crossframe_attn_in_self"):
        return type(self).forward(self, x, context, mask, **kwargs)  # sgm's video extras: the host's own forward
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    upcast, dtype = getattr(self, _UPCAST), q.dtype  # the WebUI's "upcast cross attention layer to float32"
    with (torch.autocast(q.device.type, enabled=False) if upcast and _autocast_on(q.device.type)
          else contextlib.nullcontext()):
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        default_scale = math.isclose(self.scale, (q.shape[-1] // self.heads) ** -0.5)  # LDM's: dim_head ** -0.5
        if getattr(self, _MARK) == "xformers" and mask is None and default_scale:
            import xformers.ops

            q, k, v = (t.unflatten(-1, (self.heads, -1)).contiguous() for t in (q, k, v))  # b n h d
            out = xformers.ops.memory_efficient_attention(q, k, v).flatten(2)
        else:
            if mask is not None:  # LDM: True where a key may be attended to, the same for every head and query
                mask = mask.reshape(mask.shape[0], 1, 1, -1)
            extra = {} if default_scale else {"scale": self.scale}  # (torch 2.0's SDPA has no ``scale``)
            out = F.scaled_dot_product_attention(*(_heads_first(t, self.heads) for t in (q, k, v)),
                                                 attn_mask=mask, **extra)
            out = out.transpose(1, 2).flatten(2)  # b h n d -> b n (h d)
    return self.to_out(out.to(dtype))


def use_ldm_attention(unet: nn.Module, kind: str, upcast: bool = False) -> int:
    """Give every LDM CrossAttention in ``unet`` a forward with ``kind``'s kernel; returns how many."""
    kind = resolve_attention(kind)
    count = 0
    for module in unet.modules():
        if _is_ldm_attention(module):
            if _MARK not in module.__dict__ and "forward" in module.__dict__:
                setattr(module, _PREVIOUS, module.__dict__["forward"])
            module.forward = types.MethodType(_ldm_forward, module)
            setattr(module, _MARK, kind)
            setattr(module, _UPCAST, upcast)
            count += 1
    log.info("attention: %s in %d attention layers of the UNet while training", kind, count)
    return count


def restore_ldm_attention(unet: nn.Module) -> int:
    """Take out what ``use_ldm_attention`` put in: the layers compute with the host's forward again."""
    count = 0
    for module in unet.modules():
        state = module.__dict__
        if _MARK in state:
            forward = state.get("forward")
            if getattr(forward, "__func__", None) is _ldm_forward:  # not replaced by someone else since
                del state["forward"]
                if _PREVIOUS in state:
                    state["forward"] = state[_PREVIOUS]
            for name in (_MARK, _PREVIOUS, _UPCAST):
                state.pop(name, None)
            count += 1
    return count


# --- diffusers UNets
def use_diffusers_attention(unet: nn.Module, kind: str) -> None:
    kind = resolve_attention(kind)
    if kind == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:  # diffusers' non-SDPA default becomes SDPA; other processors (an IP-Adapter's, say) stay
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processors = unet.attn_processors
        if any(type(p) is AttnProcessor for p in processors.values()):
            unet.set_attn_processor({name: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                     for name, p in processors.items()})
    log.info("attention: %s in the UNet", kind)
