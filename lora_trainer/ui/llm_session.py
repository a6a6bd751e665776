"""A language model's training run started from the app (``model.task_type: text-generation``): the UI session of
``ui.session`` (thread, status, Stop, one run at a time across both tasks) running ``llm.trainer.train_llm``. The
adapter stays in the run folder (``Status.published`` names it); nothing is copied elsewhere."""

from __future__ import annotations

from lora_trainer.ui.session import TrainingSession


class LlmTrainingSession(TrainingSession):
    def _train(self):
        from lora_trainer.llm.trainer import train_llm

        self.status.message = "checking the data and the model…"
        result = train_llm(self.cfg, callbacks=self, progress=False)
        return result, result.adapter_dir

    @staticmethod
    def _made_name(made) -> str:
        return f"adapter {made.name}"
