"""The NaN guard: a non-finite loss or gradient rolls the run back instead of ending it.

Every ``training.nan_guard_every`` optimizer steps (and wherever a checkpoint is saved) the guard keeps the
LoRA weights, the optimizer's state (AdamW's moments), the learning-rate schedule and the RNG states in memory,
on the device: about three times the LoRA's size, nothing is written. A non-finite loss (``Run.backward``) or,
outside fp16, non-finite gradients (checked before the optimizer applies them; in fp16 the GradScaler already
skips such a step) raise ``NonFinite`` with the diagnosis of ``engine.diagnose``; the guard then restores the
kept state, marks the micro-batch that went non-finite (the whole step's, for gradients) to be skipped, lowers
every learning rate by ``training.nan_lr_factor`` and lets the loop run on from the kept step, the same batches
in the same order except the skipped ones. After ``training.nan_max_retries`` rollbacks the next one stops the
run with the diagnosis, as without the guard.

Switching fp16 to bf16 instead is not done: the frozen base model is held in fp16 (in the WebUI it is the WebUI's
own model, which training must leave as it was), so only the autocast would change while the weights and the
GradScaler stay fp16's; the diagnosis still says when bf16 would help.

Taking a snapshot only reads state (clones, RNG states), so a run without a non-finite value trains exactly as it
would without the guard; the gradient check costs one host sync per optimizer step.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.engine import checkpoint as ckpt
from lora_trainer.engine.diagnose import diagnose_nonfinite_gradients
from lora_trainer.engine.optim import set_base_lrs
from lora_trainer.errors import LoraTrainerError
from lora_trainer.utils.text import name_list

log = logging.getLogger(__name__)


class NonFinite(LoraTrainerError):
    """A non-finite loss (``kind`` "loss") or non-finite gradients ("gradients"); the message is the diagnosis.
    The loop hands it to ``NanGuard.recover``, which rolls back or raises it as a TrainingError."""

    def __init__(self, message: str, kind: str = "loss"):
        super().__init__(message)
        self.kind = kind


def _clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@dataclass
class Snapshot:
    """The last good state: what an optimizer step changes, and the RNG that the next steps draw from."""

    step: int
    weights: list  # the LoRA parameters, in Run.params() order
    optimizer: list  # each parameter's optimizer state (None: none yet)
    scheduler: dict
    rng: dict
    losses: list
    first_loss: float | None
    groups: list = field(default_factory=list)  # each parameter group's own state (Prodigy's step size d), no params


@dataclass
class NanGuard:
    every: int = 10  # training.nan_guard_every (0: off)
    max_retries: int = 3  # training.nan_max_retries (0: off)
    lr_factor: float = 0.5  # training.nan_lr_factor
    rollbacks: list = field(default_factory=list)  # one dict per rollback, for summary.json
    skipped: set = field(default_factory=set)  # (epoch, micro-batch index) never trained again
    snapshot_: Snapshot | None = None
    in_step: list = field(default_factory=list)  # (epoch, index, image indices) trained in this step so far

    @classmethod
    def from_config(cls, training) -> NanGuard:
        return cls(training.nan_guard_every, training.nan_max_retries, training.nan_lr_factor)

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.max_retries > 0

    # --- what the loop calls
    def skips(self, epoch: int, index: int) -> bool:
        """Whether this micro-batch went non-finite before (then it is not trained)."""
        return (epoch, index) in self.skipped

    def training(self, epoch: int, index: int, batch: dict) -> None:
        """The loop is about to train this micro-batch (named in a rollback)."""
        if self.enabled:
            self.in_step.append((epoch, index, [int(i) for i in batch["indices"]]))

    def after_step(self, run) -> None:
        """An optimizer step is done (and saved, if due): keep the state every ``every`` steps and at each
        checkpoint, so a rollback never goes back past a checkpoint on disk."""
        self.in_step.clear()
        if self.enabled and (run.step % self.every == 0 or run.last_saved == run.step):
            self.take(run)

    def take(self, run) -> None:
        """Keep ``run``'s state now (reads only: the RNG is not drawn from)."""
        if not self.enabled:
            return
        params = run.params()
        state = run.optimizer.state
        self.snapshot_ = Snapshot(
            run.step, [p.detach().clone() for p in params],
            [{k: _clone(v) for k, v in state[p].items()} if state.get(p) else None for p in params],
            {k: _clone(v) for k, v in run.lr_scheduler.state_dict().items()}, ckpt.rng_state(run.generator),
            list(run.losses), run.first_loss,
            [{k: _clone(v) for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups])

    def check_gradients(self, run) -> None:
        """Before the optimizer applies them: non-finite gradients raise NonFinite (fp16: the GradScaler's)."""
        if not self.enabled or run.scaler.is_enabled():
            return
        params = run.params()
        norm = run.grad_norm if run.cfg.training.max_grad_norm > 0 else torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]))
        if not bool(torch.isfinite(norm)):
            raise NonFinite(diagnose_nonfinite_gradients(run.step + 1, run.precision, _named_grads(run),
                                                         self._files(run, [i for *_, i in self.in_step])),
                            "gradients")

    # --- the rollback
    def recover(self, run, error: NonFinite) -> None:
        """Roll ``run`` back to the kept state, skip what went non-finite and lower the learning rate; or, when
        the guard is off or has rolled back ``max_retries`` times, raise the diagnosis as a TrainingError."""
        from lora_trainer.engine.run import TrainingError

        bad = self.in_step[-1:] if error.kind == "loss" else list(self.in_step)
        self.in_step.clear()
        snap = self.snapshot_
        if not self.enabled or snap is None or len(self.rollbacks) >= self.max_retries:
            if self.rollbacks:
                raise TrainingError(f"{error} (the NaN guard had rolled back {len(self.rollbacks)} times, to "
                                    f"step {self.rollbacks[-1]['rolled_back_to']} last, lowering the learning rate "
                                    f"to {self.rollbacks[-1]['learning_rates'][0]:.3g})") from error
            raise TrainingError(str(error)) from error
        failed_at = run.step + 1
        self.skipped.update((e, i) for e, i, _ in bad)
        files = self._files(run, [idx for *_, idx in bad])
        lrs = self._restore(run, snap)
        self.rollbacks.append({"at_step": failed_at, "rolled_back_to": snap.step, "cause": error.kind,
                               "skipped": [str(f) for f in files], "learning_rates": lrs, "diagnosis": str(error)})
        log.warning("NaN guard: %s. Rolled back to step %d, skipping %s from now on; learning rate lowered to %s "
                    "(rollback %d of %d)", error, snap.step, name_list((f.name for f in files), limit=8),
                    ", ".join(f"{lr:.3g}" for lr in lrs), len(self.rollbacks), self.max_retries)

    def _restore(self, run, snap: Snapshot) -> list[float]:
        """The kept state back into ``run``, every learning rate times ``lr_factor``; returns the new ones."""
        run.optimizer.zero_grad(set_to_none=True)
        for group, kept in zip(run.optimizer.param_groups, snap.groups):  # (then the learning rates, lowered)
            group.update({k: _clone(v) for k, v in kept.items()})
        lowered = [lr * self.lr_factor for lr in run.lr_scheduler.base_lrs]
        with torch.no_grad():
            for p, w, st in zip(run.params(), snap.weights, snap.optimizer):
                p.copy_(w)
                run.optimizer.state.pop(p, None)
                if st is not None:
                    run.optimizer.state[p] = {k: _clone(v) for k, v in st.items()}
        run.lr_scheduler.load_state_dict({k: _clone(v) for k, v in snap.scheduler.items()})
        set_base_lrs(run.lr_scheduler, lowered)
        ckpt.set_rng_state(snap.rng, run.generator)
        run.step, run.first_loss = snap.step, snap.first_loss
        run.losses.clear()
        run.losses.extend(snap.losses)
        run.grad_norm = None
        if run.bar is not None:
            run.bar.n = snap.step
            run.bar.refresh()
        return [g["lr"] for g in run.optimizer.param_groups]

    @staticmethod
    def _files(run, index_lists) -> list:
        return list(dict.fromkeys(run.scan.samples[i].path for indices in index_lists for i in indices))


