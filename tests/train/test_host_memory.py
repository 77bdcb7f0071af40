"""Freed host memory is reused without page faults once ``retain_freed_host_memory`` ran.

The reference is the same process without the call: glibc then unmaps a freed 64 MiB block
and the next one of the same size is faulted in page by page (the cost the setting removes).
Each case runs in its own interpreter, since the setting is process-wide.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparse_moe.train.host_memory import _glibc

COUNT_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from sparse_moe.train.host_memory import retain_freed_host_memory
    assert retain_freed_host_memory()
size = 64 * 2**20 // 4
# The first rounds may grow the heap (a small allocation can take the start of a freed
# block, so the next block goes above it); by the last round every block is reused. How many
# rounds that takes depends on what the process imported before (more than 6 where it imported
# little more than torch).
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(size)
    block.fill_(1.0)  # touch every page
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", COUNT_FAULTS, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the setting is glibc's; other C libraries keep "
                    "their own policy")
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    pages = 64 * 2**20 // 4096
    assert _faults("default") > pages // 2  # glibc's default: a fresh mmap every time
    assert _faults("retain") < pages // 20


RELEASE = """
import sys, torch
from sparse_moe.train.host_memory import release_freed_host_memory, retain_freed_host_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
assert retain_freed_host_memory()
# A checkpoint's worth of 1 MiB tensors, loaded and freed, a small block kept after each one
# (as a load leaves its bookkeeping behind), so the freed space is in pieces, not at the top.
pieces, kept = [], []
for _ in range(192):
    pieces.append(torch.ones(2**18))
    kept.append(torch.ones(16))
before = rss()
del pieces
freed = rss()
if sys.argv[1] == "release":
    assert release_freed_host_memory()
print(before - freed, before - rss())
"""


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc_trim")
def test_releasing_returns_freed_pieces_that_retaining_keeps():
    runs = {}
    for mode in ("keep", "release"):
        out = subprocess.run([sys.executable, "-c", RELEASE, mode], capture_output=True,
                             text=True, timeout=120, check=True)
        runs[mode] = [float(v) for v in out.stdout.split()[-2:]]
    kept_on_free, kept_at_end = runs["keep"]
    assert kept_on_free < 16 and kept_at_end < 16, runs  # 192 MiB freed, still resident
    assert runs["release"][1] > 150, runs  # given back once released
