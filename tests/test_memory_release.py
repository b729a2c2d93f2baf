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


_THREAD_ALLOCATES = """
import re, sys, threading
from vxlan_net.agent.memory import use_one_malloc_arena

def arenas_mapped():  # glibc maps each thread arena's heap at a 64 MiB boundary (HEAP_MAX_SIZE)
    starts = [int(a, 16) for a in re.findall(r"^([0-9a-f]+)-", open("/proc/self/maps").read(), re.M)]
    return sum(1 for a in starts if a % (64 << 20) == 0)

if sys.argv[1] == "one":
    assert use_one_malloc_arena() is True
before = arenas_mapped()
kept = []
def allocate():
    kept.extend(bytes(4096) for _ in range(256))  # malloc, from this thread's arena
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(arenas_mapped() - before)
"""


def _new_mappings(mode: str) -> int:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _THREAD_ALLOCATES, mode], capture_output=True, text=True,
                          timeout=60, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_with_one_arena_threads_map_no_heaps_of_their_own():
    assert _new_mappings("default") >= 1  # the check sees glibc's arenas at all
    assert _new_mappings("one") == 0
