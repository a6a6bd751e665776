"""A language model's training run started from the app (``model.task_type: text-generation``): the UI session of
``ui.session`` (thread, status, Stop, one run at a time across both tasks) running ``llm.trainer.train_llm``. The
adapter stays in the run folder (``Status.published`` names it); nothing is copied elsewhere."""

from __future__ import annotations

import logging
import traceback

from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.session import TrainingSession, friendly_error

log = logging.getLogger(__name__)


class LlmTrainingSession(TrainingSession):
    def _run(self) -> None:
        from lora_trainer.llm.trainer import train_llm

        try:
            with self.host.lock():
                self.status.message = "checking the data and the model…"
                result = train_llm(self.cfg, callbacks=self, progress=False)
            self.status.result, self.status.published = result, result.adapter_dir
            self.status.state = "stopped" if result.status == "stopped" else "done"
            self.status.message = (f"{'Stopped' if result.status == 'stopped' else 'Finished'} after "
                                   f"{result.steps}/{result.total_steps} steps: adapter {result.adapter_dir.name}")
        except BaseException as e:  # the UI must learn of every failure; the host stays usable
            if not isinstance(e, LoraTrainerError):
                log.error("training failed:\n%s", traceback.format_exc())
            self.status.state, self.status.message = "error", friendly_error(e)
