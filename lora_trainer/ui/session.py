"""One training run started from a UI: a background thread, live status, Stop, samples, the result.

No gradio here and no WebUI: a ``Host`` (the WebUI's, or the standalone app's) provides the model, the
GPU lock, sample generation and where the finished LoRA goes. The UI polls ``status()``.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.engine.events import Callbacks, StepInfo, StopFlag, TrainResult
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.estimate import preflight_where
from lora_trainer.ui.host import Host
from lora_trainer.ui.views import CONTINUE_LABEL, status_line

log = logging.getLogger(__name__)
# what frees memory a UI holds outside training (the app's adapter loaded to try it, ui.llm_try), called before each
# run starts: the run, not a model kept for a button, gets the GPU
FREE_BEFORE_RUN: list = []


def friendly_error(e: BaseException) -> str:
    """A message for the tab, with what to do about it."""
    text = str(e)
    if isinstance(e, LoraTrainerError):
        return text
    if "out of memory" in text.lower():
        return ("Out of GPU memory: lower the batch size (and raise gradient accumulation to keep the effective "
                "batch), turn on gradient checkpointing, or lower the resolution.")
    return f"{type(e).__name__}: {text} (the console has the details)"


@dataclass
class Status:
    state: str = "idle"  # idle | loading | training | done | stopped | error
    message: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    steps_per_s: float = 0.0
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss): the plot's 2nd series
    samples: list[tuple[int, object]] = field(default_factory=list)  # (step, PIL image)
    result: TrainResult | None = None
    published: Path | None = None
    run_dir: Path | None = None
    samples_planned: int = 0  # how many sample images this run makes
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of each image the run left out

    @property
    def running(self) -> bool:
        return self.state in ("loading", "training")


class TrainingSession(Callbacks):
    """Runs ``engine.trainer.train`` for a UI. Only one session runs at a time (see ``start``)."""

    _active: TrainingSession | None = None
    _active_lock = threading.Lock()

    def __init__(self, host: Host, cfg, sample_prompt: str = "", sample_every: int = 0, sample_seed: int = 1):
        self.host, self.cfg = host, cfg
        self.sample_prompt, self.sample_every, self.sample_seed = sample_prompt.strip(), sample_every, sample_seed
        self.status = Status(state="loading", message="waiting for the GPU…")
        self._stop = StopFlag()
        self._backend = None
        self._thread = threading.Thread(target=self._run, name="lora-trainer", daemon=True)

    # --- control
    @classmethod
    def start(cls, host: Host, cfg, **kw) -> TrainingSession:
        """A new run of ``cls`` (this class, or a subclass for another task: ui.llm_session) on its thread; one run
        at a time, whatever its task (the slot is this class's, shared by the subclasses)."""
        with TrainingSession._active_lock:
            active = TrainingSession._active
            if active is not None and active.status.running:
                raise LoraTrainerError("a training is already running; stop it first or wait for it to end")
            session = cls(host, cfg, **kw)
            TrainingSession._active = session
        for free in FREE_BEFORE_RUN:
            free()
        session._thread.start()
        return session

    @classmethod
    def active(cls) -> TrainingSession | None:
        return TrainingSession._active

    @staticmethod
    def stop_active() -> None:
        """Stop: the run that goes on, if any (either task's; also after a page reload)."""
        session = TrainingSession._active
        if session is not None:
            session.stop()

    def stop(self) -> None:
        self._stop.request()
        if self.status.running:
            self.status.message = "stopping after this step; saving what was trained so far…"

    def wait(self, timeout: float | None = None) -> Status:
        self._thread.join(timeout)
        return self.status

    # --- the run (background thread)
    def _make_backend(self):  # (train calls it once the input checks have passed)
        self.status.message = "preparing the model…"
        self._backend = self.host.make_backend(self.cfg)
        return self._backend

    def _run(self) -> None:
        try:
            with self.host.lock():
                result, made = self._train()
            self.status.result, self.status.published = result, made
            self.status.state = "stopped" if result.status == "stopped" else "done"
            self.status.message = (f"{'Stopped' if result.status == 'stopped' else 'Finished'} after "
                                   f"{result.steps}/{result.total_steps} steps: {self._made_name(made)}")
            if result.status == "stopped":
                self.status.message += (f". Its checkpoint is kept: to go on, tick '{CONTINUE_LABEL}' and press Train "
                                        "with the same name")
        except BaseException as e:  # the UI must learn of every failure; the host stays usable
            if not isinstance(e, LoraTrainerError):
                log.error("training failed:\n%s", traceback.format_exc())
            self.status.state, self.status.message = "error", friendly_error(e)

    def _train(self):
        """The run, under the host's lock: (its TrainResult, the file it made, published where generation finds it)."""
        from lora_trainer.engine.trainer import train

        self.status.message = "checking the dataset and the settings…"
        family = self.host.model_family(self.cfg.model.base_model if self.host.chooses_base_model else None)
        try:  # (the family: the dataset check looks for images below the resolution the run will use)
            result = train(self.cfg, make_backend=self._make_backend, callbacks=self, progress=False,
                           family=family, where=preflight_where(self.host, self.cfg))
        finally:
            backend, self._backend = self._backend, None
            self.host.release_backend(backend)
        self.status.skipped = result.skipped
        return result, self.host.publish(result.lora_path, self.cfg.output.output_name)

    @staticmethod
    def _made_name(made) -> str:
        return made.name

    # --- engine callbacks
    def on_start(self, total_steps: int, run_dir: Path) -> None:
        self.status.state, self.status.total_steps, self.status.run_dir = "training", total_steps, run_dir
        self.status.message = "training"
        if self.sample_every and self.sample_prompt:
            self.status.samples_planned = total_steps // self.sample_every

    def on_resume(self, step: int) -> None:
        self.status.step = step
        self.status.message = f"continuing from the checkpoint of step {step}"

    def on_step(self, info: StepInfo) -> None:
        s = self.status
        s.step, s.loss, s.steps_per_s = info.step, info.loss_avg, info.steps_per_s
        s.eta_s = info.eta_s if info.steps_per_s > 0 else None
        for series in (s.losses, s.validation):  # a NaN rollback (engine.guard) trains these steps again: the new
            while series and series[-1][0] >= info.step:  # losses replace the old ones, so the plot's steps rise
                series.pop()
        s.losses.append((info.step, info.loss))
        if self.sample_every and self.sample_prompt and info.step % self.sample_every == 0:
            self._sample(info.step)

    def on_validation(self, step: int, loss: float) -> None:
        self.status.validation.append((step, loss))

    def should_stop(self) -> bool:
        return self._stop.should_stop()

    def _sample(self, step: int) -> None:
        modules = [m for m in self._backend.components().values() if m is not None]
        modes = [m.training for m in modules]
        s = self.status
        previous = s.message
        # a sample takes minutes on a slow GPU: say so, or "ETA 00:00:00" at the last step looks like a hang
        s.message = f"making sample {step // self.sample_every}/{s.samples_planned or '?'}"
        try:
            for m in modules:
                m.eval()
            image = self.host.sample(self._backend, self.sample_prompt, self.sample_seed)
            if image is not None:
                s.samples.append((step, image))
        except Exception as e:  # a failed sample must not end the training
            log.warning("sample at step %d failed: %s", step, e)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
            if s.message.startswith("making sample"):  # (Stop may have changed it meanwhile)
                s.message = previous


format_status = status_line  # one line of text for a Status (views.status_line)
