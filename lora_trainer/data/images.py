"""Reading images the way users have them (EXIF rotation, alpha, 16-bit, CMYK) and cropping them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageError(Exception):
    """Why an image cannot be used; the message is the one-line reason shown to the user."""


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer images scaled (not clipped) to 8 bits, as grayscale."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8), "L")


def _flatten(img: Image.Image) -> Image.Image:
    """RGBA / LA / P-with-transparency composited on white."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(path) -> Image.Image:
    """Open, fully decode and normalise an image to RGB, or raise ImageError with the reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file")
        with Image.open(path) as img:
            img.load()  # decode everything now: a truncated file fails here, not during training
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels to load safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (the file's content is not a format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"truncated or corrupt: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError("zero-size image")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _flatten(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is ``resolution``, then cut the centre square."""
    scale = resolution / min(img.width, img.height)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → float tensor C×H×W in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
