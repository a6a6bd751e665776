"""The validation loss: the diffusion loss of images the LoRA does not train on (``data.validation_split`` or
``data.validation_dir``), every ``training.validation_every_n_steps`` and at the end.

So the curve shows the model and not the dice, every evaluation uses the same inputs: each validation image at the
same ``VALIDATION_TIMESTEPS`` timesteps spread over the range training draws from (the schedule), with the same
noise tensors (drawn once from a generator seeded with the run's seed), its latent (the cached one when latents are
cached, else encoded with a generator seeded the same each time) and its caption's conditioning; the model in eval
mode (no LoRA dropout), no noise offset; the training's loss form (loss_type, min-SNR, debiased weighting). The
training's own random streams are not touched, so a run trains the same LoRA with validation on or off.
"""

from __future__ import annotations

import logging

import torch

from lora_trainer.data.buckets import BucketSpec
from lora_trainer.data.check import image_facts
from lora_trainer.data.dataset import ImageDataset, collate, scan_dataset
from lora_trainer.data.split import split_validation
from lora_trainer.engine.cache import EncodedCache, LatentStore
from lora_trainer.engine.loss import LossSettings, diffusion_loss, timestep_range
from lora_trainer.engine.run_dir import latent_cache_dir
from lora_trainer.engine.sampling import evaluating
from lora_trainer.errors import DatasetError

log = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = 4  # K: each image at timesteps T/8, 3T/8, 5T/8, 7T/8 (T = 1000: 125, 375, 625, 875; of a range
# [a, b): a + (b - a)/8, ...)


def validation_samples(cfg, scan):
    """(the training scan, the validation images): a part of ``scan`` held out (data.validation_split), or the
    images of data.validation_dir read with the same caption rules; (scan, []) without either."""
    d = cfg.data
    if d.validation_split:
        scan, held = split_validation(scan, d.validation_split, cfg.training.seed)
        log.info("validation: %d image(s) held out of %d (data.validation_split %s); training on %d", len(held),
                 len(held) + len(scan.samples), d.validation_split, len(scan.samples))
        return scan, held
    if d.validation_dir:
        try:
            val = scan_dataset(d.validation_dir, caption_extension=d.caption_extension,
                               caption_priority=d.caption_priority, caption_prefix=d.caption_prefix,
                               recursive=d.recursive, inspect=image_facts)
        except DatasetError as e:
            raise DatasetError(f"data.validation_dir: {e}") from None
        scan.facts.update(val.facts)
        log.info("validation: %d image(s) from %s", len(val.samples), val.root)
        return scan, val.samples
    return scan, []


