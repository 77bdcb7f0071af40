"""The factored second moment over DeepSpeed's flat partitions.

Under ZeRO-1/2, and with bf16 and fp32 gradient accumulation, DeepSpeed flattens each
parameter group, splits it over the ranks of its data-parallel group (the expert-data-parallel
group for experts) and hands the client optimizer one flat fp32 partition per group. A
partition holds fragments of parameters: runs of a parameter's elements in row-major order,
which may start and end inside a row, and a matrix may be split over several ranks. The
factored moment of a matrix needs its whole row and column sums of the squared gradient, so
each rank sums the squares of its fragments into one buffer laid out over every matrix of
the group, the ranks sum that buffer (``all_reduce``), and every rank then keeps the same
row and column averages ``R`` and ``C`` (``rows + cols`` numbers per matrix, replicated) and
updates its own elements with ``sqrt(R C^T / sum R)``, as ``FactoredAdam`` does for a whole
matrix. Vectors keep Adam's second moment, for this rank's elements only.

The state of a partition is ``{"step", "factored": {"row": {name: R}, "col": {name: C},
"exp_avg_sq": {name: fragment's moment}}}``, keyed by parameter name and with ``R`` and ``C``
in the shapes ``FactoredAdam`` gives a whole parameter, so that a checkpoint can be
re-split onto another layout (``train/checkpoint/relayout.py``). The nested mapping also keeps these
vectors out of DeepSpeed's per-partition padding, which it applies to tensors of the state.

This module never calls ``torch.distributed``: the layout carries the sum over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

FACTORED_KEY = "factored"


@dataclass(frozen=True)
class Fragment:
    """The run of parameter ``name``'s flattened elements that lies in this partition."""

    name: str
    shape: tuple[int, ...]
    param_start: int  # its first element's index in the flattened parameter
    part_start: int  # where that element lies in the partition
    numel: int

    @property
    def window(self) -> slice:
        return slice(self.part_start, self.part_start + self.numel)


@dataclass
class PartitionLayout:
    """One flat partition: its fragments, every matrix of its group (on any rank) and the sum
    over the ranks sharing the group (None when the group is one rank)."""

    fragments: list[Fragment]
    matrices: dict[str, tuple[int, ...]]  # name -> shape, every factored parameter of the group
    all_reduce: Callable[[Tensor], None] | None = None
    vectors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the group's others

    def buffer_offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (row offset, column offset) in the buffer of row and column sums."""
        offsets, at = {}, 0
        for name, shape in self.matrices.items():
            rows, cols = _row_count(shape), _col_count(shape)
            offsets[name] = (at, at + rows)
            at += rows + cols
        return offsets

    def buffer_size(self) -> int:
        return sum(_row_count(s) + _col_count(s) for s in self.matrices.values())


@dataclass(frozen=True)
class Piece:
    """Rows of one matrix within a fragment: one partial row, or whole rows."""

    offset: int  # in the fragment
    row: int  # first row, in the parameter's rows (all leading dimensions flattened)
    col: int  # first column
    rows: int
    width: int


def pieces(fragment: Fragment, max_elements: int) -> Iterator[Piece]:
    """The fragment as partial rows and blocks of whole rows of one matrix each (at most about
    ``max_elements``), so that every piece is a ``[rows, width]`` view."""
    rows_per_matrix, cols = fragment.shape[-2], fragment.shape[-1]
    max_rows = max(1, max_elements // cols)
    k, end = fragment.param_start, fragment.param_start + fragment.numel
    while k < end:
        row, col = divmod(k, cols)
        if col or end - k < cols:
            width = min(cols - col, end - k)
            yield Piece(k - fragment.param_start, row, col, 1, width)
            k += width
            continue
        left_in_matrix = rows_per_matrix - row % rows_per_matrix
        count = min((end - k) // cols, left_in_matrix, max_rows)
        yield Piece(k - fragment.param_start, row, 0, count, cols)
        k += count * cols


def init_partition_state(layout: PartitionLayout, device: torch.device,
                         dtype: torch.dtype) -> dict[str, Any]:
    zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    return {"row": {name: zeros(*shape[:-1]) for name, shape in layout.matrices.items()},
            "col": {name: zeros(*(shape[:-2] + shape[-1:])) for name, shape in layout.matrices.items()},
            "exp_avg_sq": {f.name: zeros(f.numel) for f in layout.fragments
                           if f.name not in layout.matrices}}


def state_on(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The nested state on ``device`` (a checkpoint is loaded on the CPU)."""
    return {key: {name: t.to(device) for name, t in part.items()} for key, part in state.items()}


