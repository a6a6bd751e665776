"""Latents and text embeddings computed once before training, so steps do no VAE or text-encoder work.

Each image is encoded once (and once mirrored when random_flip is on). The cached latent is one sample
of the VAE posterior drawn with a fixed generator, as kohya's cache_latents and the diffusers examples
do. Captions are encoded once each when the text encoder is frozen. Everything is kept on the CPU and
moved per batch.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class EncodedCache:
    def __init__(self, latents: torch.Tensor, flipped: torch.Tensor | None, texts: dict[str, torch.Tensor] | None):
        self._latents, self._flipped, self._texts = latents, flipped, texts

    @property
    def has_text(self) -> bool:
        return self._texts is not None

    @classmethod
    @torch.no_grad()
    def build(cls, backend, dataset, batch_size: int, seed: int, flips: bool, texts: bool,
              progress: bool = True) -> EncodedCache:
        from tqdm.auto import tqdm

        generator = torch.Generator(device=backend.device).manual_seed(seed)
        latents, flipped, embeddings = [], [], {}
        order = list(range(len(dataset)))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for idx in tqdm(batches, desc="caching latents", unit="batch", disable=not progress):
            items = [dataset[i] for i in idx]
            pixels = torch.stack([it["pixel_values"] for it in items]).to(backend.device)
            latents.append(backend.encode_images(pixels, generator).cpu())
            if flips:
                flipped.append(backend.encode_images(pixels.flip(-1), generator).cpu())
            if texts:
                new = sorted({it["caption"] for it in items} - embeddings.keys())
                if new:
                    for caption, emb in zip(new, backend.encode_prompts(new)):
                        embeddings[caption] = emb.detach().cpu()
        log.info("cached the latents of %d images%s%s", len(dataset), " (and mirrored)" if flips else "",
                 f" and {len(embeddings)} caption embeddings" if texts else "")
        return cls(torch.cat(latents), torch.cat(flipped) if flips else None, embeddings if texts else None)

    def latents(self, indices: torch.Tensor, flip: torch.Tensor | None, device) -> torch.Tensor:
        out = self._latents[indices]
        if flip is not None:
            out = torch.where(flip.cpu()[:, None, None, None], self._flipped[indices], out)
        return out.to(device)

    def text(self, captions: list[str], device) -> torch.Tensor:
        return torch.stack([self._texts[c] for c in captions]).to(device)
