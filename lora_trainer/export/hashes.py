"""The hashes kohya's tools and the WebUI show for a LoRA (``sshs_model_hash``, ``sshs_legacy_hash``).

Same definitions as kohya sd-scripts' ``addnet_hash_safetensors`` and ``addnet_hash_legacy``
(library/train_util.py), which A1111's ``modules/hashes.py`` also uses:
- model hash: sha256 (hex) of everything after the safetensors header (8-byte little-endian header
  length n, then n header bytes), so it covers the tensors and not the metadata;
- legacy hash: the first 8 hex digits of the sha256 of the 0x10000 bytes at offset 0x100000 (empty,
  hence always ``e3b0c442``, for a file under 1 MiB).
"""

from __future__ import annotations

import hashlib

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
CHUNK = 1 << 20  # 1 MiB, as kohya reads


def _data_start(data: bytes) -> int:
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    return 8 + int.from_bytes(data[:8], "little")


def model_hash(data: bytes) -> str:
    return hashlib.sha256(data[_data_start(data):]).hexdigest()


def legacy_hash(data: bytes) -> str:
    return hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]).hexdigest()[:8]


def file_hashes(path) -> tuple[str, str]:
    """(model hash, legacy hash) of a safetensors file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        f.seek(_data_start(f.read(8)))
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
    return h.hexdigest(), legacy
