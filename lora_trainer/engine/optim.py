"""The optimizer: AdamW (fused on CUDA), 8-bit AdamW (bitsandbytes), Prodigy (prodigyopt: it finds its own step
size) or Adafactor (transformers'), with ``training.optimizer_args`` for the rest of its arguments."""

from __future__ import annotations

import importlib.util
import inspect

import torch

from lora_trainer.engine.checkpoint import STATEFUL_ARGS
from lora_trainer.errors import ConfigError

PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes, CUDA only"),
            "prodigy": ("prodigyopt", "pip install prodigyopt")}
# Adafactor as kohya's guides run it for LoRA: the learning rate given, no relative step or parameter scaling
ADAFACTOR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def check_optimizer(t) -> None:
    """Fail before any model loads if the optimizer cannot be built here, or does not take an argument of
    ``training.optimizer_args`` (it is built once on a stand-in parameter)."""
    package = PACKAGES.get(t.optimizer)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        raise ConfigError(f"training.optimizer: {t.optimizer!r} needs the {package[0]} package ({package[1]}); or "
                          "use 'adamw'")
    if t.optimizer == "adafactor" and t.optimizer_args.get("relative_step"):
        raise ConfigError("training.optimizer_args: relative_step: true makes Adafactor pick its own learning rate "
                          "with its own schedule, which this trainer does not run; leave it out (the learning rate "
                          "and lr_scheduler then apply)")
    stand_in = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        build_optimizer(t, [{"params": [stand_in], "lr": t.learning_rate}], torch.device("cpu"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"training.optimizer_args {t.optimizer_args}: {t.optimizer} refused them ({e}); its "
                          f"arguments: {', '.join(_arguments(t.optimizer))}") from None


def _arguments(name: str) -> list[str]:
    cls = _class(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]


def _class(name: str):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    return torch.optim.AdamW


def lora_groups(named_params, lr: float, name: str, plus_ratio: float | None = None) -> list[dict]:
    """The parameter groups of one model part's trainable LoRA weights (``named_params``: (name, parameter) pairs),
    each group named for messages: one at ``lr``; with ``plus_ratio`` (training.loraplus_lr_ratio, LoRA+ arXiv
    2402.12354, kohya's loraplus_lr_ratio) two, the B ("up") matrices at ``lr × plus_ratio``."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not plus_ratio:
        return [{"params": [p for _, p in params], "lr": lr, "name": name}]
    up = [p for n, p in params if "lora_B" in n]
    return [{"params": [p for n, p in params if "lora_B" not in n], "lr": lr, "name": name},
            {"params": up, "lr": lr * plus_ratio, "name": f"{name} B (LoRA+)"}]


def group_names(optimizer) -> list[str]:
    """Each parameter group's name (``lora_groups``), or its place."""
    return [g.get("name", f"group {k}") for k, g in enumerate(optimizer.param_groups)]


def build_optimizer(t, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``training.optimizer`` over ``param_groups`` (each with its ``lr``): the training section's
    betas, epsilon and weight decay where it takes them, ``training.optimizer_args`` over them."""
    cls = _class(t.optimizer)
    takes = set(_arguments(t.optimizer))
    common = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon, "weight_decay": t.weight_decay}
    kwargs = {k: v for k, v in common.items() if k in takes and t.optimizer != "adafactor"}  # (its eps is a pair)
    if t.optimizer == "adafactor":
        kwargs.update(ADAFACTOR, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":  # fused: one kernel for all LoRA tensors instead of a few per tensor (CUDA; fp32)
        kwargs["fused"] = device.type == "cuda"
    return cls(param_groups, **{**kwargs, **t.optimizer_args})


def changed_since(optimizer, scheduler, names: list[str], configured: list[dict], lrs: list[float], saved: dict,
                  optimizer_args: dict) -> list[str]:
    """On a resume, what the config changed since the checkpoint, applied over its loaded optimizer state (which
    holds the checkpoint's values): the optimizer's arguments (betas, eps, weight decay, ``optimizer_args``) of each
    parameter group (``names``; ``configured``: the groups as this config built them) and the learning rates
    (``lrs``: this config's base ones; ``saved``: the checkpoint's settings), each at the schedule's current step. A
    learning rate not changed keeps the checkpoint's, lowered by its NaN guard's rollbacks where it had any. Returns a
    line for each change."""
    changed = []
    keys = {"betas", "eps", "weight_decay", *optimizer_args} - set(STATEFUL_ARGS)  # (those: refused before)
    for name, group, now in zip(names, optimizer.param_groups, configured):
        for key in sorted(keys & set(now)):
            if group.get(key) != now[key]:
                changed.append(f"{name} {key} {group.get(key)!r} → {now[key]!r}")
                group[key] = now[key]
    before = saved.get("learning_rates")  # (a checkpoint from before they were kept: its own stay)
    if before is not None and len(before) == len(lrs) and before != lrs:
        base = [now if now != was else kept for now, was, kept in zip(lrs, before, scheduler.base_lrs)]
        changed += [f"{name} learning rate {was:g} → {now:g}" for name, now, was in zip(names, lrs, before)
                    if now != was]
        set_base_lrs(scheduler, base)
    return changed


def set_base_lrs(scheduler, base_lrs: list[float]) -> None:
    """New base learning rates for a schedule (diffusers' are LambdaLR), and the optimizer's current ones from
    them at the schedule's current step."""
    old = list(scheduler.base_lrs)
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for k, group in enumerate(groups):
        if lambdas is not None:
            group["lr"] = base_lrs[k] * lambdas[k](scheduler.last_epoch)
        else:
            group["lr"] = group["lr"] * (base_lrs[k] / old[k] if old[k] else 1.0)
        group["initial_lr"] = base_lrs[k]
    scheduler._last_lr = [g["lr"] for g in groups]


def lr_schedule(t, optimizer, total_steps: int):
    """``training.lr_scheduler`` over ``total_steps`` optimizer steps, after ``lr_warmup_steps`` of warm-up (constant
    with a warm-up is constant_with_warmup); cosine_with_restarts takes ``lr_scheduler_num_cycles`` cosines, polynomial
    decays with ``lr_scheduler_power`` (to 1e-7), as kohya's sd-scripts and the diffusers and transformers examples
    run them (transformers' schedules: the language-model trainer needs nothing of the image side)."""
    from transformers import optimization as schedules

    warmup = t.lr_warmup_steps
    name = "constant_with_warmup" if t.lr_scheduler == "constant" and warmup else t.lr_scheduler
    if name == "constant":
        return schedules.get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return schedules.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "cosine_with_restarts":
        return schedules.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total_steps,
                                                                            num_cycles=t.lr_scheduler_num_cycles)
    if name == "polynomial":
        return schedules.get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total_steps,
                                                                   power=t.lr_scheduler_power)
    made = {"linear": schedules.get_linear_schedule_with_warmup, "cosine": schedules.get_cosine_schedule_with_warmup}
    return made[name](optimizer, warmup, total_steps)
