"""Reading images the way users have them (EXIF rotation, alpha, 16-bit, CMYK) and cropping them."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_16BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # in PNG files these hold 16-bit gray
# the dataset scan and check decode JPEGs at a scale still this large (sizes and perceptual hashes need
# no more)
SCAN_DRAFT_PX = 128


def file_digest(path) -> str:
    """The sha256 of a file's bytes: identical files, and the latent cache's key of an image."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def decode_threads() -> int:
    """How many threads decode images at once (PIL decodes and resizes without holding the GIL)."""
    return min(8, os.cpu_count() or 1)


def prefetch(fn: Callable, items: Iterable, ahead: int | None = None) -> Iterator:
    """``fn(item)`` for each item, in order, computed by decoding threads at most ``ahead`` items in advance
    (so a slow consumer, a VAE, never holds more than that many decoded images)."""
    threads = decode_threads()
    ahead = ahead or 2 * threads
    items = iter(items)
    pool = ThreadPoolExecutor(threads)
    try:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(ahead), items))
        while pending:
            result = pending.popleft().result()
            for item in items:  # one more in flight for the one taken
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:  # closed early, or an error: what has not started yet never starts
        pool.shutdown(wait=True, cancel_futures=True)


class ImageError(Exception):
    """Why an image cannot be used; the message is the one-line reason shown to the user."""

    @property
    def reason(self) -> str:
        return str(self)


@contextlib.contextmanager
def strict_decoding():
    """Let truncated files fail even if another library (a WebUI extension) set LOAD_TRUNCATED_IMAGES.

    Pillow keeps that switch process-wide, so hold this around a whole scan, not per image.
    """
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WebP"), (b"BM", "BMP"),
               (b"GIF8", "GIF"))


def _unidentified(path: Path) -> ImageError:
    """Why Pillow could not identify the file: a damaged image, or something else named like one."""
    with open(path, "rb") as f:
        head = f.read(512)
    fmt = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if fmt:
        return ImageError(f"truncated or corrupt: starts like a {fmt} file but cannot be decoded")
    if head[4:8] == b"ftyp":
        what = "a HEIC/AVIF/MP4-type file; convert it to PNG or JPEG"
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        what = "an HTML page, perhaps a failed download"
    elif head.startswith(b"%PDF"):
        what = "a PDF document"
    elif _is_text(head):
        what = "a text file"
    else:
        what = "the content is not a format Pillow reads"
    return ImageError(f"not an image ({what})")


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit gray scaled (not clipped) to 8 bits: 65535 -> 255, 32768 -> 128."""
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8))


def _flatten(img: Image.Image) -> Image.Image:
    """Transparent images (alpha band or a transparency key) composited on white."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _open(path: Path, draft: int | tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file")
        with Image.open(path) as img:
            size = img.size
            if draft:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least draft × draft (or (w, h))
                img.draft("RGB", _pair(draft))
            img.load()  # decode everything now (all of a JPEG's data even at a reduced scale): a truncated
            return img, size  # file fails here, not during training
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("cannot read it (permission denied)") from None
    except IsADirectoryError:
        raise ImageError("a folder, not a file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large to load safely (decompression-bomb guard: {e})") from None
    except UnidentifiedImageError:
        raise _unidentified(path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"truncated or corrupt: {e}") from None


def _pair(draft: int | tuple[int, int]) -> tuple[int, int]:
    return (draft, draft) if isinstance(draft, int) else tuple(draft)


def draft_scale(path, draft: int | tuple[int, int]) -> int:
    """By how much ``load_image(path, draft=draft)`` shrinks the picture as it decodes: 1 (not a JPEG, or
    not large enough), 2, 4 or 8. Reads the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            img.draft("RGB", _pair(draft))
            if img.size == (w, h):
                return 1
            return next(s for s in (8, 4, 2) if img.size == (-(-w // s), -(-h // s)))
    except (OSError, ValueError, StopIteration, Image.DecompressionBombError):
        return 1  # what cannot be opened is not decoded either: the scan or the decode says why


def load_image(path, draft: int | tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode and normalise an image to RGB, or raise ImageError with the reason.

    ``draft``: fewer pixels are enough; JPEGs may decode at a reduced scale (no smaller than draft px).
    """
    return open_image(path, draft)[0]


def open_image(path, draft: int | tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image``, and the size of the whole picture as shown (EXIF orientation applied), also where
    ``draft`` decoded fewer pixels."""
    path = Path(path)
    img, size = _open(path, draft)
    if img.width == 0 or img.height == 0:
        raise ImageError("zero-size image")
    try:
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        img = ImageOps.exif_transpose(img)
        size = size[::-1] if turned else size
    except Exception as e:  # noqa: BLE001 - a broken EXIF block is no reason to lose the picture
        log.debug("%s: EXIF orientation ignored (%s)", path, e)
    if img.mode in _16BIT_MODES:
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _flatten(img), size
    return (img if img.mode == "RGB" else img.convert("RGB")), size


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """(w, h, left, top): the size a ``width`` × ``height`` picture is scaled to (shorter side ``resolution``) and
    where ``resize_center_crop`` cuts its centre square out of that."""
    scale = resolution / min(width, height)
    w, h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return w, h, (w - resolution) // 2, (h - resolution) // 2


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is ``resolution``, then cut the centre square."""
    w, h, left, top = center_crop_box(img.width, img.height, resolution)
    if (w, h) != img.size:
        scale = resolution / min(img.width, img.height)
        img = img.resize((w, h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    return img.crop((left, top, left + resolution, top + resolution))


def resize_crop(img: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """Scale to ``resized`` (w, h), then cut ``box`` (left, top, right, bottom) out of that: an image into its
    aspect-ratio bucket (data.buckets)."""
    if img.size != tuple(resized):
        down = resized[0] < img.width
        img = img.resize(tuple(resized), Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
    return img.crop(box)


def shown_sizes(path, draft: int | tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w, h) of the whole picture, (w, h) that ``load_image(path, draft)`` decodes it to), both with the EXIF
    orientation applied; reads the header only (the decode scale and the orientation are there)."""
    with Image.open(path) as img:
        size = img.size
        if draft:
            img.draft("RGB", _pair(draft))
        decoded = img.size
        try:
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001 - as open_image: a broken EXIF block is ignored
            turned = False
    return (size[::-1], decoded[::-1]) if turned else (size, decoded)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → float tensor C×H×W in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
