"""Token dispatchers: move tokens to the experts that own them and bring the results back.

The MoE layer talks only to this interface, so the math never changes whether the experts
live in this process (``LocalDispatcher``) or across an expert-parallel process group
(the distributed dispatcher in ``sparse_moe.parallel``). Modelled on Megatron-Core's split
into router, token dispatcher and experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sparse_moe.moe.router import Routing


@dataclass
class DispatchedTokens:
    """What the experts of this process receive."""

    tokens: Tensor  # [A_local, d] sorted by local expert
    tokens_per_expert: Tensor  # [num_local_experts] int64
    context: Any  # whatever the dispatcher needs to undo the permutation


class TokenDispatcher(Protocol):
    """The layer's view of parallelism.

    ``dispatch`` returns the tokens for this process's experts, sorted by expert;
    ``combine`` takes the experts' outputs in that same order and returns ``[T, d_out]`` in
    the caller's token order, each token the gate-weighted sum of its experts' outputs.
    ``reduce_statistics`` sums per-expert statistics over the data-parallel replicas (so the
    balancing losses see the global batch); it must be differentiable.
    """

    num_local_experts: int
    first_local_expert: int  # global index of this process's first expert

    def dispatch(self, x: Tensor, routing: Routing, num_experts: int) -> DispatchedTokens: ...

    def combine(self, expert_output: Tensor, routing: Routing, context: Any,
                num_tokens: int) -> Tensor: ...

    def reduce_statistics(self, values: Tensor) -> Tensor: ...


@dataclass
class _LocalContext:
    token_of_sorted: Tensor  # [A] token index of each sorted row
    order: Tensor  # [A] position in the routing of each sorted row


class LocalDispatcher:
    """All experts in this process: a sort by expert, a gather, and a weighted scatter back."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.first_local_expert = 0

    def dispatch(self, x: Tensor, routing: Routing, num_experts: int) -> DispatchedTokens:
        order, tokens_per_expert = sort_by_expert(routing.expert_idx, num_experts)
        token_of_sorted = routing.token_idx.index_select(0, order)
        tokens = x.index_select(0, token_of_sorted)
        return DispatchedTokens(tokens, tokens_per_expert, _LocalContext(token_of_sorted, order))

    def combine(self, expert_output: Tensor, routing: Routing, context: _LocalContext,
                num_tokens: int) -> Tensor:
        return weighted_unpermute(expert_output, routing, context.order, context.token_of_sorted,
                                  num_tokens)

    def reduce_statistics(self, values: Tensor) -> Tensor:
        return values


def sort_by_expert(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable permutation that groups assignments by expert, and the count per expert.

    Sorts the unique keys ``expert * A + position`` with the ordinary sort, which gives the
    stable order: PyTorch's parallel stable CPU sort collapses when the other cores are busy
    (``docs/benchmarks.md``, "Design choices measured").
    """
    order = stable_argsort(expert_idx)
    tokens_per_expert = torch.bincount(expert_idx, minlength=num_experts)
    return order, tokens_per_expert


def stable_argsort(keys: Tensor) -> Tensor:
    """``argsort(keys, stable=True)`` for non-negative integer keys, via unique int64 keys."""
    positions = torch.arange(keys.numel(), device=keys.device)
    return torch.sort(keys.long() * keys.numel() + positions).indices


def weighted_unpermute(expert_output: Tensor, routing: Routing, order: Tensor,
                       token_of_sorted: Tensor, num_tokens: int) -> Tensor:
    """Undoes the sort and sums each token's expert outputs weighted by its gates.

    With a fixed number of experts per token the rows are gathered back into routing order
    (the inverse permutation, so no atomics) and each token's ``k`` rows are combined with
    its gates in one batched matmul: one pass over the rows, deterministic on every device.
    Otherwise (strict balancing) the weighted rows are added with ``index_add``.
    """
    d_out = expert_output.shape[-1]
    if routing.per_token is not None:
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        unsorted = permute_rows(expert_output, inverse, order)
        unsorted = unsorted.view(num_tokens, routing.per_token, d_out)
        gates = routing.weight.to(expert_output.dtype).view(num_tokens, routing.per_token)
        return gate_weighted_sum(unsorted, gates)
    weight = routing.weight.index_select(0, order).to(expert_output.dtype)
    out = expert_output.new_zeros(num_tokens, d_out)
    return out.index_add(0, token_of_sorted, expert_output * weight.unsqueeze(-1))


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x.index_select(0, index)`` for a permutation ``index`` whose inverse is ``inverse``.

    Autograd would undo a gather with an ``index_add`` into zeros; a permutation's gradient is
    just the gather by the inverse, which skips the zero fill and the serial accumulation.
    """
    return _PermuteRows.apply(x, index, inverse)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gate_weighted_sum(rows: Tensor, gates: Tensor) -> Tensor:
    """``out[t] = sum_j gates[t, j] * rows[t, j]`` for ``rows [T, k, d]``, ``gates [T, k]``.

    One batched matmul each way. The backward makes the incoming gradient contiguous first:
    a loss such as ``y.sum()`` hands back an expanded (stride-0) gradient, on which CPU
    ``bmm`` falls back to a per-token loop (``docs/benchmarks.md``, "Design choices measured").
    """
    return _GateWeightedSum.apply(rows, gates)


class _GateWeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, gates: Tensor) -> Tensor:
        ctx.save_for_backward(rows, gates)
        return torch.bmm(gates.unsqueeze(1), rows).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, gates = ctx.saved_tensors
        grad = grad.contiguous().unsqueeze(1)  # [T, 1, d]
        grad_rows = grad_gates = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.bmm(gates.unsqueeze(2), grad)
        if ctx.needs_input_grad[1]:
            grad_gates = torch.bmm(grad, rows.transpose(1, 2)).squeeze(1)
        return grad_rows, grad_gates
