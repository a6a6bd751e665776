"""The VAE and frozen text encoders parked on the CPU while the training steps need none of them, and the UNet
while the encoders fill the caches.

With latents (and caption embeddings) cached, a step runs the UNet only: on a GPU the encoders' memory goes to
it (SDXL's two text encoders are 0.8 B parameters). Samples bring them back for the image (``on_device``), and
the end of training puts everything back where it was (``restore``). One helper for every backend: the
diffusers ones and the WebUI's model, whose modules are moved in place (the WebUI keeps its references).

The other way round, before the first step (``waiting_on_cpu``): a run that loads its own model keeps the UNet
off the GPU while the VAE encodes the latent cache (from its load: ``models.factory.load_backend``). On the H200
SDXL's process peaked there (8.4 GB allocated at 1024², batch 1: the 5.1 GB UNet beside both encoders, the VAE and a
1024² encode), over the 6 GB its steps need.
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
        freed = module_bytes(self.modules)
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


def module_bytes(modules, on: torch.device | None = None) -> int:
    """The bytes of the parameters and buffers of ``modules`` (a model already loaded; storages shared between them
    counted once), those on device ``on`` only where it is given."""
    seen = {}
    for m in modules:
        if m is not None:
            for x in [*m.parameters(), *m.buffers()]:
                if on is None or x.device.type == torch.device(on).type:
                    seen[id(x.untyped_storage())] = x.untyped_storage().nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def waiting_on_cpu(modules: list[nn.Module], device: torch.device, why: str):
    """``modules`` on the CPU for the block where ``device`` is a GPU (their memory for ``why``), then back on it;
    elsewhere nothing moves. Parameters stay the same objects (an optimizer holding them is unaffected). Where the
    block raised and there is no GPU memory to move them back (its traceback still holds what it allocated), they
    stay on the CPU with a warning, and the block's error is the one that reaches the user."""
    modules = [m for m in modules if m is not None]
    if torch.device(device).type != "cuda" or not modules:
        yield
        return
    freed = module_bytes(modules, on=device)  # (0 where they were loaded onto the CPU to wait: models.factory)
    for module in modules:
        module.to("cpu")
    torch.cuda.empty_cache()
    log.info("%s wait%s on the CPU %s: %.0f MB %s", ", ".join(type(m).__name__ for m in modules),
             "s" if len(modules) == 1 else "", why, module_bytes(modules) / 2**20,
             "of GPU memory freed" if freed else "kept off the GPU since they loaded")
    try:
        yield
    except BaseException:
        try:
            for module in modules:
                module.to(device)
        except torch.cuda.OutOfMemoryError:  # (none left half-way: all back on the CPU)
            for module in modules:
                module.to("cpu")
            log.warning("no GPU memory to move %s back after the error below: left on the CPU",
                        ", ".join(type(m).__name__ for m in modules))
        raise
    for module in modules:
        module.to(device)
