"""Our trainer and the reference loop in one process, taking turns every few steps.

On a small shared machine the speed drifts by tens of percent from one minute to the next, so loops
timed one after another in their own processes compare different machines. Here ``train()`` runs as
usual and, from its step callback, hands the main thread to the reference loop (a generator of steps)
for a block of steps, then takes it back for a block of its own: ``rounds`` times each, so each ratio
compares blocks measured seconds apart in the same process. (The reference does not run in a thread
of its own: PyTorch's CPU kernels run about 2× slower there once two threads hold OpenMP teams on a
2-core machine, measured with a bare UNet step: 47 ms on the main thread, 106 ms on a second one.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from lora_trainer.engine.events import Callbacks


class TakeTurns(Callbacks):
    def __init__(self, reference: Iterator[None] | None, warmup: int, block: int, rounds: int,
                 sync: Callable[[], None] = lambda: None):
        self.reference, self.warmup, self.block, self.rounds, self.sync = reference, warmup, block, rounds, sync
        self.times: dict[str, list[float]] = {"ours": [], "reference": []}
        self._count, self._started = 0, 0.0

    def _reference_block(self) -> None:
        if self.reference is not None:
            started = time.perf_counter()
            for _ in range(self.block):
                next(self.reference)
            self.times["reference"].append(time.perf_counter() - started)
        self._started = time.perf_counter()  # our block starts when the reference hands back

    def on_step(self, info) -> None:
        self._count += 1
        if self._count == self.warmup:
            self.sync()
            if self.reference is not None:
                for _ in range(self.warmup):
                    next(self.reference)
            self._reference_block()
        elif self._count > self.warmup and (self._count - self.warmup) % self.block == 0:
            self.sync()
            self.times["ours"].append(time.perf_counter() - self._started)
            if len(self.times["ours"]) < self.rounds:
                self._reference_block()