def _named_grads(run) -> dict:
    return {f"{component}.{name}": p.grad for component, module in run.modules.items()
            for name, p in module.named_parameters() if p.requires_grad}


def skip_step(run) -> None:
    """An optimizer step whose micro-batches the guard all skips: no update, and no loss to report; the
    learning-rate schedule and the step count go on, so the run still ends where its plan says."""
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    run.step += 1
    if run.bar is not None:
        run.bar.update(1)
    log.info("step %d: no update (its images are skipped by the NaN guard)", run.step)


# --- the disk
_MB = 1 << 20
# per parameter: AdamW's two moments (fp32 / 8-bit); Prodigy's two, its start point and its s sum; Adafactor's
# factored second moment (a row and a column per matrix: next to nothing) and, with beta1, a first moment
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 0}


def optimizer_state_bytes(t) -> int:
    """Bytes of optimizer state per trained parameter for ``training.optimizer`` (and its arguments)."""
    momentum = 4 if t.optimizer == "adafactor" and t.optimizer_args.get("beta1") else 0
    return OPTIMIZER_STATE_BYTES.get(t.optimizer, 8) + momentum
SAVE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def disk_estimate(cfg, plan, lora_params: int, cache_folder: Path | None = None) -> dict[str, int]:
    """Bytes the run will write, by part: the checkpoints kept at once (LoRA in fp32 + optimizer state each; one
    more while the newest is written, before the oldest goes), the latent disk cache (less what its folder holds
    already), the LoRA files, and a margin for config, summary and logs."""
    t, d, o = cfg.training, cfg.data, cfg.output
    checkpoint = lora_params * (4 + optimizer_state_bytes(t)) + _MB  # (+ RNG states, schedule)
    saves = 1  # a stop's or an error's
    saves += plan.total_steps // t.save_steps if t.save_steps else 0
    saves += plan.epochs // t.save_every_n_epochs if t.save_every_n_epochs else 0
    kept = min(saves, t.checkpoints_total_limit + 1) if t.checkpoints_total_limit else saves
    cache = 0
    if t.cache_latents and t.cache_latents_to_disk:  # mean and std in fp32 per image (and mirrored image)
        side = d.resolution // 8
        cache = plan.num_images * (2 if d.random_flip else 1) * (2 * 4 * 4 * side * side + 4096)
        if cache_folder is not None and cache_folder.is_dir():
            cache = max(0, cache - sum(f.stat().st_size for f in cache_folder.rglob("*") if f.is_file()))
    lora_file = lora_params * SAVE_BYTES[o.save_precision] + _MB // 4
    epoch_files = (plan.epochs - 1) // t.save_every_n_epochs if t.save_every_n_epochs else 0  # (<name>-000001...)
    return {"checkpoints": kept * checkpoint, "latent cache": cache,
            "LoRA files": lora_file * ((2 if o.save_diffusers_format else 1) + epoch_files),
            "logs and the rest": 16 * _MB}


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # (not reached)


def check_free_space(folder: Path, estimate: dict[str, int]) -> None:
    """Refuse to start when ``folder``'s disk has less free space than the run will write (``disk_estimate``)."""
    need = sum(estimate.values())
    free = shutil.disk_usage(folder).free
    parts = ", ".join(f"{name} {size_text(n)}" for name, n in estimate.items() if n)
    if free < need:
        raise ckpt.DiskFull(f"not enough free disk space for {folder}: the run will write about {size_text(need)} "
                            f"({parts}) and {size_text(free)} is free there; free some space, keep fewer checkpoints "
                            "(training.checkpoints_total_limit), or set output.output_dir on another disk")
    log.info("disk: the run will write about %s (%s); %s free in %s", size_text(need), parts, size_text(free), folder)
