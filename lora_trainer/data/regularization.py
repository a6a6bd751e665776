"""Regularization images (``data.reg_data_dir``; kohya's reg_data_dir, DreamBooth's prior preservation): pictures of
the class a subject belongs to ("dog"), trained beside the subject's ("sks dog") so the LoRA keeps what the class
looks like; their loss is weighted by ``training.prior_loss_weight``.

Read as kohya's scripts read them: a folder in kohya's layout (``<repeats>_<class tokens>`` sub-folders, a captionless
image trained with its folder's class tokens) or a folder of images with their own captions (no caption prefix: that
is the subject's). An epoch takes as many of them as it trains subject images (repeats counted): each its folder's
repeats, in order, until the count is met, then one more repeat each in turn while it falls short; where there are
more than that, the rest are left out, as kohya's scripts leave them."""

from __future__ import annotations

import dataclasses
import logging

from lora_trainer.data.dataset import DatasetScan, folder_counts, scan_dataset
from lora_trainer.errors import DatasetError

log = logging.getLogger(__name__)


def balanced_repeats(repeats: list[int], target: int) -> list[int]:
    """Each regularization image's repeats an epoch, for ``target`` subject images an epoch (kohya's rule: the
    folders' own repeats in order until the target is met, then one more each in turn); 0: left out."""
    out, total, first = [0] * len(repeats), 0, True
    while repeats and total < target:
        for k, n in enumerate(repeats):
            add = n if first else 1
            out[k] += add
            total += add
            if total >= target:
                break
        first = False
    return out


def scan_regularization(reg_data_dir, caption_extension: str = ".txt", caption_priority: str = "csv",
                        recursive: bool = False, inspect=None) -> DatasetScan:
    """The regularization images of ``reg_data_dir`` as the run reads them (the training run and the dataset check):
    their own captions (the folder's metadata.csv, sidecars, kohya's class tokens), no caption prefix; their
    ``is_reg`` and repeats are set by ``with_regularization``. A folder with no usable image: DatasetError naming
    data.reg_data_dir."""
    try:
        return scan_dataset(reg_data_dir, caption_extension=caption_extension, caption_priority=caption_priority,
                            recursive=recursive, inspect=inspect)
    except DatasetError as e:
        raise DatasetError(f"data.reg_data_dir (the regularization images): {e}") from None


def with_regularization(d, scan: DatasetScan, inspect=None, reg: DatasetScan | None = None) -> DatasetScan:
    """``scan`` (the subject's images) with the regularization images of ``d.reg_data_dir`` after them
    (``Sample.is_reg``), their repeats balanced to the subject's; ``scan`` itself where there are none. ``reg``:
    their scan_regularization where already made (the dataset check's), else they are scanned now."""
    if not d.reg_data_dir:
        return scan
    if reg is None:
        reg = scan_regularization(d.reg_data_dir, d.caption_extension, d.caption_priority, d.recursive, inspect)
    # (named by their whole path: the subject's skipped files are named relative to the subject's folder; and said
    # now, as the dataset check before the run says the subject's)
    skipped = [dataclasses.replace(s, path=str(reg.root / s.path)) for s in reg.skipped]
    for s in skipped:
        log.warning("regularization image %s skipped: %s", s.path, s.reason)
    target = sum(s.repeats for s in scan.samples)
    counts = balanced_repeats([s.repeats for s in reg.samples], target)
    used = [dataclasses.replace(s, repeats=n, is_reg=True) for s, n in zip(reg.samples, counts) if n]
    left = len(reg.samples) - len(used)
    untitled = sum(s.caption_source == "none" for s in used)
    log.info("regularization images: %d of %s, %d an epoch beside the subject's %d (training.prior_loss_weight "
             "weighs their loss)%s%s", len(used), reg.root, sum(s.repeats for s in used), target,
             f"; {left} left out (more than the subject's images need)" if left else "",
             f"; {untitled} without a caption (trained with the empty prompt)" if untitled else "")
    # kohya's ss_reg_dataset_dirs: every image of each folder, at the folder's own repeats
    dirs = folder_counts(reg.samples) or {reg.root.name: {"n_repeats": 1, "img_count": len(reg.samples)}}
    return dataclasses.replace(scan, samples=[*scan.samples, *used], skipped=[*scan.skipped, *skipped],
                               reg_dirs=dirs,
                               problems=[*scan.problems, *reg.problems],
                               folder_notes=[*scan.folder_notes, *reg.folder_notes],
                               facts={**scan.facts, **reg.facts})
