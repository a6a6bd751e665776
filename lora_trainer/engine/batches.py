"""Which images each micro-batch of a run holds, and the stream that reads them ahead of the GPU.

The order is a pure function of (seed, epoch), so a resume finds its place. With aspect-ratio buckets a batch
holds the images of one bucket: each bucket's images are shuffled and cut into batches (the last one of a bucket
may be smaller), and the batches of all buckets are shuffled together. The whole rest of a run
is one stream: images are decoded ahead across epoch boundaries, by threads (PIL decodes and
resizes without holding the GIL) or, with ``dataloader_num_workers``, by one set of DataLoader
worker processes for the whole run instead of a new set each epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from lora_trainer.data.dataset import ImageDataset, collate
from lora_trainer.data.images import decode_threads, prefetch
from lora_trainer.errors import DatasetError


@dataclass(frozen=True)
class Plan:
    """How many images, batches and optimizer steps the run has."""

    num_images: int
    batch_size: int
    grad_accum: int
    total_steps: int
    buckets: tuple[tuple[int, ...], ...] | None = None  # image indices by bucket (an index once for each of its
    # repeats: kohya's folders); None: one group of all, each once
    world_size: int = 1  # processes of a multi-process run (engine.distributed); batch_size is per process

    @property
    def global_batch(self) -> int:
        """The images of one micro-batch over every process: the unit of the run's image order."""
        return self.batch_size * self.world_size

    @property
    def effective_batch(self) -> int:
        """The images of one optimizer step: batch_size × gradient_accumulation_steps × processes."""
        return self.global_batch * self.grad_accum

    @property
    def images_per_epoch(self) -> int:
        """The images an epoch trains: each as many times as its repeats, regularization images too."""
        return self.num_images if self.buckets is None else sum(len(b) for b in self.buckets)

    @property
    def batches_per_epoch(self) -> int:
        if self.buckets is None:
            return math.ceil(self.num_images / self.global_batch)
        return sum(math.ceil(len(b) / self.global_batch) for b in self.buckets)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @classmethod
    def from_config(cls, cfg, num_images: int, buckets: list[list[int]] | None = None, world_size: int = 1) -> Plan:
        """``buckets``: the image indices of each bucket, an image once for each of its repeats
        (ImageDataset.epoch_groups()); None, or one group of every image once: no buckets. ``world_size``: the
        processes of a multi-process run (each takes batch_size images of a micro-batch)."""
        t = cfg.training
        whole = buckets is None or (len(buckets) == 1 and len(buckets[0]) == num_images)
        groups = None if whole else tuple(tuple(b) for b in buckets)
        plan = cls(num_images, t.batch_size, t.gradient_accumulation_steps, 0, groups, world_size)
        total = t.max_train_steps or t.epochs * plan.steps_per_epoch
        return dataclasses.replace(plan, total_steps=total)


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int,
                  buckets: tuple[tuple[int, ...], ...] | None = None) -> list[list[int]]:
    """The shuffled batches of one epoch: a pure function of (seed, epoch), so a resume finds its place. With
    ``buckets`` each batch holds one bucket's images; the batches of all buckets come in a shuffled order."""
    generator = torch.Generator().manual_seed(seed + 1_000_003 * epoch)
    if buckets is None:
        order = torch.randperm(num_images, generator=generator).tolist()
        return [order[i : i + batch_size] for i in range(0, num_images, batch_size)]
    batches = []
    for members in buckets:
        order = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def repeat_numbers(plan: Plan, seed: int, epoch: int) -> list[list[int]] | None:
    """For each micro-batch of ``epoch``, the repeat of each of its images: how many times the epoch trained that
    image before (kohya's folders train an image several times an epoch); None where every image comes once."""
    if plan.buckets is None:
        return None
    seen: Counter = Counter()
    numbers = []
    for batch in epoch_batches(plan.num_images, plan.global_batch, seed, epoch, plan.buckets):
        row = []
        for j in batch:  # (one image twice in a batch, a bucket of its own repeats: two numbers)
            row.append(seen[j])
            seen[j] += 1
        numbers.append(row)
    return numbers


