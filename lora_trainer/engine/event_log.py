"""A run's progress as JSON lines in a file, and Stop as a file beside it: how a program that started the run in
other processes follows it (the standalone app's runs on several GPUs: torchrun's rank 0 writes, the app reads).

    python -m lora_trainer train --config run.yaml --events run.events.jsonl   # (rank 0 writes the events)
    touch run.events.jsonl.stop                                                # every process stops after this step

One line per event: ``{"event": "start", "total_steps", "run_dir"}``, ``{"event": "step", <StepInfo's fields>}``,
``{"event": "validation", "step", "loss"}``, ``{"event": "samples", "step", "paths"}`` (one image per
sample prompt), ``{"event": "checkpoint", "path"}``, ``{"event": "end", "result":
<TrainResult's fields>}``; each line is written whole and flushed, so a reader sees complete lines only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lora_trainer.engine.events import Callbacks, StepInfo, TrainResult


def stop_path(events: Path) -> Path:
    """The file whose existence asks the run to stop after the current step."""
    return events.with_name(events.name + ".stop")


class EventLog(Callbacks):
    """Writes the run's events to ``path`` (appended: a resumed run's events follow the first's) and asks the loop to
    stop once ``stop_path(path)`` exists (checked once a step; with several processes the stop is agreed, so all stop
    after the same step)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stop = stop_path(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # (open for the run; closed by on_end)

    def _write(self, event: str, **data) -> None:
        if not self._file.closed:
            self._file.write(json.dumps({"event": event, **data}, default=str) + "\n")
            self._file.flush()

    def on_start(self, total_steps: int, run_dir: Path) -> None:
        self._write("start", total_steps=total_steps, run_dir=str(run_dir))

    def on_step(self, info: StepInfo) -> None:
        self._write("step", **dataclasses.asdict(info))

    def on_validation(self, step: int, loss: float) -> None:
        self._write("validation", step=step, loss=loss)

    def on_samples(self, step: int, paths: list[Path]) -> None:
        self._write("samples", step=step, paths=[str(p) for p in paths])

    def on_checkpoint(self, path: Path) -> None:
        self._write("checkpoint", path=str(path))

    def on_end(self, result: TrainResult) -> None:
        self._write("end", result=dataclasses.asdict(result))
        self._file.close()

    def should_stop(self) -> bool:
        return self._stop.exists()


class EventReader:
    """The events written since the last ``read`` (complete lines only: a line still being written waits)."""

    def __init__(self, path: str | Path):
        self.path, self._offset = Path(path), 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def step_info(event: dict) -> StepInfo:
    return StepInfo(**{f.name: event[f.name] for f in dataclasses.fields(StepInfo)})


def train_result(event: dict) -> TrainResult:
    """The TrainResult of an "end" event (paths back to Paths)."""
    data = dict(event["result"])
    for key in ("run_dir", "lora_path", "diffusers_path"):
        data[key] = Path(data[key]) if data.get(key) else None
    return TrainResult(**data)
