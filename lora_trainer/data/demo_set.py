"""A small generated data set in one consistent "style", for the demo and the tests (no download)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_trainer.errors import DatasetError
from lora_trainer.utils.fsio import atomic_write, atomic_write_text

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")
MOODS = ("soft light", "warm light", "calm", "bright")
_DEMO_NAME = re.compile(r"demo_\d{3,}\.png")


def _image(rng: np.random.Generator, resolution: int, color, shape: str) -> Image.Image:
    """A shape on a diagonal gradient (the shared "style" a LoRA can learn)."""
    y, x = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    t = (x + y) / 2
    top, bottom = np.array([250, 235, 210]), np.array([120, 90, 160])
    bg = (top * (1 - t[..., None]) + bottom * t[..., None]).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    r = resolution * rng.uniform(0.18, 0.3)
    cx, cy = rng.uniform(r, resolution - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color, outline=(30, 30, 30),
                                                            width=max(1, resolution // 32))
    return img


def _is_demo_csv(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    names = [line.split(",")[0] for line in lines[1:]]
    return lines[:1] == ["filename,prompt"] and all(_DEMO_NAME.fullmatch(name) for name in names)


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, lambda p: p.write_bytes(data))


def make_demo_dataset(folder, n: int = 8, resolution: int = 64, seed: int = 0) -> Path:
    """Write ``n`` PNGs and a metadata.csv with markdown captions into ``folder``; return it.

    A folder that already holds a demo set (only ``demo_NNN.png`` and metadata.csv) is brought to
    this ``n``/``resolution``/``seed``: unchanged files are left alone, extra demo images removed.
    Any other non-empty folder is refused.
    """
    folder = Path(folder)
    if n < 1:
        raise ValueError(f"a demo set needs at least one image, not n={n}")
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder} is a file; choose a folder for the demo set")
    names = [f"demo_{i:03d}.png" for i in range(n)]
    existing = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    stray = [p.name for p in existing if not _DEMO_NAME.fullmatch(p.name)
             and not (p.name == "metadata.csv" and _is_demo_csv(p))]
    if stray:
        raise DatasetError(f"{folder} is not empty and not a demo set (it has {', '.join(stray[:3])}); "
                           "choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    for i, name in enumerate(names):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        png = io.BytesIO()
        _image(rng, resolution, COLORS[color], shape).save(png, format="PNG")
        _write_if_changed(folder / name, png.getvalue())
        writer.writerow([name, f"**demo style**, a {color} {shape}, *{MOODS[i % len(MOODS)]}*"])
    for p in existing:
        if p.name not in names and p.name != "metadata.csv":
            p.unlink()  # a demo image from an earlier, larger demo set
    meta = folder / "metadata.csv"
    if not (meta.is_file() and meta.read_text(encoding="utf-8") == rows.getvalue()):
        atomic_write_text(meta, rows.getvalue())
    return folder
