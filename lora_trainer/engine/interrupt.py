"""Stopping a run with Ctrl-C (save, then stop), and its TensorBoard writer: shared by the image and the
language-model trainers."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class CtrlC:
    """First Ctrl-C: stop after this step and save. Second: abort at once. ``sigterm``: SIGTERM too, once (a process
    of a multi-process run: torchrun passes a Ctrl-C on to its processes, as SIGINT or, by torch version, SIGTERM,
    and kills them 30 s later; a SIGTERM after a SIGINT is the launcher's, not a second Ctrl-C)."""

    def __init__(self, sigterm: bool = False) -> None:
        self.requested = False
        self.setting_up = False  # (before the first step nothing is trained: a Ctrl-C then stops at once)
        self._old: dict = {}
        self._signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self._signals}
        return self

    def _handle(self, signum, frame):
        if self.setting_up:
            log.warning("%s before the first step: stopping now (nothing was trained yet)",
                        "Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
            raise KeyboardInterrupt
        if self.requested:
            if signum == signal.SIGTERM:  # (the launcher's second word is SIGKILL)
                return
            raise KeyboardInterrupt
        self.requested = True
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM (the launcher stops the run)"
        log.warning("%s: stopping after this step and saving a checkpoint%s", what,
                    " (Ctrl-C again to abort)" if signum == signal.SIGINT else "")

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def tensorboard_writer(log_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(log_dir))
