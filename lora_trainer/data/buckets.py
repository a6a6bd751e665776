"""Aspect-ratio buckets, as kohya's sd-scripts makes them (library/model_util.make_bucket_resolutions and
library/train_util.BucketManager).

A bucket is a training size (width, height): sides multiples of ``step`` between ``min_reso`` and ``max_reso``,
area at most ``resolution²``. Each image goes to the bucket nearest its aspect ratio, is scaled so it covers the
bucket (the smallest scale that does) and cropped to it: the least possible is cut off. With ``no_upscale`` an
image whose area is below ``resolution²`` is not scaled up: its bucket is its own size rounded down to the step.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

MIN_RESO = 256  # a bucket's shortest side where data.min_bucket_reso is not set (kohya's default)
CROP_WARN = 0.10  # the dataset check names images that lose more than this share of the picture to the crop
UPSCALE_WARN = 2.0  # ...or are scaled up more than this


@dataclass(frozen=True)
class Fit:
    """One image in its bucket: the picture's ``size`` (w, h), the ``bucket`` (w, h) it trains at and the size
    (w, h) it is ``resized`` to before the crop (covering the bucket)."""

    size: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]

    def centre(self) -> tuple[int, int]:
        """(top, left) of the centred crop, in the resized picture's pixels."""
        return (self.resized[1] - self.bucket[1]) // 2, (self.resized[0] - self.bucket[0]) // 2

    @property
    def slack(self) -> tuple[int, int]:
        """How many rows and columns the crop cuts off: (vertical, horizontal)."""
        return self.resized[1] - self.bucket[1], self.resized[0] - self.bucket[0]

    @property
    def kept(self) -> float:
        """The share of the picture the crop keeps."""
        return self.bucket[0] * self.bucket[1] / (self.resized[0] * self.resized[1])

    @property
    def scale(self) -> float:
        """The resize factor (above 1: upscaled)."""
        return self.resized[0] / self.size[0]

    @property
    def ar_error(self) -> float:
        """The bucket's aspect ratio minus the picture's (kohya's ar_error)."""
        return self.bucket[0] / self.bucket[1] - self.size[0] / self.size[1]


@dataclass(frozen=True)
class BucketSpec:
    """The bucket settings of a run (data.enable_bucket and its keys), resolved: ``min_reso`` at most the
    resolution, ``max_reso`` twice the resolution where the config sets none, both multiples of the step."""

    resolution: int
    min_reso: int | None = None  # None: MIN_RESO
    max_reso: int | None = None
    step: int = 64
    no_upscale: bool = False

    def __post_init__(self):  # (sides stay multiples of the step; the square bucket always within the range)
        side = self.square
        low = -(-min(MIN_RESO if self.min_reso is None else self.min_reso, self.resolution) // self.step) * self.step
        object.__setattr__(self, "min_reso", min(low, side))
        high = (self.max_reso or 2 * self.resolution) // self.step * self.step
        object.__setattr__(self, "max_reso", max(high, side))

    @property
    def square(self) -> int:
        """The side of the square bucket: the resolution rounded down to the step (at least one step)."""
        return max(self.step, self.resolution // self.step * self.step)

    @classmethod
    def from_data(cls, data, resolution: int | None = None) -> BucketSpec | None:
        """The spec of a DataConfig (at ``resolution`` where given: a model family's default), or None when
        data.enable_bucket is off."""
        if not data.enable_bucket:
            return None
        return cls(resolution or data.resolution, data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps,
                   data.bucket_no_upscale)

    def resolutions(self) -> list[tuple[int, int]]:
        """The predefined buckets (kohya's make_bucket_resolutions), sorted."""
        area, step = self.resolution * self.resolution, self.step
        resos = {(self.square, self.square)}  # (kohya's int(sqrt(area) // step) * step)
        width = self.min_reso
        while width <= self.max_reso:
            height = min(self.max_reso, int((area // width) // step) * step)
            if height >= self.min_reso:
                resos.add((width, height))
                resos.add((height, width))
            width += step
        return sorted(resos)

    def fit(self, width: int, height: int) -> Fit:
        """The bucket of a ``width`` × ``height`` picture and the size it is scaled to (kohya's select_bucket)."""
        if self.no_upscale:
            return self._fit_no_upscale(width, height)
        resos = self._resos()
        aspect = width / height
        if (width, height) in resos:
            bucket = (width, height)
        else:
            bucket = min(resos, key=lambda r: abs(r[0] / r[1] - aspect))  # (the first of equals, as argmin)
        return Fit((width, height), bucket, _cover(width, height, bucket))

    def _resos(self) -> list[tuple[int, int]]:
        cached = self.__dict__.get("_cached")
        if cached is None:
            cached = self.resolutions()
            object.__setattr__(self, "_cached", cached)
        return cached

    def _fit_no_upscale(self, width: int, height: int) -> Fit:
        area, aspect, step = self.resolution * self.resolution, width / height, self.step

        def down(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        if width * height > area:  # too large: scaled down keeping its aspect ratio, one side a multiple of the step
            w = math.sqrt(area * aspect)
            h = area / w
            w_round, h_round = down(w), down(h)
            by_width = w_round / max(down(w_round / aspect), 1)
            by_height = max(down(h_round * aspect), 1) / max(h_round, 1)
            if abs(by_width - aspect) < abs(by_height - aspect):
                resized = (w_round, int(w_round / aspect + 0.5))
            else:
                resized = (int(h_round * aspect + 0.5), h_round)
        else:
            resized = (width, height)
        bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
        if bucket[0] > resized[0] or bucket[1] > resized[1]:  # a side below one step: scaled up to it after all
            resized = _cover(width, height, bucket)
        return Fit((width, height), bucket, resized)


def _cover(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size a picture is scaled to so it covers ``bucket`` with the least cut off (kohya's rounding)."""
    if width / height > bucket[0] / bucket[1]:  # wider than the bucket: the heights match
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def groups(fits: list[Fit]) -> dict[tuple[int, int], list[int]]:
    """Image indices by bucket, buckets sorted by (width, height) as kohya sorts them."""
    out: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(fits):
        out.setdefault(f.bucket, []).append(i)
    return dict(sorted(out.items()))


def bucket_info(fits: list[Fit]) -> dict:
    """kohya's ``ss_bucket_info``: {"buckets": {index: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}."""
    counts = Counter(f.bucket for f in fits)
    buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    error = sum(abs(f.ar_error) for f in fits) / len(fits) if fits else 0.0
    return {"buckets": buckets, "mean_img_ar_error": error}


def histogram_text(fits: list[Fit]) -> str:
    """``3 buckets: 384×640 ×2, 512×512 ×5, 640×384 ×1``."""
    counts = sorted(Counter(f.bucket for f in fits).items())
    listed = ", ".join(f"{w}×{h} ×{n}" for (w, h), n in counts)
    return f"{len(counts)} bucket{'s' if len(counts) != 1 else ''}: {listed}"
