"""What the training loop tells the outside world, and how the outside world asks it to stop."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StepInfo:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based epoch the step belongs to
    loss: float  # this step's loss (mean over its micro-batches)
    loss_avg: float  # moving average, what a progress display shows
    lr: float
    elapsed_s: float
    steps_per_s: float  # since this run (or resume) started

    @property
    def eta_s(self) -> float:
        return (self.total_steps - self.step) / self.steps_per_s if self.steps_per_s > 0 else float("nan")


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    run_dir: Path
    lora_path: Path | None  # kohya-format file for the WebUI
    diffusers_path: Path | None
    steps: int
    total_steps: int
    final_loss: float | None
    first_loss: float | None
    images_used: int
    images_skipped: int
    wall_time_s: float
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of each image left out
    extra: dict = field(default_factory=dict)


class Callbacks:
    """Subclass and override what you need; every hook is optional."""

    def on_start(self, total_steps: int, run_dir: Path) -> None: ...

    def on_resume(self, step: int) -> None:
        """The run continues a checkpoint at ``step`` (after on_start; the next on_step is step + 1)."""

    def on_step(self, info: StepInfo) -> None: ...

    def on_checkpoint(self, path: Path) -> None: ...

    def on_validation(self, step: int, loss: float) -> None:
        """The validation loss at ``step`` (engine.validation)."""

    def on_samples(self, step: int, paths: list[Path]) -> None:
        """The sample images made at ``step`` (output.sample_prompts; engine.samples), one file per prompt."""

    def on_end(self, result: TrainResult) -> None: ...

    def should_stop(self) -> bool:
        return False


class StopFlag(Callbacks):
    """A thread-safe Stop button: ``request()`` from anywhere, the loop stops after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    def should_stop(self) -> bool:
        return self._event.is_set()


class CallbackList(Callbacks):
    def __init__(self, callbacks) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_start(self, total_steps, run_dir):
        for c in self.callbacks:
            c.on_start(total_steps, run_dir)

    def on_resume(self, step):
        for c in self.callbacks:
            if hasattr(c, "on_resume"):
                c.on_resume(step)

    def on_step(self, info):
        for c in self.callbacks:
            c.on_step(info)

    def on_checkpoint(self, path):
        for c in self.callbacks:
            c.on_checkpoint(path)

    def on_validation(self, step, loss):
        for c in self.callbacks:
            if hasattr(c, "on_validation"):
                c.on_validation(step, loss)

    def on_samples(self, step, paths):
        for c in self.callbacks:
            if hasattr(c, "on_samples"):
                c.on_samples(step, paths)

    def on_end(self, result):
        for c in self.callbacks:
            c.on_end(result)

    def should_stop(self):
        return any(c.should_stop() for c in self.callbacks)
