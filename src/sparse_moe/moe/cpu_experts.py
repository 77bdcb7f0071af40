"""How the experts' products run on a CPU: worker threads for grouped products, a padded
``bmm`` for equal groups.

PyTorch's CPU ``grouped_mm`` loops over the groups, each product its own OpenMP region over
all cores: with many small groups the threads spend their time starting and synchronising.
Two remedies, chosen per call by :func:`use_cpu_workers` and :func:`use_padded_batches`:

- :class:`GemmWorkers`: Python threads that each run whole products on one intra-op thread,
  so every core takes its share of the groups without a barrier per group (forward and
  backward, ``worker_grouped_matmul``);
- a ``bmm`` over groups padded to the largest one (``padded_experts_forward``), which pays off
  only while the padding is free (equal groups: strict balancing).

The measurements behind the thresholds are in ``docs/benchmarks.md`` ("MoE layer", and
"Design choices measured"). On GPUs neither applies: the grouped kernel has neither cost.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_cpu_workers(x: Tensor, num_groups: int) -> bool:
    """Whether a CPU grouped product runs on :class:`GemmWorkers` instead of ``grouped_mm``.

    PyTorch's CPU ``grouped_mm`` loops over the groups, each product its own OpenMP region
    over all cores. Giving each core its own share of the groups, one thread per product,
    does the same products without a barrier per group, which is faster for every group size
    measured (``docs/benchmarks.md``, "Design choices measured"). Needs a group per worker at
    least (each weight gradient is one worker's product).
    """
    threads = torch.get_num_threads()
    return x.device.type == "cpu" and threads > 1 and num_groups >= threads and x.shape[0] > 0


class GemmWorkers:
    """Python threads that each run PyTorch products on one intra-op thread.

    PyTorch releases the GIL inside ``mm``, so ``count`` workers keep ``count`` cores busy.
    Each worker first initialises its thread pool state (a parallel fill) and then sets one
    intra-op thread (OpenMP and MKL, both thread-local); the process-wide default that
    ``torch.set_num_threads`` also records is put back afterwards, so threads started later
    still get the caller's count.
    """

    _shared: "GemmWorkers | None" = None

    def __init__(self, count: int) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.count = count
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="sparse_moe_gemm")
        ready = threading.Barrier(count)  # one start-up task on each worker
        list(self.pool.map(lambda _: self._one_intra_op_thread(ready), range(count)))
        torch.set_num_threads(count)

    @staticmethod
    def _one_intra_op_thread(ready) -> None:
        torch.empty(1 << 16).fill_(0.0)  # lazy per-thread init, before it is overridden
        torch.set_num_threads(1)
        ready.wait()

    @classmethod
    def shared(cls) -> "GemmWorkers":
        """The process's workers, one per intra-op thread of the caller."""
        threads = torch.get_num_threads()
        if cls._shared is None or cls._shared.count != threads:
            if cls._shared is not None:
                cls._shared.pool.shutdown(wait=False)  # the caller's thread count changed
            cls._shared = cls(threads)
        return cls._shared

    def run(self, tasks: list) -> None:
        """Runs each worker's list of zero-argument callables; re-raises the first error."""
        for future in [self.pool.submit(_run_all, part) for part in tasks if part]:
            future.result()


def _forget_workers_in_child() -> None:
    GemmWorkers._shared = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_workers_in_child)


def _run_all(part: list) -> None:
    with torch.no_grad():  # grad mode is per thread; autograd is the caller's business
        for task in part:
            task()


