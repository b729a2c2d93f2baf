"""release_free_memory hands the C heap's free pages back: what the agent calls after each full pass."""

from __future__ import annotations

import re

from vxlan_net.agent.memory import release_free_memory

BLOCK = 4096  # above pymalloc's 512 bytes and below glibc's mmap threshold: from the malloc heap
BLOCKS = 10_000


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read())[1])


def test_freed_heap_pages_go_back_to_the_kernel():
    blocks = [bytes(BLOCK) for _ in range(BLOCKS)]  # ~40 MiB, each page written
    pinned = blocks[::64]  # a live block every 256 KiB: free() alone cannot shrink the heap
    del blocks
    before = _rss_anon_kib()
    assert release_free_memory() is True  # glibc (the agent's platforms)
    released = before - _rss_anon_kib()
    assert released > BLOCKS * BLOCK // 1024 // 2, f"only {released} KiB released"
    assert len(pinned) == BLOCKS // 64 + 1
