"""Skipping optimizer steps whose loss or gradients are not finite.

DeepSpeed already skips such steps when its own optimizer wrapper is in charge: the fp16 loss
scaler (an overflow lowers the scale), the bf16 optimizer and the ZeRO optimizers (a NaN/Inf
gradient norm). They mark the step with ``optimizer.overflow``; the engine then leaves the
parameters, the optimizer state and the learning-rate schedule alone, counts
``engine.skipped_steps`` and still advances ``global_steps`` and the gradient-accumulation
counters. ``engine.was_step_applied()`` reports it.

Plain fp32 without ZeRO hands the client optimizer to the engine unwrapped, and nothing checks.
:class:`NonFiniteGuard` gives that optimizer the same ``overflow`` protocol, so the engine
treats a bad step exactly as it treats an fp16 overflow: one code path, DeepSpeed's. The
guard's check covers the gradients and the loss of every micro-batch of the step, on every rank
(one all-reduce MAX), so all ranks skip together.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from sparse_moe.train.errors import NonFiniteLimitError


class NonFiniteGuard:
    """Installs the ``overflow`` protocol on a client optimizer (a no-op once disabled).

    Install it after the learning-rate scheduler: the scheduler wraps ``optimizer.step`` to
    check the call order, and the guard's wrapper (``functools.wraps``) keeps that wrapper's
    marker, calling it for every step that is taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.enabled = True
        self._loss_nonfinite = False
        self._inner_step = optimizer.step
        optimizer.overflow = False  # type: ignore[attr-defined]

        @functools.wraps(self._inner_step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            return self._step(*args, **kwargs)

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def disable(self) -> None:
        """DeepSpeed wrapped the optimizer in its own (ZeRO, bf16, fp16), which checks already."""
        self.enabled = False
        self.optimizer.step = self._inner_step  # type: ignore[method-assign]
        del self.optimizer.overflow

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remembers a non-finite micro-batch loss of this rank until the step."""
        if self.enabled and not bool(torch.isfinite(loss.detach()).all()):
            self._loss_nonfinite = True

    def _gradients_finite(self) -> bool:
        """One fused L2 norm over every gradient: NaN or Inf anywhere makes it non-finite.

        A per-tensor ``isfinite`` makes a pass per tensor and costs a tenth of a CPU step for
        MoE-32; the fused norm a sixteenth of that (``docs/benchmarks.md``, "Design choices measured").
        Finite gradients whose norm overflows fp32 (above ~1e19) count as non-finite too.
        """
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        bad = self._loss_nonfinite or not self._gradients_finite()
        self._loss_nonfinite = False
        device = next((p.device for g in self.optimizer.param_groups for p in g["params"]),
                      torch.device("cpu"))
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.optimizer.overflow = bool(flag.item())  # type: ignore[attr-defined]
        if self.optimizer.overflow:  # type: ignore[attr-defined]
            return None
        return self._inner_step(*args, **kwargs)


class NonFiniteStreak:
    """Counts steps in a row with a non-finite loss or a skipped update; stops at the limit.

    The loss is averaged over ranks, so a NaN on any rank is a NaN on all: every rank counts
    the same. Under fp16 a skipped update is the loss scaler's overflow, which is routine and
    handled by DeepSpeed, so only a non-finite loss counts there.
    """

    def __init__(self, limit: int, fp16: bool, rank: int) -> None:
        self.limit, self.fp16, self.rank = limit, fp16, rank
        self.count = 0

    def add(self, step: int, loss: float, skipped: bool,
            latest_checkpoint: Callable[[], Path | None]) -> None:
        bad = not math.isfinite(loss) or (skipped and not self.fp16)
        self.count = self.count + 1 if bad else 0
        if bad and self.rank == 0:
            print(f"step {step}: non-finite loss or gradient (loss {loss}); the "
                  f"update was {'skipped' if skipped else 'applied'} "
                  f"({self.count} in a row, limit {self.limit})", file=sys.stderr, flush=True)
        if self.count >= self.limit:
            first = step - self.count + 1
            latest = latest_checkpoint()
            kept = (f"the last checkpoint, {latest}, was saved before them"
                    if latest else "no checkpoint was saved")
            raise NonFiniteLimitError(
                f"steps {first} to {step}: {self.count} steps in a row had a "
                f"non-finite loss or gradient (run.max_nonfinite_steps={self.limit}); each was "
                f"skipped, so the parameters are those after step {first - 1}, and {kept}. Lower "
                "the learning rate or check the data, then resume with run.resume=true")
