"""The paper's memory-saving Adam (appendix D): no first moment, factored second moment.

For a weight matrix ``W`` (``[..., rows, cols]``; leading dimensions, such as the expert
dimension of stacked expert weights ``[E, d_in, d_out]``, index independent matrices) the
optimizer keeps running averages ``R`` of the row sums and ``C`` of the column sums of the
squared gradient, and estimates the second moment as ``V = R C^T / sum(R)``. When the
squared gradients are rank-1 (``G^2 = a b^T``) that estimate is exact, so on such gradients
the update is Adam's. Memory per matrix is ``rows + cols`` numbers instead of
``2 rows cols`` for Adam. Vectors and scalars keep Adam's ordinary second moment. With
``beta1 = 0`` (the paper's setting) the update uses the current gradient directly.

Note: DeepSpeed's ZeRO stages and its fp16/bf16 optimizer wrappers hand the client
optimizer flat 1-D partitions instead of the parameters' shapes; there every tensor is a
vector and the second moment is unfactored (correct, but without the memory saving).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class FactoredAdam(Optimizer):
    """Adam with ``beta1 = 0`` (default) and a factored second moment for matrices.

    Args:
        lr: learning rate. betas: ``(beta1, beta2)``; ``beta1 > 0`` keeps a full first
        moment (more memory) for experiments. eps: added to the root of the second moment.
        weight_decay: decoupled (AdamW-style) decay, 0 in the paper. factored: False gives
        the unfactored reference (Adam with the same betas).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, factored: bool = True) -> None:
        if lr < 0:
            raise ValueError(f"FactoredAdam: expected lr >= 0, found {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FactoredAdam: expected betas in [0, 1), found {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"FactoredAdam: expected eps, weight_decay >= 0, found "
                             f"{eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        factored=factored)
        super().__init__(params, defaults)

    def initialize_state(self) -> None:
        """Allocates every parameter's state now instead of at its first step.

        A first step that allocates the state lazily places it between that step's large
        temporary buffers (gradients, DeepSpeed's flattened all-reduce bucket); where freed
        host memory is kept for reuse (``run.retain_host_memory``) those long-lived blocks then
        split the freed space, and the next step's buffers extend the heap instead. Allocated
        first, the state sits below them (``docs/benchmarks.md``, "Memory plan against measured runs").
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)

    @staticmethod
    def is_factored(param: Tensor, group: dict[str, Any]) -> bool:
        return bool(group["factored"]) and param.dim() >= 2

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FactoredAdam does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One step for ``p``, in as few passes over its elements as the math allows.

        The step is memory-bound (an MoE layer's experts are most of the model's weights), so
        the factored root is one broadcast ``addcmul`` (``sqrt(V) = sqrt(R / sum R) sqrt(C)``)
        and the update one ``addcdiv_``, instead of a pass per operation.
        """
        beta1, beta2 = group["betas"]
        grad = p.grad.to(state_dtype(p))
        state = self.state[p]
        if not state:
            self._init_state(p, state, group)
        state["step"] += 1
        t = state["step"]
        second_correction = 1 - beta2 ** t
        step_size = group["lr"]
        if beta1 > 0:
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            direction = state["exp_avg"]
            step_size /= 1 - beta1 ** t
        else:
            direction = grad
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if p.numel() == 0:
            return
        if self.is_factored(p, group):
            for chunk in _matrix_chunks(p, grad, direction, state["row"], state["col"]):
                _factored_step(*chunk, beta2, second_correction, group["eps"], step_size)
        else:
            for chunk in _flat_chunks(p, grad, direction, state["exp_avg_sq"]):
                _unfactored_step(*chunk, beta2, second_correction, group["eps"], step_size)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        dtype = state_dtype(p)
        if self.is_factored(p, group):
            state["row"] = torch.zeros(p.shape[:-1], dtype=dtype, device=p.device)
            state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dtype,
                                       device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)


