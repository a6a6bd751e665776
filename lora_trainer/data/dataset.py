"""Scan a dataset folder into usable samples (with captions) and skipped files (with reasons)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.data.captions import read_metadata_csv, strip_markdown, tag_frequency
from lora_trainer.data.images import IMAGE_EXTENSIONS, ImageError, is_image_name, load_image, resize_center_crop, to_tensor
from lora_trainer.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str  # what the trainer tokenizes: prefix + caption without markdown
    core_tags: tuple[str, ...]
    caption_source: str  # "csv" | "txt" | "none"


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    @property
    def kind(self) -> str:
        r = self.reason
        if "not found" in r:
            return "missing"
        if "escapes" in r:
            return "outside the folder"
        if "not an image" in r or "not a supported" in r:
            return "not an image"
        if "empty" in r:
            return "empty"
        return "corrupt"


@dataclass
class DatasetScan:
    root: Path
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    csv_name: str = "metadata.csv"

    def tag_frequency(self) -> dict[str, int]:
        return tag_frequency(s.caption for s in self.samples)

    def summary(self) -> str:
        kinds = Counter(s.kind for s in self.skipped)
        skipped = f"{len(self.skipped)} skipped"
        if kinds:
            skipped += " (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
        sources = Counter(s.caption_source for s in self.samples)
        return (f"dataset {self.root}: {len(self.samples)} images used, {skipped}; captions: "
                f"{sources['csv']} from {self.csv_name}, {sources['txt']} from caption files, "
                f"{sources['none']} without caption")


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _read_sidecar(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        log.warning("caption file %s is not UTF-8; ignored (re-save it as UTF-8)", path)
        return None


def scan_dataset(root, metadata_path=None, caption_extension: str = ".txt", caption_priority: str = "csv",
                 caption_prefix: str = "", recursive: bool = False) -> DatasetScan:
    """Find the images, check each one opens, attach captions; raise DatasetError if none is usable."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"data.train_data_dir: {root} is not an existing folder")
    csv_path = Path(metadata_path).expanduser().resolve() if metadata_path else root / "metadata.csv"
    scan = DatasetScan(root, csv_name=csv_path.name)
    rows = {}
    if csv_path.is_file():
        rows, scan.problems = read_metadata_csv(csv_path)
        for problem in scan.problems:
            log.warning("%s", problem)

    def skip(rel: str, reason: str) -> None:
        scan.skipped.append(Skipped(rel, reason))
        log.warning("skipped %s: %s", rel, reason)

    pattern = "**/*" if recursive else "*"
    found = sorted(p for p in root.glob(pattern) if p.is_file() and is_image_name(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    candidates = {p.relative_to(root).as_posix(): p for p in found}
    csv_captions: dict[str, str] = {}
    for name, entry in rows.items():
        path = (root / name) if not Path(name).is_absolute() else Path(name)
        where = f"listed in {csv_path.name} line {entry.line}"
        if not _inside(root, path):
            skip(name, f"{where}: escapes the dataset folder")
            continue
        rel = path.resolve().relative_to(root).as_posix()
        if not path.is_file():
            skip(name, f"{where} but not found")
            continue
        if not is_image_name(path):
            skip(name, f"{where}: not a supported image type (use {', '.join(IMAGE_EXTENSIONS)})")
            continue
        candidates.setdefault(rel, path.resolve())
        csv_captions[rel] = entry.caption

    for rel in sorted(candidates):
        path = candidates[rel]
        if path.is_symlink() and not _inside(root, path):
            skip(rel, "escapes the dataset folder (a link to a file outside it)")
            continue
        try:
            load_image(path)
        except ImageError as e:
            skip(rel, str(e))
            continue
        from_csv = csv_captions.get(rel)
        from_txt = _read_sidecar(path.with_suffix(caption_extension))
        order = [("csv", from_csv), ("txt", from_txt)]
        if caption_priority == "txt":
            order.reverse()
        source, raw = next(((s, c) for s, c in order if c is not None), ("none", ""))
        text, core = strip_markdown(raw)
        scan.samples.append(Sample(path, caption_prefix + text, tuple(core), source))

    no_caption = sum(s.caption_source == "none" for s in scan.samples)
    if no_caption:
        log.warning("%d images have no caption (no %s row, no %s file): trained with the prefix only",
                    no_caption, csv_path.name, caption_extension)
    if not scan.samples:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in scan.skipped[:3]) or "no image files found"
        raise DatasetError(f"no usable images in {root}: looked at {len(candidates)} image files, "
                           f"skipped {len(scan.skipped)} ({reasons}); accepted types: {', '.join(IMAGE_EXTENSIONS)}")
    return scan


class ImageDataset(torch.utils.data.Dataset):
    """Samples → resized, center-cropped pixel tensors in [-1, 1] and their captions."""

    def __init__(self, samples: list[Sample], resolution: int):
        self.samples, self.resolution = list(samples), resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        pixels = to_tensor(resize_center_crop(load_image(s.path), self.resolution))
        return {"pixel_values": pixels, "caption": s.caption, "index": i}


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "indices": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }
