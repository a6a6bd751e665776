"""Gradient checkpointing for a transformers model whose LoRA layers train over frozen weights, in every
transformers release the hosts pin (A1111: 4.30.2, Forge: 4.46.1) and the newest."""

from __future__ import annotations

import inspect


def enable_lora_checkpointing(model) -> None:
    """Gradient checkpointing of a transformers model (a text encoder, a language model) whose LoRA layers train.
    Its layers' input (the frozen embeddings) carries no gradient, so transformers' reentrant checkpoint (its
    default before 5, the only kind in A1111's 4.30.2) would give every checkpointed layer's LoRA no gradient at
    all, silently. Where transformers takes the choice (4.35+; 5 renamed the method activation_checkpointing_enable)
    the checkpoint is torch's non-reentrant one; before that, the embeddings' output is made to require grad (a hook
    that ``disable_lora_checkpointing`` takes out again)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()


def disable_lora_checkpointing(model) -> None:
    """Undo ``enable_lora_checkpointing`` (nothing if it is off): the model as it was (a WebUI's text encoder)."""
    if getattr(model, "is_gradient_checkpointing", False):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