def _row_slices(sizes: tuple[int, ...], workers: int) -> list[list[tuple[int, int, int]]]:
    """(start, end, group) slices of the rows, cut into ``workers`` equal shares of rows."""
    total = sum(sizes)
    bounds = [total * w // workers for w in range(workers + 1)]
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    start = 0
    for group, size in enumerate(sizes):
        end = start + size
        for w in range(workers):
            lo, hi = max(start, bounds[w]), min(end, bounds[w + 1])
            if lo < hi:
                shares[w].append((lo, hi, group))
        start = end
    return shares


def _group_shares(sizes: tuple[int, ...], workers: int) -> list[list[tuple[int, int, int]]]:
    """Whole groups as (start, end, group), in contiguous runs of about equal rows per worker."""
    total = max(1, sum(sizes))
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    start = 0
    for group, size in enumerate(sizes):
        middle = start + size / 2
        shares[min(workers - 1, int(middle * workers / total))].append((start, start + size,
                                                                          group))
        start += size
    return shares


def _rows_times_groups(a: Tensor, b: Tensor, sizes: tuple[int, ...],
                       workers: GemmWorkers) -> Tensor:
    """``out[rows of g] = a[rows of g] @ b[g]`` with every worker on its share of the rows."""
    out = a.new_empty(a.shape[0], b.shape[2])
    tasks = [[_mm_task(a[lo:hi], b[g], out[lo:hi]) for lo, hi, g in _in_blocks(share)]
             for share in _row_slices(sizes, workers.count)]
    workers.run(tasks)
    return out


# Row products run on blocks of at most this many rows: on one thread MKL is faster on blocks
# of this size than on one large product (docs/benchmarks.md, "Design choices measured").
ROW_BLOCK = 512


def _in_blocks(share: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The (start, end, group) slices of ``share`` cut into pieces of at most ROW_BLOCK rows."""
    return [(lo, min(hi, lo + ROW_BLOCK), g) for start, hi, g in share
            for lo in range(start, hi, ROW_BLOCK)]


def _weight_gradients(x: Tensor, grad_out: Tensor, sizes: tuple[int, ...],
                      workers: GemmWorkers) -> Tensor:
    """``grad_w[g] = x[rows of g]^T @ grad_out[rows of g]``, each group on one worker."""
    grad_w = x.new_empty(len(sizes), x.shape[1], grad_out.shape[1])
    tasks = [[_mm_task(x[lo:hi].t(), grad_out[lo:hi], grad_w[g]) if hi > lo
              else grad_w[g].zero_ for lo, hi, g in share]
             for share in _group_shares(sizes, workers.count)]
    workers.run(tasks)
    return grad_w


def _mm_task(a: Tensor, b: Tensor, out: Tensor):
    return lambda: torch.mm(a, b, out=out)


class _WorkerGroupedMatmul(torch.autograd.Function):
    """``grouped_matmul`` on CPU worker threads, forward and backward (see use_cpu_workers)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return _rows_times_groups(x, weight, sizes, GemmWorkers.shared())

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        workers = GemmWorkers.shared()
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _rows_times_groups(grad_out, weight.transpose(1, 2), ctx.sizes, workers)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradients(x, grad_out, ctx.sizes, workers)
        return grad_x, grad_w, None


def worker_grouped_matmul(x: Tensor, weight: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """``grouped_matmul`` on the process's worker threads, with its own backward."""
    return _WorkerGroupedMatmul.apply(x, weight, sizes)


# CPU: at most this many rows (real and padding) per real row for the padded bmm path. 1.0:
# only equal groups (strict balancing, k = num_experts), where padding is free and one bmm
# matches a dense product. For random groups the padding (30-50% more rows) costs more than
# the grouped products on worker threads lose; without those workers (one intra-op thread,
# busy shared cores) the padded path wins by far, and such machines may raise it (2.0 covers
# random groups of 32 rows). Figures: docs/benchmarks.md, "Design choices measured".
CPU_PADDED_MAX_WASTE = 1.0
# CPU: groups of at least this many rows (on average) stay on the grouped GEMM.
CPU_PADDED_MAX_MEAN_ROWS = 1024


def use_padded_batches(x: Tensor, tokens_per_expert: Tensor) -> bool:
    """Whether to run the experts as one padded ``bmm`` instead of a grouped GEMM.

    On CPUs PyTorch's grouped GEMM is a loop of per-group matrix products, each its own
    OpenMP region: with many small groups the threads spend their time starting and
    synchronising. A ``bmm`` over groups padded to the largest one does the same products in
    one call, and pays off while the padding stays small and the groups small
    (``CPU_PADDED_MAX_WASTE``); on GPUs the grouped kernel (CUTLASS) has neither cost.
    """
    if x.device.type != "cpu" or x.dtype not in GROUPED_MM_DTYPES or x.shape[0] == 0:
        return False
    num_experts = tokens_per_expert.numel()
    if x.shape[0] >= CPU_PADDED_MAX_MEAN_ROWS * num_experts:
        return False
    capacity = int(tokens_per_expert.max())
    return num_experts * capacity <= CPU_PADDED_MAX_WASTE * x.shape[0]


def padded_row_index(tokens_per_expert: Tensor, capacity: int) -> Tensor:
    """For each expert-sorted row, its row in the ``[num_experts * capacity]`` padded layout."""
    counts = tokens_per_expert.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts
    row_expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device),
                                         counts, output_size=int(counts.sum()))
    rank_in_expert = torch.arange(row_expert.numel(), device=counts.device) - starts[row_expert]
    return row_expert * capacity + rank_in_expert


def padded_experts_forward(x: Tensor, tokens_per_expert: Tensor, weights, biases) -> Tensor:
    """The experts' networks as ``bmm`` over ``[num_experts, capacity, d]`` zero-padded rows.

    Padding rows are dropped at the end, so their outputs get no gradient and add none to the
    weights: the result and every gradient equal the grouped path's.
    """
    num_experts, capacity = tokens_per_expert.numel(), int(tokens_per_expert.max())
    index = padded_row_index(tokens_per_expert, capacity)
    padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, index, x)
    h = padded.view(num_experts, capacity, x.shape[1])
    last = len(weights) - 1
    for i, weight in enumerate(weights):
        h = torch.bmm(h, weight.to(h.dtype))
        if biases is not None:
            h = h + biases[i].to(h.dtype).unsqueeze(1)
        if i < last:
            h = torch.relu_(h)
    return h.reshape(num_experts * capacity, -1).index_select(0, index)
