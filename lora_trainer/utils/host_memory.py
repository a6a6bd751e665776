"""Giving the host's memory back after training in its process (the WebUI's, Forge's).

Training frees what it made (LoRA layers, optimizer state, activations, the copies ``models.forge`` swaps in), but
glibc's allocator keeps freed heap pages for reuse instead of returning them: the WebUI's process stays as large as
at its peak, and its next generation (Forge merging a LoRA into fp32 SDXL weights on the CPU needs ~5 GB more) can
run the machine out of memory. ``malloc_trim(0)`` returns the free pages to the system.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def give_back_freed_memory() -> int | None:
    """Return the allocator's free pages to the system (glibc on Linux; elsewhere nothing happens); logs and returns
    by how many bytes the process's resident memory fell (None where that cannot be done or read)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # (musl and others: no malloc_trim)
        return None
    before = resident_bytes()
    trim(0)
    after = resident_bytes()
    if before is None or after is None:
        return None
    log.info("memory given back to the system after training: %.0f MB (the process now holds %.1f GB)",
             (before - after) / 2**20, after / 2**30)
    return before - after
