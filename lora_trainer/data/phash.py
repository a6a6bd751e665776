"""Perceptual hashes (pHash): near-identical pictures get hashes a few bits apart.

The image is reduced to 32×32 gray, its 2-D DCT taken, and the 8×8 lowest frequencies compared with
their median: 64 bits that survive resizing, re-encoding and small colour changes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_N, _K = 32, 8
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))


def phash(img: Image.Image) -> np.ndarray:
    """64 bits (bool array) of ``img``'s perceptual hash."""
    gray = np.asarray(img.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ gray @ _DCT.T)[:_K, :_K].ravel()
    return low > np.median(low[1:])  # the DC term (overall brightness) left out of the median


def near_pairs(hashes: np.ndarray, max_distance: int = 6, chunk: int = 1024) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for every pair i < j of hashes at most ``max_distance`` bits apart."""
    bits = np.asarray(hashes, dtype=np.int32).reshape(len(hashes), -1)
    pairs = []
    for start in range(0, len(bits), chunk):
        block = bits[start:start + chunk]
        dist = block @ (1 - bits).T + (1 - block) @ bits.T  # differing bits, without a popcount
        for a, b in zip(*np.nonzero(dist <= max_distance)):
            i = start + int(a)
            if i < int(b):
                pairs.append((i, int(b), int(dist[a, b])))
    return pairs
