"""Why the loss became non-finite: a diagnosis, not a guess.

In order: were the step's inputs finite (the latents, the text conditioning)? Were the LoRA weights still
finite (else the previous update broke them, and its gradient norm says whether the backward pass did)?
Then one re-run of the step's forward pass, with the same noise and timesteps and a hook on every layer,
finds the first layer whose output is non-finite although its inputs were finite: an fp16 overflow, a
LoRA layer whose weights grew too large, or the base model's own weights. Only when nothing else explains
it is the learning rate blamed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_trainer.utils.text import name_list

FP16_MAX = 65504.0


def _tensors(value) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a module's inputs or output (tuples, lists, dicts, diffusers outputs)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _finite(value) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value))


def _largest(value) -> float:
    sizes = [float(t.detach().abs().nan_to_num(0, 0, 0).max()) for t in _tensors(value) if t.numel()]
    return max(sizes, default=0.0)


@dataclass
class Origin:
    """The first layer that turned finite inputs into a non-finite output."""

    name: str
    dtype: torch.dtype
    largest_input: float
    lora: bool  # a LoRA layer of ours (peft's wrapper or its lora_A / lora_B), not the base model's


@contextlib.contextmanager
def first_nonfinite(modules: dict[str, nn.Module]) -> Iterator[list[Origin]]:
    """While inside, the first layer (in the order they ran) whose output is non-finite while its inputs are
    finite lands in the yielded list."""
    found: list[Origin] = []

    def hook(name: str):
        def check(module, inputs, output):
            if found or _finite(output) or not _finite(inputs):
                return
            out = next((t for t in _tensors(output) if not bool(torch.isfinite(t).all())), None)
            found.append(Origin(name, out.dtype if out is not None else torch.float32, _largest(inputs),
                                ".lora_" in f".{name}" or hasattr(module, "lora_A")))
        return check

    handles = [m.register_forward_hook(hook(f"{prefix}.{n}" if n else prefix))
               for prefix, root in modules.items() if root is not None for n, m in root.named_modules()]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepInputs:
    latents: torch.Tensor
    cond: object  # models.conditioning.Conditioning
    images: list[Path]  # the micro-batch's image files, row by row
    captions: list[str]


def _bad_rows(x: torch.Tensor) -> list[int]:
    return [i for i in range(x.shape[0]) if not bool(torch.isfinite(x[i]).all())]


def diagnose_nonfinite_loss(value: float, step: int, precision: str, inputs: StepInputs, lora_params: list,
                            grad_norm: torch.Tensor | None, modules: dict[str, nn.Module],
                            rerun: Callable[[], torch.Tensor], explain_text: Callable[[str], str]) -> str:
    """The message for a loss that became ``value`` at ``step``; ``rerun`` runs the step's forward pass again
    with the same noise and returns its loss."""
    head = f"the loss became {value} at step {step}"
    lr_advice = "lower training.learning_rate" + (" or train in bf16/fp32 (mixed_precision bf16 or no)"
                                                  if precision == "fp16" else "")
    rows = _bad_rows(inputs.latents)
    if rows:
        images = name_list((inputs.images[i].name for i in rows), limit=4)
        return (f"{head}: its inputs were not finite: the latents of {images} "
                "(the VAE's output for these images; run the dataset check on them, or train with a fp32 VAE)")
    if not all(bool(torch.isfinite(p).all()) for p in lora_params):
        norm = None if grad_norm is None else float(grad_norm)
        why = (f"the backward pass of step {step - 1} gave non-finite gradients" if norm is not None
               and not math.isfinite(norm) else f"step {step - 1}'s update made them so")
        return f"{head}: the LoRA weights were already non-finite ({why}): {lr_advice}, and resume"
    rows = inputs.cond.bad_rows()
    if rows:
        caption = inputs.captions[rows[0]]
        return f"{head}: its text conditioning was not finite, for the caption {caption!r}: {explain_text(caption)}"
    with torch.no_grad(), first_nonfinite(modules) as found:
        again = float(rerun())
    if found:
        return f"{head}: {_describe(found[0], lora_params, lr_advice)}"
    if math.isfinite(again):
        return (f"{head}, but the same step run again with checks gave a finite loss ({again:.4g}): the model's "
                f"layers were finite, so a nondeterministic kernel or the loss computation produced it; {lr_advice} "
                "and resume; if it happens again, report it")
    return (f"{head}: every layer of the model gave finite values, the loss computation did not (the noise "
            f"scheduler's target?); {lr_advice} and resume; if it happens again, report it")


def _describe(origin: Origin, lora_params: list, lr_advice: str) -> str:
    dtype = str(origin.dtype).replace("torch.", "")
    where = f"the forward pass first gave non-finite values in {origin.name} ({dtype})"
    if origin.lora:
        largest = max((float(p.detach().abs().max()) for p in lora_params if p.numel()), default=0.0)
        overflow = " (an fp16 overflow)" if origin.dtype == torch.float16 else ""
        return f"{where}{overflow}, a LoRA layer, whose weights have grown to |w| up to {largest:.3g}: {lr_advice}"
    if origin.dtype == torch.float16:
        return (f"{where}, with finite inputs up to {origin.largest_input:.3g}: an fp16 overflow (fp16 holds up to "
                f"{FP16_MAX:g}); use mixed_precision bf16 or no")
    return (f"{where}, from finite inputs (up to {origin.largest_input:.3g}): the base model's own weights give "
            "non-finite values there (a damaged checkpoint?)")


def diagnose_nonfinite_gradients(step: int, precision: str, grads: dict[str, torch.Tensor | None],
                                 images: list[Path]) -> str:
    """The message for gradients that became non-finite at ``step`` although its loss was finite (outside fp16,
    where the GradScaler skips such a step itself): the backward pass made them. ``grads``: each LoRA parameter's
    gradient by name; ``images``: the step's image files."""
    bad = [name for name, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]
    where = f", in {name_list(bad, limit=3)}" if bad and len(bad) < len(grads) else ""
    advice = "lower training.learning_rate" + (" or train in fp32 (mixed_precision no)" if precision == "bf16" else "")
    return (f"the gradients became non-finite at step {step} although its loss was finite: the backward pass gave "
            f"non-finite values{where} (images {name_list((p.name for p in images), limit=4)}): {advice}")
