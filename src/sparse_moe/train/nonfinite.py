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
from typing import Any

import torch
import torch.distributed as dist


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
