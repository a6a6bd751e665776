"""The pre-flight's traces kept on disk (``<cache>/preflight/``, the cache folder of models.tiny.cache_root), so a run
whose settings were traced before, in any process (the next command, the tab after a restart), skips the trace: SDXL's
fake-tensor step takes 10-40 s of CPU, SD 1.5's 5-15 s (bench/RESULTS.md, section Pre-flight).

A trace is a function of its key (the model's configs and the settings that shape a step: engine.preflight builds it)
and of the code that ran it; the key stored holds this package's source and the versions of torch, diffusers, peft and
transformers, so a change to any of them traces again. Files that cannot be read, or hold another key, are ignored;
a cache folder that cannot be written costs only the next run its trace. The newest ``KEEP`` files are kept."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

from lora_trainer.models.tiny import cache_root
from lora_trainer.utils.fsio import atomic_write_json

log = logging.getLogger(__name__)

KEEP = 256
LIBRARIES = ("torch", "diffusers", "peft", "transformers", "xformers")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of this package's Python source and the libraries' versions."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=?".encode())
    return digest.hexdigest()


def _path(key: str) -> Path:
    return cache_root() / "preflight" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"


def full_key(key: str) -> str:
    return f"{code_version()} {key}"


def load(key: str) -> dict | None:
    """The value stored under ``key`` (a string), or None."""
    key = full_key(key)
    path = _path(key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("value"), dict):
        return None
    try:
        os.utime(path)  # (used now: the files kept are the newest used)
    except OSError:
        pass
    return data["value"]


def store(key: str, value: dict) -> None:
    """``value`` (JSON) under ``key``, written atomically; the oldest files beyond ``KEEP`` removed."""
    key = full_key(key)
    path = _path(key)
    try:
        atomic_write_json(path, {"key": key, "value": value})
        files = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        log.debug("pre-flight: trace not kept on disk (%s)", e)
