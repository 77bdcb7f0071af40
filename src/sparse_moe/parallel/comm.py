"""Differentiable all-to-all with uneven splits, optionally timed.

The backward of an all-to-all is the all-to-all with the splits swapped: gradients of
the tokens a rank received go back to the rank that sent them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass
class CommTimer:
    """Accumulates wall time spent in collectives while ``enabled``."""

    enabled: bool = False
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def run(self, fn, device: torch.device) -> None:
        if not self.enabled:
            fn()
            return
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int],
                    group: ProcessGroup, timer: CommTimer) -> Tensor:
    """Sends ``input_splits[r]`` consecutive rows of ``x`` to rank r; returns what arrives."""
    return _AllToAllRows.apply(x, output_splits, input_splits, group, timer)


def _exchange(x: Tensor, output_splits: list[int], input_splits: list[int],
              group: ProcessGroup, timer: CommTimer) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    timer.run(lambda: dist.all_to_all_single(out, x, output_splits, input_splits, group=group),
              x.device)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, timer):  # type: ignore[override]
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.timer = group, timer
        return _exchange(x, output_splits, input_splits, group, timer)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        return (_exchange(grad, input_splits, output_splits, ctx.group, ctx.timer),
                None, None, None, None)


def exchange_counts(counts: Tensor, group: ProcessGroup, timer: CommTimer) -> Tensor:
    """All-to-all of an equal-split integer vector (``counts.numel()`` divisible by group size)."""
    out = torch.empty_like(counts)
    timer.run(lambda: dist.all_to_all_single(out, counts.contiguous(), group=group),
              counts.device)
    return out


def all_reduce_sum(x: Tensor, group: ProcessGroup, timer: CommTimer) -> Tensor:
    """Differentiable sum over ``group``: the gradient of every replica's sum is the sum
    of the replicas' gradients, so each rank's input receives the gradient of all ranks' losses.
    """
    return _AllReduceSum.apply(x, group, timer)


def _all_reduce(x: Tensor, group: ProcessGroup, timer: CommTimer) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    timer.run(lambda: dist.all_reduce(out, group=group), out.device)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timer):  # type: ignore[override]
        ctx.group, ctx.timer = group, timer
        return _all_reduce(x, group, timer)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_reduce(grad, ctx.group, ctx.timer), None, None
