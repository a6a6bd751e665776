"""Data-parallel training over several processes (``torchrun`` or ``accelerate launch``): the process group and the
few collectives the loop needs.

A run started by ``torchrun --nproc_per_node N -m lora_trainer train --config …`` finds WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment; ``Group.from_environment`` joins the process group (nccl
on CUDA, each process on GPU LOCAL_RANK; gloo on the CPU) with a timeout on every collective (training.ddp_timeout
minutes). How the work is shared:

- ``training.batch_size`` is per process, as in kohya and accelerate: a micro-batch of the run's image order
  (engine.batches) holds batch_size × N images and process r takes its rows r, r+N, …; an optimizer step takes
  batch_size × N × gradient_accumulation_steps images (the effective batch, in the log, summary.json and the LoRA's
  ``ss_total_batch_size``). A bucket's last, smaller micro-batch may leave a process without a row: it then
  computes row 0 with weight 0, so every process takes part in every step.
- Each process weights its loss by its share of the micro-batch; after the step's micro-batches the LoRA gradients
  (and the step's loss) are summed over the processes in one all-reduce, so the update is the one a single process
  computes on the whole micro-batch. The random draws of a micro-batch (flips, noise, timesteps) are made for the
  whole micro-batch on every process, from generators seeded alike, and each process takes its rows: with cached
  latents the run equals the single-process run of batch_size × N, and every process's generator stays the same
  (decoding images each step, each process samples its own images' latents: the generators then part). The global
  RNG (LoRA dropout's masks) is seeded per rank, so the processes' dropout masks differ.
- The LoRA layers start alike (the same seed; rank 0's weights are broadcast besides). The latent cache is encoded
  once, each process taking every N-th image, and shared (and written to the disk cache by rank 0).
- Rank 0 alone writes: the run folder, its log, TensorBoard, samples, validation, checkpoints, the LoRA files and
  summary.json; the other processes log warnings only.
- A stop (Ctrl-C, which torchrun passes on as SIGINT or SIGTERM, or a UI's stop) is agreed at the end of each
  step, so every process stops after the same step and rank 0 saves it. A process that dies or stops answering
  makes the others' next collective fail (gloo at once, nccl at the timeout): they end with ``ProcessLost`` and
  rank 0 keeps the last complete step as a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from lora_trainer.errors import ConfigError, LoraTrainerError

log = logging.getLogger(__name__)
ENVIRONMENT = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # besides WORLD_SIZE, set by torchrun


class ProcessLost(LoraTrainerError):
    """Another process of a multi-process run stopped or did not answer in time."""


def world_size_of(environ=None) -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    environ = os.environ if environ is None else environ
    text = environ.get("WORLD_SIZE", "") or "1"
    try:
        return max(1, int(text))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE: {text!r} is not a number of processes") from None


def shard_rows(n: int, rank: int, world_size: int) -> tuple[list[int], float]:
    """The rows of a micro-batch of ``n`` images that process ``rank`` of ``world_size`` takes, and its loss's weight
    (its share of the micro-batch); a process left without a row takes row 0 with weight 0."""
    rows = list(range(rank, n, world_size))
    return (rows, len(rows) / n) if rows else ([0], 0.0)


@dataclass
class Group:
    """This process's place in a multi-process run, and the collectives the trainer uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where the collectives' tensors live (the process's GPU with nccl, the CPU with gloo)
    timeout_s: float

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, timeout_minutes: float, environ=None) -> Group | None:
        """Join the process group a launcher (torchrun, accelerate launch) set up; None when WORLD_SIZE is 1 or unset
        (a single process)."""
        import torch.distributed as dist

        environ = os.environ if environ is None else environ
        world = world_size_of(environ)
        if world == 1:
            return None
        missing = [k for k in ENVIRONMENT if not environ.get(k)]
        if missing:
            raise ConfigError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: start multi-process "
                              "training with torchrun (torchrun --nproc_per_node N -m lora_trainer train --config …) "
                              "or accelerate launch, which set them")
        rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ConfigError(f"LOCAL_RANK {local_rank}: this machine has {count} GPU(s); start at most {count} "
                                  "processes on it (torchrun --nproc_per_node)")
            torch.cuda.set_device(local_rank)
            backend, device = "nccl", torch.device("cuda", local_rank)
        else:
            backend, device = "gloo", torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), rank=rank, world_size=world)
        group = cls(rank, world, local_rank, device, timeout_minutes * 60)
        if rank == 0:
            log.info("multi-process training: %d processes (%s), rank 0 on %s writes the run", world, backend, device)
        return group

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):  # (a group whose peer is gone cannot be torn down cleanly)
                dist.destroy_process_group()

    # --- the collectives, each failing as ProcessLost
    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as e:  # (torch.distributed.DistBackendError and gloo's errors are RuntimeErrors)
            raise ProcessLost(f"rank {self.rank}: another process of the run stopped or did not answer within "
                              f"{self.timeout_s / 60:g} minutes (training.ddp_timeout) while {what}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}"
                              ) from e

    def flags(self, flag: bool, what: str) -> list[bool]:
        """Each process's ``flag``, by rank."""
        import torch.distributed as dist

        t = torch.zeros(self.world_size, device=self.device)
        t[self.rank] = float(flag)
        with self._collective(what):
            dist.all_reduce(t)
        return [bool(v) for v in t.tolist()]

    def any(self, flag: bool, what: str) -> bool:
        return any(self.flags(flag, what))

    def sum_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Sum the gradients of ``params`` over the processes (in place), in one all-reduce with ``loss``; returns
        the summed loss. A parameter without a gradient counts as zeros (and gets them)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads] +
                         [torch.tensor([loss], device=grads[0].device if grads else self.device)])
        with self._collective("summing the gradients"):
            dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        return float(flat[-1])

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values of ``params`` into every process's."""
        import torch.distributed as dist

        if not params:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.device)
            with self._collective("sharing the LoRA's first weights"):
                dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def gather(self, obj, what: str) -> list:
        """Every process's ``obj`` (picklable), by rank."""
        import torch.distributed as dist

        out = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, fn: Callable[[], object], what: str):
        """``fn()`` run by rank 0 alone and its value given to every process; an error it raises is raised by every
        process (so all stop with the same message)."""
        import torch.distributed as dist

        box: list = [None]
        if self.main:
            try:
                box[0] = (True, fn())
            except Exception as e:  # noqa: BLE001 (handed to every process, then raised)
                box[0] = (False, e)
        with self._collective(what):
            dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value
