"""Experts: feed-forward networks with stacked weights, run as grouped matrix products.

Weights are stacked over experts (``[num_experts, d_in, d_out]``) so that one grouped GEMM
runs every expert on its contiguous slice of the expert-sorted tokens, whatever the number
of experts, and so that the stack shards cleanly across expert-parallel ranks.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``out[rows of group g] = x[rows of group g] @ weight[g]``.

    ``x`` is ``[A, d_in]`` sorted by group, ``weight`` is ``[G, d_in, d_out]`` and
    ``offsets`` the int32 cumulative row counts (``offsets[g]`` ends group g). PyTorch's
    grouped GEMM (CUTLASS on Hopper, a C++ loop over groups elsewhere) does the work, with
    its own autograd; empty groups are allowed and get zero gradient.

    The kernels need rows aligned to 16 bytes; odd sizes (3 experts per group, bf16 with
    d=12) are zero-padded to alignment and the result sliced back, which is exact.
    """
    if x.dtype not in _GROUPED_MM_DTYPES:
        return _grouped_matmul_by_group(x, weight, offsets)
    if use_cpu_workers(x, weight.shape[0]):
        sizes = tuple(torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist())
        return _WorkerGroupedMatmul.apply(x, weight, sizes)
    d_in, d_out = weight.shape[1], weight.shape[2]
    multiple = max(1, 16 // x.element_size())
    pad_in, pad_out = -d_in % multiple, -d_out % multiple
    if pad_in or pad_out:
        x = F.pad(x, (0, pad_in))
        weight = F.pad(weight, (0, pad_out, 0, pad_in))
    out = F.grouped_mm(x, weight, offs=offsets)
    return out[:, :d_out] if pad_out else out


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_matmul_by_group(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """One matmul per group, for dtypes the grouped kernel lacks (float64 gradient checks)."""
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    parts = [rows @ w for rows, w in zip(x.split(sizes), weight)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[2])


def use_cpu_workers(x: Tensor, num_groups: int) -> bool:
    """Whether a CPU grouped product runs on :class:`GemmWorkers` instead of ``grouped_mm``.

    PyTorch's CPU ``grouped_mm`` loops over the groups, each product its own OpenMP region
    over all cores. Giving each core its own share of the groups, one thread per product,
    does the same products without a barrier per group: measured on 2 cores with freed memory
    kept (``sparse_moe.train.host_memory``), forward and backward of 256 groups of 128 rows
    (512 -> 1024) take 602 ms against 655 ms in ``grouped_mm`` and 576 ms for one dense
    product of the same size; 64 groups of 512 rows 540 ms against 552 ms. Needs a group per
    worker at least (each weight gradient is one worker's product).
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


# Row products run on blocks of at most this many rows: MKL is faster on them than on one
# large product. One thread, 512 -> 1024: 99.5 GFLOP/s on blocks of 512 rows against 92.3 on
# one block of 8192; 4 experts' forward and backward (groups of 8192 rows) take 1076-1098 ms
# against 1126-1136 ms unblocked.
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


def draw_seed() -> int:
    """A 63-bit seed from the global (CPU) RNG: one draw, however large the layer."""
    return int(torch.randint(0, 2**63 - 1, (), device="cpu"))


def expert_seed(init_seed: int, expert: int) -> int:
    """The seed of global expert ``expert`` of a layer seeded ``init_seed`` (well mixed)."""
    words = np.random.SeedSequence([init_seed, expert]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def group_offsets(tokens_per_group: Tensor) -> Tensor:
    return torch.cumsum(tokens_per_group, dim=0, dtype=torch.int32)


# CPU: at most this many rows (real and padding) per real row for the padded bmm path. 1.0:
# only equal groups (strict balancing, k = num_experts), where padding is free and one bmm
# matches a dense product. For random groups the padding (30-50% more rows) costs more than
# the grouped products on worker threads lose (docs/benchmarks.md); before those workers, on
# busy cores the padded path won by far (7.2 s against 0.54 s), so shared machines without
# them (one intra-op thread) may raise it (2.0 covers random groups of 32 rows).
CPU_PADDED_MAX_WASTE = 1.0
# CPU: groups of at least this many rows (on average) stay on the grouped GEMM.
CPU_PADDED_MAX_MEAN_ROWS = 1024


def use_padded_batches(x: Tensor, tokens_per_expert: Tensor) -> bool:
    """Whether to run the experts as one padded ``bmm`` instead of a grouped GEMM.

    On CPUs PyTorch's grouped GEMM is a loop of per-group matrix products, each its own
    OpenMP region: with many small groups the threads spend their time starting and
    synchronising (measured on 2 cores: 256 groups of 128 rows, 7.2 s grouped against 0.54 s
    as one ``bmm``). A ``bmm`` over groups padded to the largest one does the same products
    in one call, and pays off while the padding stays small and the groups small
    (``CPU_PADDED_MAX_WASTE``); on GPUs the grouped kernel (CUTLASS) has neither cost.
    """
    if x.device.type != "cpu" or x.dtype not in _GROUPED_MM_DTYPES or x.shape[0] == 0:
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


class GroupedFFNExperts(nn.Module):
    """``num_experts`` independent ReLU networks ``d_in -> d_hidden (x layers) -> d_out``.

    The paper's experts have one hidden layer (``hidden_layers=1``); MoE-1-Deep uses four.
    Each expert is initialised like its own ``nn.Linear`` layers. Biases are off by default,
    as in the original implementation's experts (tensor2tensor's ``ffn_expert_fn``): the
    grouped GEMM cannot differentiate a per-group bias, so a bias costs a gather of
    ``[tokens, d_hidden]`` and a scatter-add in backward.

    The module may hold a block of a larger set: its experts are global experts
    ``first_expert .. first_expert + num_experts - 1``. Expert ``e`` is drawn from its own
    generator, seeded from ``(init_seed, e)``, so an expert's initial weights do not depend on
    which process holds it or how many others it holds (an expert-parallel build equals a
    single-process one, bit for bit). ``init_seed=None`` draws the layer's seed from the
    global RNG (one number, whatever ``num_experts``).
    """

    def __init__(self, num_experts: int, d_in: int, d_hidden: int, d_out: int,
                 hidden_layers: int = 1, bias: bool = False, first_expert: int = 0,
                 init_seed: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = first_expert
        dims = [d_in] + [d_hidden] * hidden_layers + [d_out]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_in, fan_out))
            for fan_in, fan_out in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_out)) for fan_out in dims[1:]
        ) if bias else None
        self.init_seed = init_seed if init_seed is not None else draw_seed()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert from its own generator (on the CPU, then copied: the same values on
        every device); nothing to do on the meta device."""
        if self.weights[0].device.type == "meta":
            return
        with torch.no_grad():
            for local in range(self.num_experts):
                generator = torch.Generator().manual_seed(
                    expert_seed(self.init_seed, self.first_expert + local))
                for i, weight in enumerate(self.weights):
                    bound = 1.0 / math.sqrt(weight.shape[1])
                    weight[local].copy_(_uniform(weight.shape[1:], bound, generator))
                    if self.biases is not None:
                        self.biases[i][local].copy_(
                            _uniform(self.biases[i].shape[1:], bound, generator))

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Runs expert e on its rows of ``x`` (``[A, d_in]``, sorted by expert).

        ``tokens_per_expert`` (``[num_experts]``) gives the length of each expert's slice.
        Parameters are cast to the input dtype, so a bf16 activation runs a bf16 GEMM.
        """
        if use_padded_batches(x, tokens_per_expert):
            return self._forward_padded(x, tokens_per_expert.to(x.device))
        offsets = group_offsets(tokens_per_expert.to(x.device))
        row_expert = None
        if self.biases is not None:
            row_expert = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x.device), tokens_per_expert.to(x.device),
                output_size=x.shape[0])
        h = x
        last = len(self.weights) - 1
        for i, weight in enumerate(self.weights):
            h = grouped_matmul(h, weight.to(h.dtype), offsets)
            if row_expert is not None:
                h = h + self.biases[i].to(h.dtype).index_select(0, row_expert)
            if i < last:
                h = torch.relu_(h)  # h is a fresh GEMM output: no extra [A, d_hidden] buffer
        return h

    def _forward_padded(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """The same networks as ``bmm`` over ``[num_experts, capacity, d]`` zero-padded rows.

        Padding rows are dropped at the end, so their outputs get no gradient and add none
        to the weights: the result and every gradient equal the grouped path's.
        """
        num_experts, capacity = self.num_experts, int(tokens_per_expert.max())
        index = padded_row_index(tokens_per_expert, capacity)
        padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, index, x)
        h = padded.view(num_experts, capacity, x.shape[1])
        last = len(self.weights) - 1
        for i, weight in enumerate(self.weights):
            h = torch.bmm(h, weight.to(h.dtype))
            if self.biases is not None:
                h = h + self.biases[i].to(h.dtype).unsqueeze(1)
            if i < last:
                h = torch.relu_(h)
        return h.reshape(num_experts * capacity, -1).index_select(0, index)
