"""A run of the standalone app on several GPUs: ``torchrun`` starts one process per GPU, each running the command
line's ``train`` (engine.distributed: data parallel, rank 0 writes the run folder), and this session follows the run
through its event file (engine.event_log): progress, loss, validation loss, the sample images rank 0 writes, Stop
(a file beside the events: every process stops after the same step, rank 0 saves), the result, published as the
in-process session publishes its own."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_trainer.config import save_config, with_family_defaults
from lora_trainer.engine.event_log import EventReader, step_info, stop_path, train_result
from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.session import TrainingSession

log = logging.getLogger(__name__)
POLL_S = 0.5


def last_error(log: Path) -> str:
    """What a failed run said last: the command line's ``error: …`` line, else the last exception line."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    said = next((line[len("error: "):] for line in lines if line.startswith("error: ")), None)
    return said or next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception): ", line)),
                        lines[-1] if lines else "no output")


class LaunchedSession(TrainingSession):
    """``TrainingSession`` with the run in ``processes`` processes started by torchrun (GPUs; gloo on the CPU)."""

    def __init__(self, host, cfg, processes: int = 2, **kw):
        super().__init__(host, cfg, **kw)
        self.processes = processes

    def _train(self):
        work = Path(tempfile.mkdtemp(prefix="lora-trainer-launch-"))
        config, events, output = self._config(work / "config.yaml"), work / "events.jsonl", work / "torchrun.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.processes}",
               "-m", "lora_trainer", "train", "--config", str(config), "--events", str(events)]
        self.status.message = f"starting {self.processes} training processes (torchrun)…"
        with open(output, "wb") as out:  # (its own session: a signal to the app is not the run's)
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        end = self._follow(proc, EventReader(events), stop_path(events))
        if end is None:  # (the folder stays: the message names its log)
            raise LoraTrainerError(f"the {self.processes}-process run ended without a result (exit "
                                   f"{proc.returncode}): {last_error(output)} (the whole log: {output})")
        if proc.returncode:  # (the run ended and said so, then a process failed: its log stays for the reason)
            log.warning("the %d-process run saved its result, then exited with %s: its log is kept at %s",
                        self.processes, proc.returncode, output)
        else:
            shutil.rmtree(work, ignore_errors=True)  # (the run folder keeps the run's own config and logs)
        result = train_result(end)
        self.status.skipped = result.skipped
        return result, self.host.publish(result.lora_path, self.cfg.output.output_name)

    def _config(self, path: Path) -> Path:
        """The run's config as the processes read it: the family's defaults applied here (every key is explicit in
        the file), and the tab's sample prompt as the run's own samples (rank 0 writes them into the run folder)."""
        cfg, _ = with_family_defaults(self.cfg, self.host.model_family(self.cfg.model.base_model))
        if self.sample_prompt and self.sample_every:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(
                cfg.output, sample_prompts=[f"{self.sample_prompt} --d {self.sample_seed}"],
                sample_every_n_steps=self.sample_every))
        return save_config(cfg, path)

    def _follow(self, proc: subprocess.Popen, reader: EventReader, stop: Path) -> dict | None:
        """The run's events into the status until the processes end; Stop asked here becomes the stop file. Returns
        the "end" event (None if the run ended without one)."""
        end = None
        atexit.register(stop.touch)  # the app quits (Ctrl-C in its terminal): the run stops after its step and saves
        try:
            while True:
                finished = proc.poll() is not None
                for event in reader.read():
                    end = self._apply(event) or end
                if finished:
                    return end
                if self._stop.should_stop() and not stop.exists():
                    stop.touch()
                time.sleep(POLL_S)
        finally:
            atexit.unregister(stop.touch)
            if proc.poll() is None:  # (this thread failed: the processes must not outlive their session)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()

    def _apply(self, event: dict) -> dict | None:
        kind = event["event"]
        if kind == "start":
            self.on_start(event["total_steps"], Path(event["run_dir"]))
        elif kind == "step":
            self.on_step(step_info(event))
        elif kind == "validation":
            self.on_validation(event["step"], event["loss"])
        elif kind == "samples":  # (the tab shows the first prompt's image, as of its own samples)
            self._show_sample(event["step"], Path(event["paths"][0]))
        return event if kind == "end" else None

    def _sample(self, step: int) -> None:
        """(Rank 0 makes the samples into the run folder and says so in a "samples" event: ``_show_sample``.)"""

    def _show_sample(self, step: int, path: Path) -> None:
        from PIL import Image

        try:
            with Image.open(path) as image:
                self.status.samples.append((step, image.copy()))
        except OSError as e:  # a sample the tab cannot show must not end the run
            log.warning("sample at step %d: %s", step, e)
