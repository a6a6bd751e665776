"""Hold out a part of a data set for the validation loss (``data.validation_split``)."""

from __future__ import annotations

import dataclasses
import hashlib

from lora_trainer.data.dataset import DatasetScan, Sample
from lora_trainer.errors import ConfigError


def split_validation(scan: DatasetScan, fraction: float, seed: int) -> tuple[DatasetScan, list[Sample]]:
    """The scan with ``fraction`` of its images (at least one) taken out, and those images. Which ones is decided by
    the seed and each image's path in the folder (a hash, so it does not depend on the order the files were found in,
    nor on where the folder is); a split that would leave no training image is refused."""
    n = len(scan.samples)
    held = max(1, round(fraction * n))
    if held >= n:
        raise ConfigError(f"data.validation_split: {fraction} of {n} image(s) holds out {held}, which leaves no image "
                          "to train on; lower it (or put validation images in a folder of their own: "
                          "data.validation_dir)")

    def rank(i: int) -> str:
        path = scan.samples[i].path
        try:
            name = path.relative_to(scan.root).as_posix()
        except ValueError:
            name = path.name
        return hashlib.sha256(f"{seed}|{name}".encode()).hexdigest()

    out = set(sorted(range(n), key=rank)[:held])
    kept = [s for i, s in enumerate(scan.samples) if i not in out]
    return dataclasses.replace(scan, samples=kept), [s for i, s in enumerate(scan.samples) if i in out]
