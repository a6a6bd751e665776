"""utils/host_memory.py: after training in the WebUI's process, the allocator's free pages go back to the system."""

from __future__ import annotations

import sys

import pytest

from lora_trainer.utils.host_memory import give_back_freed_memory, resident_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_is_given_back():
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MB in heap-sized blocks (glibc keeps them once freed)
    keep = blocks[-1]  # (the top of the heap stays in use: only a trim inside the heap gives the rest back)
    before = resident_bytes()
    del blocks
    freed = give_back_freed_memory()
    assert freed is not None and freed > 150 * 2**20, (before, freed)
    assert resident_bytes() < before - 150 * 2**20
    del keep