def state_dtype(param: Tensor) -> torch.dtype:
    """fp32 state for fp32 and half-precision parameters; fp64 for an fp64 parameter.

    Half-precision moments lose the small squared gradients that the root divides by, so they
    are kept in fp32. An fp64 parameter (a numerical reference, a gradient check) keeps fp64
    state: rounding its update through fp32 would make it no better than an fp32 one, and
    comparisons against an fp64 reference would then need fp32 tolerances.
    """
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """``row col^T / sum(row)`` per matrix: exact when the averaged squares are rank-1."""
    total = row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return (row / total).unsqueeze(-1) * col.unsqueeze(-2)


def factored_root(row: Tensor, col: Tensor, correction: float, eps: float) -> Tensor:
    """``sqrt(factored_second_moment(row, col) / correction) + eps``, written in one pass."""
    total = row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    row_root = (row / (total * correction)).sqrt_()
    return torch.addcmul(row.new_tensor(eps), row_root.unsqueeze(-1), col.sqrt().unsqueeze(-2))


# Matrices are updated in chunks of about this many elements (whole matrices), so that a
# chunk's squared gradient and root stay in cache between the operations that use them:
# stacked experts then cost about 3 memory passes per element instead of 10
# (docs/benchmarks.md, "Optimizer step").
FACTORED_CHUNK_ELEMENTS = 1 << 20


def _matrix_chunks(p: Tensor, grad: Tensor, direction: Tensor, row: Tensor, col: Tensor):
    """(param, grad, direction, row, col) over runs of whole matrices of a stacked tensor."""
    rows, cols = p.shape[-2], p.shape[-1]
    if not all(t.is_contiguous() for t in (p, grad, direction)):
        yield p, grad, direction, row, col
        return
    count = p.numel() // (rows * cols)
    views = [t.view(count, rows, cols) for t in (p, grad, direction)]
    row, col = row.view(count, rows), col.view(count, cols)
    per_chunk = max(1, FACTORED_CHUNK_ELEMENTS // (rows * cols))
    for start in range(0, count, per_chunk):
        part = slice(start, start + per_chunk)
        yield views[0][part], views[1][part], views[2][part], row[part], col[part]


def _flat_chunks(p: Tensor, grad: Tensor, direction: Tensor, exp_avg_sq: Tensor):
    """(param, grad, direction, second moment) over runs of about FACTORED_CHUNK_ELEMENTS.

    The root is a temporary as large as what it is computed for: chunked, a flat partition
    that DeepSpeed's ZeRO or mixed-precision wrappers hand the optimizer (hundreds of millions
    of elements) never needs a second full-size buffer, and each chunk stays in cache.
    """
    tensors = (p, grad, direction, exp_avg_sq)
    if not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, p.numel(), FACTORED_CHUNK_ELEMENTS):
        yield tuple(t[start:start + FACTORED_CHUNK_ELEMENTS] for t in flat)


def _unfactored_step(p: Tensor, grad: Tensor, direction: Tensor, exp_avg_sq: Tensor,
                     beta2: float, correction: float, eps: float, step_size: float) -> None:
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / correction).sqrt_().add_(eps)
    _apply_update(p, direction, denom, step_size)


def _factored_step(p: Tensor, grad: Tensor, direction: Tensor, row: Tensor, col: Tensor,
                   beta2: float, correction: float, eps: float, step_size: float) -> None:
    grad_sq = grad * grad
    row.mul_(beta2).add_(grad_sq.sum(dim=-1), alpha=1 - beta2)
    col.mul_(beta2).add_(grad_sq.sum(dim=-2), alpha=1 - beta2)
    _apply_update(p, direction, factored_root(row, col, correction, eps), step_size)


def _apply_update(p: Tensor, direction: Tensor, denom: Tensor, step_size: float) -> None:
    if p.dtype == direction.dtype:
        p.addcdiv_(direction, denom, value=-step_size)
    else:  # a half-precision parameter: the update is computed in fp32
        p.add_((direction / denom).to(p.dtype), alpha=-step_size)


def optimizer_state_numel(optimizer: Optimizer) -> int:
    """Numbers held in the optimizer's state tensors (for memory accounting)."""
    return sum(v.numel() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))