class Validator:
    """The validation images of a run, their fixed inputs, and the losses measured so far."""

    def __init__(self, dataset: ImageDataset, cache: EncodedCache | None, seed: int, batch_size: int, every: int):
        self.dataset, self.cache, self.seed, self.batch_size, self.every = dataset, cache, seed, batch_size, every
        self._noise: dict | None = None  # image → (K, C, H, W) on the CPU, drawn at the first evaluation
        self.history: list[tuple[int, float]] = []

    @classmethod
    def for_run(cls, run, samples: list, progress: bool, facts: dict) -> Validator | None:
        """The run's validator (None without validation images); their latents and captions cached when the run
        caches its own (the same disk cache too)."""
        if not samples:
            return None
        cfg, t, d = run.cfg, run.cfg.training, run.cfg.data
        sizes = [getattr(facts.get(s.path), "size", None) for s in samples]
        dataset = ImageDataset(samples, d.resolution, d.fast_jpeg_decode, BucketSpec.from_data(d),
                               sizes if all(sizes) else None)  # (in their buckets, centred)
        cache = None
        if run.cache is not None:
            digests = [getattr(facts.get(s.path), "digest", "") or None for s in samples]
            store = LatentStore(latent_cache_dir(cfg.output.output_dir)) if t.cache_latents_to_disk else None
            cache = EncodedCache.build(run.backend, dataset, t.seed, flips=False, texts=run.cache.has_text,
                                       progress=progress, digests=digests, store=store, weighted=d.weighted_captions)
        return cls(dataset, cache, t.seed, t.batch_size, t.validation_every_n_steps)

    def due(self, step: int, total_steps: int) -> bool:
        return step >= total_steps or bool(self.every and step % self.every == 0)

    @staticmethod
    def timesteps(scheduler, low: int = 0, high: int | None = None) -> list[int]:
        """The timesteps each image is evaluated at: spread evenly over the range training draws from."""
        low, high = timestep_range(scheduler, low, high)
        return [low + int((k + 0.5) * (high - low) / VALIDATION_TIMESTEPS) for k in range(VALIDATION_TIMESTEPS)]

    def _inputs(self, run, indices: torch.Tensor):
        """Latents and conditioning of the images ``indices``, the same at every evaluation."""
        backend, device = run.backend, run.device
        captions = [self.dataset.samples[int(i)].caption for i in indices]
        if self.cache is not None:
            latents = self.cache.latents(indices, None, device)
        else:
            pixels = collate([self.dataset[int(i)] for i in indices])["pixel_values"]
            generator = torch.Generator(device=device).manual_seed(self.seed + int(indices[0]))
            latents = backend.encode_images(pixels.to(device), generator)
        with run.autocast():
            if self.cache is not None and self.cache.has_text:
                cond = self.cache.text(captions, device)
            else:
                cond = backend.encode_prompts(captions, weighted=run.cfg.data.weighted_captions)
        if backend.uses_time_ids:
            cond = cond.with_time_ids(self.dataset.time_ids(indices).to(device))
        return latents, cond

    def _noise_for(self, indices: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The fixed noise of images ``indices``: one draw for all when they share a size, else one per image
        (seeded by the seed and the image: images of other buckets have latents of other sizes)."""
        if self._noise is None:
            self._noise = {}
            if len(self.dataset.groups()) == 1:
                generator = torch.Generator().manual_seed(self.seed)
                drawn = torch.randn((len(self.dataset), VALIDATION_TIMESTEPS, *latents.shape[1:]), generator=generator)
                self._noise = dict(enumerate(drawn))
        for i in indices.tolist():
            if i not in self._noise:
                generator = torch.Generator().manual_seed(self.seed + 1_000_003 * (i + 1))
                self._noise[i] = torch.randn((VALIDATION_TIMESTEPS, *latents.shape[1:]), generator=generator)
        return torch.stack([self._noise[i] for i in indices.tolist()])

    @torch.no_grad()
    def loss(self, run) -> float:
        """The mean loss over every validation image and timestep, with the model as it is now."""
        backend, device, n = run.backend, run.device, len(self.dataset)
        scheduler, t = run.noise_scheduler or backend.noise_scheduler, run.cfg.training
        losses = LossSettings.of(t)  # (the training loss's form, so the two curves compare)
        total = 0.0
        batches = [torch.tensor(group[start:start + self.batch_size]) for group in self.dataset.groups()
                   for start in range(0, len(group), self.batch_size)]  # (a batch holds images of one bucket)
        with evaluating(backend.components().values()):
            for indices in batches:
                latents, cond = self._inputs(run, indices)
                noise = self._noise_for(indices, latents)
                for k, step in enumerate(self.timesteps(scheduler, t.min_timestep, t.max_timestep)):
                    timesteps = torch.full((len(indices),), step, dtype=torch.long, device=device)
                    with run.autocast():
                        loss = diffusion_loss(backend, latents, cond, None, loss_settings=losses, timesteps=timesteps,
                                              scheduler=scheduler, noise=noise[:, k].to(device, latents.dtype))
                    total += loss.item() * len(indices)
        return total / (n * VALIDATION_TIMESTEPS)

    def evaluate(self, run, step: int) -> float:
        """The loss at ``step``: logged, into TensorBoard, to the callbacks (a UI's loss plot), kept."""
        value = self.loss(run)
        self.history.append((step, value))
        log.info("step %d: validation loss %.4f (%d image(s) × %d timesteps)", step, value, len(self.dataset),
                 VALIDATION_TIMESTEPS)
        if run.writer is not None:
            run.writer.add_scalar("validation/loss", value, step)
        run.cbs.on_validation(step, value)
        return value

    def summary(self) -> dict:
        """What summary.json says of it."""
        return {"validation_loss": self.history[-1][1] if self.history else None,
                "validation_images": len(self.dataset),
                "validation_losses": [[step, value] for step, value in self.history]}
