"""LoRA layers via peft: inject into a module tree, read them out, take them away again."""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from lora_trainer.errors import ConfigError

ADAPTER = "default"


def _short(path: str) -> str:  # "…attn1.to_out.0" → "to_out.0", "…attn1.to_q" → "to_q"
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _linear_names(module: nn.Module) -> list[str]:
    """The layer names a target can take, the attention projections first (what a LoRA usually targets)."""
    names = {_short(n) for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}
    return sorted(names, key=lambda n: (not n.startswith(("to_", "q_", "k_", "v_", "out_", "o_")), n))


def check_targets(module: nn.Module, target_modules: list[str], key: str) -> None:
    """Every name of ``target_modules`` names a layer of ``module`` (as peft matches it: the whole path, or its end
    after a dot), and a layer, not a block of them ("to_out" is a ModuleList: "to_out.0" is its Linear). peft itself
    drops a name that matches nothing when another one matches, and fails on a block only once the model is in."""
    named = [(n, m) for n, m in module.named_modules() if n]
    missing, blocks = [], []
    for target in target_modules:
        hits = [m for n, m in named if n == target or n.endswith("." + target)]
        if not hits:
            missing.append(target)
        elif all(next(m.children(), None) is not None and not hasattr(m, "base_layer") for m in hits):  # (a
            # layer with LoRA layers in it already, peft's, is one: a host's model that still has a run's)
            inside = sorted({_short(f"{target}.{c}") for m in hits for c, _ in m.named_children()})
            blocks.append(f"{target!r} is a block of layers ({', '.join(inside[:4])})")
    if not missing and not blocks:
        return
    problems = blocks + ([f"{', '.join(map(repr, missing))} name{'s' if len(missing) == 1 else ''} no layer of this "
                          "model" if len(missing) < len(target_modules) else
                          f"none of {list(target_modules)} match a layer of this model"] if missing else [])
    raise ConfigError(f"{key}: {'; '.join(problems)}; its layer names: {', '.join(_linear_names(module))}")


def add_lora(module: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str],
             key: str = "training.target_modules", custom_modules: dict | None = None,
             layers: dict[str, tuple[int, float]] | None = None) -> list[nn.Parameter]:
    """Inject LoRA layers into ``module`` (in place) and return the new trainable parameters.

    LoRA B starts at zero (peft's default), so the model's output is unchanged until training moves it.
    ``custom_modules``: layer class → peft LoRA layer class, for a host's own layer classes that are not torch's
    (Forge's Linear); peft's custom-module mapping (``LoraConfig._register_custom_module``, peft >= 0.12).
    ``layers``: more layers by their whole path, each with its own (rank, alpha) (``resnet_layers``: kohya's
    conv_dim), through peft's rank_pattern and alpha_pattern.
    """
    from peft import LoraConfig, inject_adapter_in_model

    check_targets(module, target_modules, key)
    layers = layers or {}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules) + list(layers), init_lora_weights=True,
                        rank_pattern={_pattern(path): r for path, (r, _) in layers.items()},
                        alpha_pattern={_pattern(path): a for path, (_, a) in layers.items()})
    if custom_modules:
        config._register_custom_module(dict(custom_modules))
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _pattern(path: str) -> str:
    """A rank_pattern/alpha_pattern key that matches the layer ``path`` (``a.b.c``, two parts or more) alone, as peft
    0.13 matches keys (``.*\\.{key}$``) and as later peft does (``(.*\\.)?({key})$``): the path after its first part,
    that part pinned to the start by a lookbehind."""
    first, _, rest = path.partition(".")
    if not rest:
        raise ValueError(f"{path!r}: a layer path of two parts or more")
    return rf"(?<=^{re.escape(first)}\.){re.escape(rest)}"


# the UNet blocks kohya's networks.lora gives LoRA layers with conv_dim (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3), as
# diffusers names them and as the WebUI's LDM/sgm UNets and Forge's do
RESNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")


