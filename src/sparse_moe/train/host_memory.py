"""Keeping freed host memory in the process, so that CPU training steps do not page-fault.

glibc's ``malloc`` serves every request above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and unmaps it again on ``free``. A CPU training step allocates the same large buffers
at every step (activations, logits, weight gradients: an MoE-256 layer's two expert gradients
are 512 MiB each at d=512), so each step writes to fresh pages, which the kernel must fault
in and zero first: for the experts' weight gradients that costs as much again as the product
itself, and MoE-32 trains about 40% faster with freed memory kept (``docs/benchmarks.md``,
"Design choices measured").

:func:`retain_freed_host_memory` turns ``mmap`` off for ``malloc`` (``M_MMAP_MAX = 0``), so
large blocks come from the heap too, and raises the trim threshold, so freed blocks stay
mapped and are reused. What it costs: the process's resident memory stays at its peak
instead of shrinking between steps, and long-lived blocks can fragment the heap (the planner
counts it: ``sparse_moe.plan``). PyTorch's CPU tuning
guide recommends the same effect through jemalloc or tcmalloc (``LD_PRELOAD``); this needs
nothing installed. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes (an int): free memory at the top of the heap up to 2 GiB is
# kept. Larger frees still shrink the heap, rarely enough not to matter.
TRIM_THRESHOLD_BYTES = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        getattr(libc, "gnu_get_libc_version")  # only glibc has it  # noqa: B009
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_host_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse; returns whether it could.

    Affects allocations made after the call, in the whole process.
    """
    libc = _glibc()
    if libc is None:
        return False
    return (libc.mallopt(M_MMAP_MAX, 0) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)


def release_freed_host_memory() -> bool:
    """Returns the heap's free blocks to the kernel (glibc ``malloc_trim``); whether it could.

    For after a one-off burst of allocations, such as loading a checkpoint: the loaded
    tensors are freed in pieces that later, larger step buffers cannot reuse, and with freed
    memory kept they would stay resident for the rest of the run (a copy of the rank's
    experts). Blocks still in use are untouched.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

