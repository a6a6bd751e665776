"""The VAE and frozen text encoders parked on the CPU while the training steps need none of them.

With latents (and caption embeddings) cached, a step runs the UNet only: on a GPU the encoders' memory goes to
it (SDXL's two text encoders are 0.8 B parameters). Samples bring them back for the image (``on_device``), and
the end of training puts everything back where it was (``restore``). One helper for every backend: the
diffusers ones and the WebUI's model, whose modules are moved in place (the WebUI keeps its references).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class IdleEncoders:
    def __init__(self):
        self.modules: list[nn.Module] = []  # what is parked now

    def park(self, modules: list[nn.Module], device: torch.device) -> int:
        """Move ``modules`` to the CPU if they are on a GPU; returns the GPU bytes freed (0 on the CPU)."""
        if torch.device(device).type != "cuda":
            return 0
        self.modules = [m for m in modules if m is not None]
        freed = sum(t.numel() * t.element_size() for m in self.modules for t in [*m.parameters(), *m.buffers()])
        for module in self.modules:
            module.to("cpu")
        torch.cuda.empty_cache()
        log.info("%s wait on the CPU while training: %.0f MB of GPU memory for the UNet",
                 ", ".join(type(m).__name__ for m in self.modules), freed / 2**20)
        return freed

    @contextlib.contextmanager
    def on_device(self, device: torch.device):
        """The parked modules on ``device`` for the block (a sample image), then back on the CPU."""
        try:
            for module in self.modules:
                module.to(device)
            yield
        finally:
            for module in self.modules:
                module.to("cpu")

    def restore(self, device: torch.device) -> None:
        """Everything back on ``device``. Where the GPU has no room for them (after an out-of-memory error, whose
        traceback still holds the step's activations) they stay on the CPU, with a warning, and the error that
        matters reaches the user."""
        try:
            for module in self.modules:
                module.to(device)
        except torch.cuda.OutOfMemoryError:
            log.warning("no GPU memory to move the VAE and text encoders back: they stay on the CPU")
            return
        self.modules = []
