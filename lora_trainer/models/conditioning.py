"""What the UNet is conditioned on: made by a backend, kept by the cache, taken by ``predict``.

SD 1.x/2.x need the text encoder's hidden states (B×77×D); SDXL adds a pooled text embedding (B×D'), and
its per-image size/crop ids (``time_ids``), which come with the images, not the captions: a backend's
``encode_prompts`` leaves them None and the loop adds each batch's (``with_time_ids``) where the backend
``uses_time_ids``. A language-model task has none of it. Rows are independent: the cache keeps one row per
caption and a batch is their concatenation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Conditioning:
    context: torch.Tensor  # B×T×D hidden states for cross-attention
    pooled: torch.Tensor | None = None  # B×D' pooled text embedding (SDXL)
    # B×6 per image: original height, width, crop top, left, target height, width (SDXL's micro-conditioning)
    time_ids: torch.Tensor | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        return self.context.shape[0]

    def map(self, fn) -> Conditioning:
        """The same conditioning with ``fn`` applied to each of its tensors."""
        return Conditioning(**{k: fn(v) for k, v in self._tensors().items()})

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        """This conditioning with the batch's images' size/crop ids (one row per sample)."""
        if time_ids.shape != (len(self), 6):
            raise ValueError(f"time_ids must be {len(self)}×6 (one row per sample), not {tuple(time_ids.shape)}")
        return dataclasses.replace(self, time_ids=time_ids)

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        return self.map(lambda t: t.to(device, dtype=dtype) if dtype is not None else t.to(device))

    def rows(self) -> list[Conditioning]:
        """One conditioning per sample (batch dimension kept), detached, on the CPU: what the cache keeps."""
        return [self.map(lambda t, i=i: t[i : i + 1].detach().cpu()) for i in range(len(self))]

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        first = items[0]._tensors()
        return Conditioning(**{k: torch.cat([c._tensors()[k] for c in items]) for k in first})

    def bad_rows(self) -> list[int]:
        """The samples whose conditioning holds a non-finite value."""
        bad = torch.zeros(len(self), dtype=torch.bool)
        for t in self._tensors().values():
            bad |= ~torch.isfinite(t.reshape(len(self), -1)).all(dim=1).cpu()
        return [i for i, b in enumerate(bad.tolist()) if b]
