"""The paper's memory-saving Adam (appendix D): no first moment, factored second moment.

For a weight matrix ``W`` (``[..., rows, cols]``; leading dimensions, such as the expert
dimension of stacked expert weights ``[E, d_in, d_out]``, index independent matrices) the
optimizer keeps running averages ``R`` of the row sums and ``C`` of the column sums of the
squared gradient, and estimates the second moment as ``V = R C^T / sum(R)``. When the
squared gradients are rank-1 (``G^2 = a b^T``) that estimate is exact, so on such gradients
the update is Adam's. Memory per matrix is ``rows + cols`` numbers instead of
``2 rows cols`` for Adam. Vectors and scalars keep Adam's ordinary second moment. With
``beta1 = 0`` (the paper's setting) the update uses the current gradient directly.

DeepSpeed's ZeRO-1/2 (and its bf16 optimizer) hand the client optimizer flat 1-D partitions
instead of the parameters' shapes. Given their layouts (``attach_partitions``, which the
parallel layer calls with what DeepSpeed records of each fragment) the moments stay factored
there too (``optim/partitions.py``); a flat partition without a layout keeps a full second
moment (correct, without the memory saving).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from sparse_moe.optim.partitions import (
    FACTORED_KEY,
    PartitionLayout,
    apply_factored,
    full_moments,
    init_partition_state,
    load_full_moments,
    state_on,
    summed_squares,
    update_averages,
    vector_fragments,
)


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
        self.partition_layouts: dict[Tensor, PartitionLayout] = {}

    def attach_partitions(self, layouts: dict[Tensor, PartitionLayout]) -> None:
        """Declares what each flat partition holds, so its matrices keep factored moments.

        Called before the partitions have state (a state of the flat form would be lost);
        their state is then created in the factored form of ``optim/partitions.py``.
        """
        own = {p for g in self.param_groups for p in g["params"]}
        for flat in layouts:
            if flat not in own:
                raise ValueError("FactoredAdam.attach_partitions: a layout for a tensor that is "
                                 "not one of this optimizer's parameters")
            if self.state.get(flat) and FACTORED_KEY not in self.state[flat]:
                raise ValueError("FactoredAdam.attach_partitions: the partition already has an "
                                 "unfactored state; attach layouts before the first step")
        self.partition_layouts.update(layouts)

    def load_full_moments(self, name: str, full: dict[str, Tensor]) -> None:
        """Sets a parameter's moments in every attached partition that holds them, from their
        whole-parameter form (re-splitting a checkpoint onto another layout)."""
        self.initialize_state()
        for flat, layout in self.partition_layouts.items():
            if name in layout.matrices or any(f.name == name for f in layout.fragments):
                moments = self.state[flat][FACTORED_KEY]
                load_full_moments(layout, moments, name,
                                  {k: v.to(flat.device, state_dtype(flat)) for k, v in full.items()})

    def full_moments(self, name: str) -> dict[str, Tensor] | None:
        """A parameter's moments in their whole-parameter form, from the attached partitions
        (a collective for vectors: every rank of its group asks); None if none holds it."""
        for flat, layout in self.partition_layouts.items():
            if name in layout.matrices or name in layout.vectors:
                self.initialize_state()
                moments = self.state[flat][FACTORED_KEY] = state_on(
                    self.state[flat][FACTORED_KEY], flat.device)
                return full_moments(layout, moments, name, flat.new_empty(0, dtype=state_dtype(flat)))
        return None

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
        layout = self.partition_layouts.get(p)
        if layout is not None:
            self._update_partition(p, grad, direction, state, layout, group, second_correction,
                                   step_size)
        elif self.is_factored(p, group):
            step = (_factored_step_by_rows if _is_large_matrix(p, grad, direction)
                    else _factored_step)
            for chunk in _matrix_chunks(p, grad, direction, state["row"], state["col"]):
                step(*chunk, beta2, second_correction, group["eps"], step_size)
        else:
            for chunk in _flat_chunks(p, grad, direction, state["exp_avg_sq"]):
                _unfactored_step(*chunk, beta2, second_correction, group["eps"], step_size)

    def _update_partition(self, p: Tensor, grad: Tensor, direction: Tensor, state: dict[str, Any],
                          layout: PartitionLayout, group: dict[str, Any], correction: float,
                          step_size: float) -> None:
        """One step of a flat partition: factored matrices (the ranks sum their squares), and
        Adam's moment for the vectors' elements held here."""
        beta2, eps = group["betas"][1], group["eps"]
        moments = state[FACTORED_KEY] = state_on(state[FACTORED_KEY], p.device)
        if "exp_avg_sq" in state:  # a checkpoint of the unfactored form: its sums, exactly
            self._factor_flat_moment(state, layout)
        sums = summed_squares(layout, grad, FACTORED_CHUNK_ELEMENTS)
        update_averages(layout, moments, sums, beta2)
        apply_factored(layout, moments, p, direction, correction, eps, step_size,
                       FACTORED_CHUNK_ELEMENTS, _apply_update)
        for fragment in vector_fragments(layout):
            w = fragment.window
            for chunk in _flat_chunks(p[w], grad[w], direction[w],
                                      moments["exp_avg_sq"][fragment.name]):
                _unfactored_step(*chunk, beta2, correction, eps, step_size)

    @staticmethod
    def _factor_flat_moment(state: dict[str, Any], layout: PartitionLayout) -> None:
        """Row and column sums of a full second moment are the factored averages (both are
        running averages of the squares' sums), so an unfactored state converts exactly."""
        flat = state.pop("exp_avg_sq")
        moments = state[FACTORED_KEY]
        sums = summed_squares(layout, flat, FACTORED_CHUNK_ELEMENTS, squared=True)
        update_averages(layout, moments, sums, beta2=0.0)
        for fragment in vector_fragments(layout):
            moments["exp_avg_sq"][fragment.name].copy_(flat[fragment.window])

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        dtype = state_dtype(p)
        layout = self.partition_layouts.get(p)
        if layout is not None:
            state[FACTORED_KEY] = init_partition_state(layout, p.device, dtype)
        elif self.is_factored(p, group):
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


def _is_large_matrix(p: Tensor, grad: Tensor, direction: Tensor) -> bool:
    """A single matrix larger than a chunk (an embedding or softmax over a word vocabulary)."""
    return (p.shape[-2] * p.shape[-1] > FACTORED_CHUNK_ELEMENTS
            and all(t.is_contiguous() for t in (p, grad, direction)))


def _factored_step_by_rows(p: Tensor, grad: Tensor, direction: Tensor, row: Tensor, col: Tensor,
                           beta2: float, correction: float, eps: float, step_size: float) -> None:
    """``_factored_step`` over blocks of rows of each matrix, in two passes.

    A 793,471 x 512 softmax matrix's squared gradient and root would each be a temporary as
    large as the matrix (1.6 GB in fp32); by blocks of rows they stay a chunk's size. The first
    pass sums the squares (columns accumulate over the blocks), the second applies the update
    once the new column averages are known.
    """
    block = max(1, FACTORED_CHUNK_ELEMENTS // p.shape[-1])
    for m in range(p.shape[0]):
        row_sums, col_sums = torch.empty_like(row[m]), torch.zeros_like(col[m])
        for start in range(0, p.shape[1], block):
            grad_sq = grad[m, start:start + block].square()
            row_sums[start:start + block] = grad_sq.sum(dim=-1)
            col_sums += grad_sq.sum(dim=-2)
        row[m].mul_(beta2).add_(row_sums, alpha=1 - beta2)
        col[m].mul_(beta2).add_(col_sums, alpha=1 - beta2)
        total = row[m].sum().clamp_min(torch.finfo(row.dtype).tiny)
        col_root = col[m].sqrt()
        for start in range(0, p.shape[1], block):
            row_root = (row[m, start:start + block] / (total * correction)).sqrt_()
            denom = torch.addcmul(row.new_tensor(eps), row_root.unsqueeze(-1),
                                  col_root.unsqueeze(-2))
            _apply_update(p[m, start:start + block], direction[m, start:start + block], denom,
                          step_size)


def _apply_update(p: Tensor, direction: Tensor, denom: Tensor, step_size: float) -> None:
    if p.dtype == direction.dtype:
        p.addcdiv_(direction, denom, value=-step_size)
    else:  # a half-precision parameter: the update is computed in fp32
        p.add_((direction / denom).to(p.dtype), alpha=-step_size)


def optimizer_state_numel(optimizer: Optimizer) -> int:
    """Numbers held in the optimizer's state tensors (for memory accounting), the nested
    state of flat partitions included."""
    return sum(_numel(v) for s in optimizer.state.values() for v in s.values())


def _numel(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(_numel(v) for v in value.values())
    return 0