def schedule(plan: Plan, seed: int, step: int) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, micro-batch index in its epoch, image indices) of every micro-batch of the optimizer steps
    from ``step`` (0-based) to the last; none from a step at or past the end."""
    epoch = step // plan.steps_per_epoch
    first = (step - epoch * plan.steps_per_epoch) * plan.grad_accum
    for e in range(epoch, plan.epochs):
        batches = epoch_batches(plan.num_images, plan.global_batch, seed, e, plan.buckets)
        for i in range(first if e == epoch else 0, len(batches)):
            if e * plan.steps_per_epoch + i // plan.grad_accum >= plan.total_steps:
                return
            yield e, i, batches[i]


def _decoded_in_threads(dataset: ImageDataset, batches: Iterator[list], batch: int) -> Iterator[dict]:
    sizes: list[int] = []

    def indices():
        for b in batches:
            sizes.append(len(b))
            yield from b

    images = prefetch(dataset.__getitem__, indices(), ahead=max(2 * decode_threads(), 2 * batch))
    with contextlib.closing(images):  # a stopped run lets the decoding threads go (queued ones never start)
        while True:
            first = next(images, None)
            if first is None:
                return
            yield collate([first, *islice(images, sizes.pop(0) - 1)])


def _sharded(positions, world_size: int, rank: int):
    """(epoch, index, image indices, what else the batch carries): a process's rows of each micro-batch where the
    run has several processes (``rows``: their places in the micro-batch, ``of``: its size, ``weight``: its share of
    it; engine.distributed.shard_rows), else the whole micro-batch."""
    from lora_trainer.engine.distributed import shard_rows

    for e, i, b in positions:
        if world_size == 1:
            yield e, i, b, {}
            continue
        rows, weight = shard_rows(len(b), rank, world_size)
        yield e, i, [b[r] for r in rows], {"rows": torch.tensor(rows), "of": len(b), "weight": weight}


def _with_repeats(positions, plan: Plan, seed: int):
    """``_sharded``'s positions with ``repeats``, the repeat of each of the batch's images (``repeat_numbers``),
    where the run has buckets (an image with kohya's repeats comes several times an epoch)."""
    numbers: tuple = (None, None)
    for e, i, b, extra in positions:
        if numbers[0] != e:
            numbers = (e, repeat_numbers(plan, seed, e))
        if numbers[1] is not None:
            places = extra["rows"].tolist() if "rows" in extra else range(len(b))
            extra = {**extra, "repeats": torch.tensor([numbers[1][i][k] for k in places])}
        yield e, i, b, extra


def batch_stream(plan: Plan, seed: int, step: int, dataset: ImageDataset | None, captions: list[str],
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) for the rest of the run. ``dataset`` None (latents cached): a batch is
    its image indices and captions, nothing is read; else ``pixel_values`` too, decoded ahead (pinned on
    CUDA by DataLoader workers; the threads leave them pageable). With several processes (``plan.world_size``) a
    batch is process ``rank``'s rows of the micro-batch, with ``rows``, ``of`` and ``weight`` (``_sharded``). With
    buckets a batch has ``repeats``: the times the epoch trained each of its images before (``repeat_numbers``)."""
    def positions():
        return _with_repeats(_sharded(schedule(plan, seed, step), plan.world_size, rank), plan, seed)

    if dataset is None:
        for e, i, b, extra in positions():
            yield e, i, {"indices": torch.tensor(b), "captions": [captions[j] for j in b], **extra}
        return
    # a random crop depends on the epoch and repeat: the items are (image, epoch, repeat) then (ImageDataset.crop)
    batches = (([(j, e, int(r)) for j, r in zip(b, extra.get("repeats", [0] * len(b)))] if dataset.random_crop else b)
               for e, _, b, extra in positions())
    if num_workers > 0:  # its own generator: making the loader draws nothing from the global RNG
        loaded = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                                  num_workers=num_workers, pin_memory=pin_memory,
                                                  generator=torch.Generator().manual_seed(seed)))
    else:
        loaded = _decoded_in_threads(dataset, batches, plan.batch_size)
    try:
        for (e, i, _, extra), batch in zip(positions(), loaded):
            yield e, i, {**batch, **extra}
    except DatasetError as err:  # from a worker process, torch wraps the message in the worker's traceback
        raise DatasetError(str(err).strip().splitlines()[-1].split("DatasetError: ", 1)[-1]) from None
    finally:
        if hasattr(loaded, "close"):
            loaded.close()
        del loaded  # a DataLoader's workers end with their iterator
