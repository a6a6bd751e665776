"""A small generated data set in one consistent "style", for the demo and the tests (no download)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_trainer.errors import DatasetError
from lora_trainer.utils.fsio import atomic_write, atomic_write_text

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")
MOODS = ("soft light", "warm light", "calm", "bright")


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


def make_demo_dataset(folder, n: int = 8, resolution: int = 64, seed: int = 0) -> Path:
    """Write ``n`` PNGs and a metadata.csv with markdown captions into ``folder``; return it."""
    folder = Path(folder)
    names = [f"demo_{i:03d}.png" for i in range(n)]
    if folder.is_dir():
        stray = [p.name for p in folder.iterdir() if p.name not in set(names) | {"metadata.csv"}]
        if stray:
            raise DatasetError(f"{folder} is not empty and not a demo set (it has {stray[:3]}); choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    for i, name in enumerate(names):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        img = _image(rng, resolution, COLORS[color], shape)
        atomic_write(folder / name, lambda p, img=img: img.save(p, format="PNG"))
        writer.writerow([name, f"**demo style**, a {color} {shape}, *{MOODS[i % len(MOODS)]}*"])
    atomic_write_text(folder / "metadata.csv", rows.getvalue())
    return folder
