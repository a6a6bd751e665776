"""The hashes the WebUI and kohya's tools show for a LoRA (``sshs_model_hash``, ``sshs_legacy_hash``).

Same definitions as kohya sd-scripts (``addnet_hash_safetensors``, ``addnet_hash_legacy``): the model
hash covers the tensor bytes after the safetensors header, so it does not change with the metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
CHUNK = 1 << 20


def _header_end(first8: bytes) -> int:
    return 8 + int.from_bytes(first8[:8], "little")


def model_hash(data: bytes) -> str:
    return hashlib.sha256(data[_header_end(data):]).hexdigest()


def legacy_hash(data: bytes) -> str:
    return hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]).hexdigest()[:8]


def file_hashes(path) -> tuple[str, str]:
    """(model hash, legacy hash) of a safetensors file, read in 1 MiB chunks."""
    with open(Path(path), "rb") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
        f.seek(0)
        f.seek(_header_end(f.read(8)))
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest(), legacy