def resnet_layers(unet: nn.Module, rank: int, alpha: float, conv_rank: int,
                  conv_alpha: float) -> dict[str, tuple[int, float]]:
    """kohya's networks.lora with conv_dim: every layer inside the UNet's ResNet blocks and down/upsamplers, by
    path, with its (rank, alpha): a convolution with a larger kernel than 1×1 (conv1, conv2, the samplers' conv)
    at ``conv_rank``/``conv_alpha``, a Linear or 1×1 convolution (time_emb_proj, conv_shortcut) at ``rank``/``alpha``.
    A layer is told by its weight (2-D: Linear, 4-D: convolution), whatever its class (Forge's Linear is its own)."""
    found, convs = {}, 0
    for name, block in unet.named_modules():
        if type(block).__name__ not in RESNET_BLOCKS:
            continue
        for child, layer in block.named_modules():
            weight = getattr(layer, "weight", None)
            if not child or next(layer.children(), None) is not None or not isinstance(weight, torch.Tensor):
                continue
            if weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1):
                found[f"{name}.{child}"] = (conv_rank, conv_alpha)
                convs += 1
            elif weight.ndim in (2, 4):
                found[f"{name}.{child}"] = (rank, alpha)
    if not convs:
        raise ConfigError(f"training.conv_rank: {conv_rank}: this UNet has no ResNet blocks with convolutions "
                          f"({type(unet).__name__}); set conv_rank: 0")
    return found


def uncastable_lora_layers(modules) -> list[nn.Module]:
    """The LoRA layers of ``modules`` whose input cast peft can skip (``cast_input_dtype_enabled``, peft >= 0.15;
    an empty list with older peft, where the cast always happens)."""
    return [m for module in modules for m in module.modules()
            if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]


@contextlib.contextmanager
def lora_input_casts_off(layers: list[nn.Module]):
    """Under autocast: the LoRA branch takes its input as it comes (bf16/fp16) instead of peft's cast to the LoRA
    weights' fp32, which autocast then casts straight back for the matmul. Both casts are exact (a half-precision
    value is an fp32 value), so the loss and the gradients are bit for bit the same, without two full-size copies
    of every LoRA layer's input a step (the H200 profile: 1,696 copy kernels a step, SD 1.5 at batch 8).
    Not with gradient checkpointing or torch.compile (a recomputed or compiled forward must see what this one saw)."""
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def lora_alphas(module: nn.Module) -> dict[str, float]:
    """Each LoRA layer's alpha by its path, as peft holds it (rank_pattern/alpha_pattern give layers their own)."""
    return {name: float(layer.lora_alpha[ADAPTER]) for name, layer in module.named_modules()
            if isinstance(getattr(layer, "lora_alpha", None), dict) and ADAPTER in layer.lora_alpha}


def lora_state_dict(module: nn.Module) -> dict:
    """The LoRA weights of ``module`` in peft's key format (``<path>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def trainable_state(modules: dict[str, nn.Module]) -> dict:
    """Every trainable tensor by ``<component>.<parameter name>``: what a checkpoint must restore."""
    return {
        f"{comp}.{name}": p.detach()
        for comp, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(modules: dict[str, nn.Module], state: dict) -> None:
    """Copy a ``trainable_state`` back into the same (already injected) modules."""
    expected = trainable_state(modules)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            "training.resume_from_checkpoint: the checkpoint's LoRA layers do not match this config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rank, target modules and "
            "train_text_encoder must be the same as in the run that wrote it"
        )
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise ConfigError(
                f"training.resume_from_checkpoint: {key} has shape {tuple(state[key].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} here; was lora_rank changed?"
            )
        tensor.copy_(state[key])


def remove_lora(module: nn.Module) -> int:
    """Take every peft LoRA layer out of ``module``, putting the original layers back; returns how many.

    The base layers were never modified (no merge), so the module computes exactly what it did before.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    replaced = 0
    for name, child in list(module.named_modules()):
        if not name or not isinstance(child, BaseTunerLayer):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, child.get_base_layer())
        replaced += 1
    return replaced