def summed_squares(layout: PartitionLayout, values: Tensor, max_elements: int,
                   squared: bool = False) -> Tensor:
    """Row and column sums of ``values**2`` (of ``values`` when ``squared``) over every matrix
    of the group, summed over the ranks: this rank's fragments add theirs, the others theirs."""
    offsets = layout.buffer_offsets()
    buffer = values.new_zeros(layout.buffer_size())
    for fragment in layout.fragments:
        if fragment.name not in layout.matrices:
            continue
        row_at, col_at = offsets[fragment.name]
        cols, rows_per_matrix = fragment.shape[-1], fragment.shape[-2]
        flat = values[fragment.window]
        for piece in pieces(fragment, max_elements):
            square = flat[piece.offset:piece.offset + piece.rows * piece.width].view(
                piece.rows, piece.width)
            square = square if squared else square.square()
            buffer[row_at + piece.row:row_at + piece.row + piece.rows] += square.sum(dim=1)
            col = col_at + (piece.row // rows_per_matrix) * cols + piece.col
            buffer[col:col + piece.width] += square.sum(dim=0)
    if layout.all_reduce is not None:
        layout.all_reduce(buffer)
    return buffer


def update_averages(layout: PartitionLayout, state: dict[str, Any], sums: Tensor,
                    beta2: float) -> None:
    for name, (row_at, col_at) in layout.buffer_offsets().items():
        row, col = state["row"][name], state["col"][name]
        row.view(-1).mul_(beta2).add_(sums[row_at:row_at + row.numel()], alpha=1 - beta2)
        col.view(-1).mul_(beta2).add_(sums[col_at:col_at + col.numel()], alpha=1 - beta2)


def apply_factored(layout: PartitionLayout, state: dict[str, Any], p: Tensor,
                   direction: Tensor, correction: float, eps: float, step_size: float,
                   max_elements: int, apply_update: Callable[..., None]) -> None:
    """Updates this rank's matrix elements with the factored root of the new averages."""
    for fragment in layout.fragments:
        if fragment.name not in layout.matrices:
            continue
        rows_per_matrix, cols = fragment.shape[-2], fragment.shape[-1]
        row_state = state["row"][fragment.name].view(-1)
        totals = row_state.view(-1, rows_per_matrix).sum(dim=1).clamp_min(
            torch.finfo(row_state.dtype).tiny)
        col_root = state["col"][fragment.name].view(-1).sqrt()
        param, step = p[fragment.window], direction[fragment.window]
        for piece in pieces(fragment, max_elements):
            matrix = piece.row // rows_per_matrix
            row_root = (row_state[piece.row:piece.row + piece.rows]
                        / (totals[matrix] * correction)).sqrt_()
            col = matrix * cols + piece.col
            denom = torch.addcmul(row_state.new_tensor(eps), row_root.unsqueeze(1),
                                  col_root[col:col + piece.width].unsqueeze(0))
            window = slice(piece.offset, piece.offset + piece.rows * piece.width)
            apply_update(param[window].view(piece.rows, piece.width),
                         step[window].view(piece.rows, piece.width), denom, step_size)


def load_full_moments(layout: PartitionLayout, state: dict[str, Any], name: str,
                      full: dict[str, Tensor]) -> None:
    """Sets parameter ``name``'s moments from its whole-parameter form (``FactoredAdam``'s
    ``row`` and ``col``, or a full ``exp_avg_sq``, whose row and column sums are exactly the
    factored averages); the fragment of a vector's moment that lies in this partition."""
    if name in layout.matrices:
        if "row" in full:
            row, col = full["row"], full["col"]
        else:
            row, col = full["exp_avg_sq"].sum(dim=-1), full["exp_avg_sq"].sum(dim=-2)
        state["row"][name].copy_(row.view(state["row"][name].shape))
        state["col"][name].copy_(col.view(state["col"][name].shape))
        return
    for fragment in layout.fragments:
        if fragment.name == name:
            flat = full["exp_avg_sq"].reshape(-1)
            state["exp_avg_sq"][name].copy_(
                flat[fragment.param_start:fragment.param_start + fragment.numel])


def full_moments(layout: PartitionLayout, state: dict[str, Any], name: str,
                 like: Tensor) -> dict[str, Tensor]:
    """Parameter ``name``'s moments in their whole-parameter form (on ``like``'s device, in
    its dtype). A vector's moment is assembled from every rank's fragment through the group's
    sum (each adds its fragment to zeros, so the result is exact): every rank of the group
    must ask for it."""
    if name in layout.matrices:
        return {"row": state["row"][name].clone(), "col": state["col"][name].clone()}
    whole = like.new_zeros(math.prod(layout.vectors[name]))
    for fragment in layout.fragments:
        if fragment.name == name:
            whole[fragment.param_start:fragment.param_start + fragment.numel] = \
                state["exp_avg_sq"][name]
    if layout.all_reduce is not None:
        layout.all_reduce(whole)
    return {"exp_avg_sq": whole.view(layout.vectors[name])}


def vector_fragments(layout: PartitionLayout) -> Iterator[Fragment]:
    return (f for f in layout.fragments if f.name not in layout.matrices)


def _row_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def _col_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-2]) * shape[-1]
