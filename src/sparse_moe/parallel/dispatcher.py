"""The expert-parallel token dispatcher: tokens travel to the rank that owns their expert.

Rank r of an expert-parallel group of size ``ep`` owns global experts
``[r * E/ep, (r + 1) * E/ep)``. One ``dispatch``/``combine`` round trip is:

1. sort this rank's (token, expert) assignments by global expert; since experts are
   owned in contiguous blocks, this also groups them by destination rank;
2. exchange the per-expert counts (a small all-to-all), so every rank knows how many
   rows it will receive from each source for each of its experts;
3. send the token rows with ``all_to_all_single`` and uneven splits (dropless: nothing is
   padded to a capacity or dropped unless a capacity factor is configured);
4. reorder the received rows from (source, expert) to (expert, source) for the grouped GEMM;
5. after the experts ran, undo 4, send the rows back with the splits swapped, and let the
   shared ``weighted_unpermute`` weight them by the gates and sum them per token.

Both all-to-alls are differentiable. Balancing statistics are summed over the
data-parallel group: every rank of it holds a different part of the global batch, so
``CV^2`` is computed on the global importance and load, whatever the layout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_moe.moe.dispatcher import DispatchedTokens, sort_by_expert, weighted_unpermute
from sparse_moe.moe.router import Routing
from sparse_moe.parallel.comm import CommTimer, all_reduce_sum, all_to_all_rows, exchange_counts
from sparse_moe.parallel.groups import ExpertParallelGroups
from sparse_moe.parallel.layout import check_experts

logger = logging.getLogger(__name__)


@dataclass
class DispatchCounters:
    """What this rank routed in the last forward pass (local, not yet reduced)."""

    kept_per_expert: Tensor | None = None  # [num_experts] assignments sent to each expert
    dropped: int = 0  # assignments over capacity
    assignments: int = 0  # all assignments the gate made on this rank
    received: int = 0  # rows this rank's experts received
    timer: CommTimer = field(default_factory=CommTimer)


@dataclass
class _EPContext:
    order: Tensor  # [A] sorted position -> routing position
    token_of_sorted: Tensor  # [A] token index of each sorted assignment
    kept_rows: Tensor | None  # [A_kept] sorted positions within capacity (None: all kept)
    expert_major: Tensor | None  # [R] received row of each expert-sorted row (None: ep_size 1)
    input_splits: list[int]  # rows sent to each rank of the group
    output_splits: list[int]  # rows received from each rank of the group
    padded: bool  # one zero row was appended for the experts (nothing received)


class ExpertParallelDispatcher:
    """``TokenDispatcher`` over an expert-parallel group (see the module docstring)."""

    def __init__(self, num_experts: int, groups: ExpertParallelGroups,
                 capacity_factor: float | None = None, min_capacity: int = 0,
                 time_communication: bool = False) -> None:
        check_experts(num_experts, groups.ep_size)
        self.num_experts = num_experts
        self.groups = groups
        self.ep_size = groups.ep_size
        self.num_local_experts = num_experts // groups.ep_size
        self.first_local_expert = groups.ep_rank * self.num_local_experts
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.counters = DispatchCounters(timer=CommTimer(enabled=time_communication))

    @property
    def timer(self) -> CommTimer:
        return self.counters.timer

    def capacity(self, num_assignments: int) -> int | None:
        """Most rows this rank may send to one expert (None: unbounded)."""
        if self.capacity_factor is None:
            return None
        per_expert = self.capacity_factor * num_assignments / self.num_experts
        return max(self.min_capacity, math.ceil(per_expert))

    def dispatch(self, x: Tensor, routing: Routing, num_experts: int) -> DispatchedTokens:
        if num_experts != self.num_experts:
            raise ValueError(f"ExpertParallelDispatcher: built for {self.num_experts} experts, "
                             f"the layer routes over {num_experts}")
        order, counts = sort_by_expert(routing.expert_idx, num_experts)
        token_of_sorted = routing.token_idx.index_select(0, order)
        kept_rows, send_counts = self._apply_capacity(order.numel(), counts)
        send_tokens = token_of_sorted if kept_rows is None else token_of_sorted[kept_rows]
        send = x.index_select(0, send_tokens)

        tokens, tokens_per_expert, expert_major, input_splits, output_splits = (
            self._exchange(send, send_counts))
        self.counters.received = tokens.shape[0]
        padded = tokens.shape[0] == 0
        if padded:
            # One zero row whose output ``combine`` discards keeps every expert weight in the
            # graph with an exact zero gradient (PyTorch's grouped GEMM backward rejects the
            # zero-stride gradient autograd can hand an empty output). It is concatenated,
            # not substituted, so that the received tensor stays in the graph: this rank must
            # still take part in the backward all-to-all that the other ranks run, or they
            # would wait for it forever.
            tokens = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
            tokens_per_expert = tokens_per_expert.clone()
            tokens_per_expert[0] = 1
        context = _EPContext(order, token_of_sorted, kept_rows, expert_major, input_splits,
                             output_splits, padded)
        return DispatchedTokens(tokens, tokens_per_expert, context)

    def combine(self, expert_output: Tensor, routing: Routing, context: _EPContext,
                num_tokens: int) -> Tensor:
        if context.padded:
            expert_output = expert_output[:0]
        returned = self._return_rows(expert_output, context)
        if context.kept_rows is not None:
            full = returned.new_zeros(context.order.numel(), returned.shape[1])
            returned = full.index_copy(0, context.kept_rows, returned)
        return weighted_unpermute(returned, routing, context.order, context.token_of_sorted,
                                  num_tokens)

    def _exchange(self, send: Tensor, send_counts: Tensor):
        """Rows sorted by global expert -> this rank's experts' rows, sorted by local expert.

        Returns the rows, the rows per local expert, the expert-major permutation (None when
        nothing moved) and the all-to-all splits.
        """
        if self.ep_size == 1:
            # Data parallelism only: this rank owns every expert and the rows are already in
            # expert order; the all-to-alls and the reordering would only copy them.
            return send, send_counts, None, [], []
        group, timer = self.groups.expert_parallel, self.counters.timer
        recv_counts = exchange_counts(send_counts, group, timer).view(self.ep_size, -1)
        input_splits = send_counts.view(self.ep_size, -1).sum(dim=1).tolist()
        output_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all_rows(send, output_splits, input_splits, group, timer)
        expert_major = source_major_to_expert_major(recv_counts)
        return (received.index_select(0, expert_major), recv_counts.sum(dim=0), expert_major,
                input_splits, output_splits)

    def _return_rows(self, expert_output: Tensor, context: _EPContext) -> Tensor:
        """Undoes ``_exchange``: the experts' outputs back to the ranks that sent the rows."""
        if context.expert_major is None:
            return expert_output
        source_major = expert_output
        if expert_output.shape[0]:  # expert-major rows back to (source rank, expert) blocks
            source_major = torch.empty_like(expert_output).index_copy(
                0, context.expert_major, expert_output)
        return all_to_all_rows(source_major, context.input_splits, context.output_splits,
                               self.groups.expert_parallel, self.counters.timer)

    def reduce_statistics(self, values: Tensor) -> Tensor:
        """Sums over the data-parallel group (differentiably for floating-point values)."""
        group = self.groups.data_parallel
        if values.is_floating_point():
            return all_reduce_sum(values, group, self.counters.timer)
        out = values.clone()
        dist.all_reduce(out, group=group)
        return out

    def _apply_capacity(self, num_assignments: int, counts: Tensor
                        ) -> tuple[Tensor | None, Tensor]:
        """Keeps the first ``capacity`` assignments (in token order) of every expert."""
        self.counters.assignments = num_assignments
        capacity = self.capacity(num_assignments)
        if capacity is None:
            self.counters.kept_per_expert = counts.detach()
            self.counters.dropped = 0
            return None, counts
        kept_counts = counts.clamp_max(capacity)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = (torch.arange(num_assignments, device=counts.device)
                          - starts.repeat_interleave(counts, output_size=num_assignments))
        kept_rows = torch.nonzero(rank_in_expert < capacity).flatten()
        dropped = num_assignments - kept_rows.numel()
        self.counters.kept_per_expert = kept_counts.detach()
        self.counters.dropped = dropped
        if dropped:
            logger.debug("expert capacity %d: dropped %d of %d assignments on this rank",
                         capacity, dropped, num_assignments)
        return kept_rows, kept_counts


def source_major_to_expert_major(recv_counts: Tensor) -> Tensor:
    """Row permutation from (source rank, expert) blocks to (expert, source rank) blocks.

    ``recv_counts[s, j]`` rows for local expert j arrived from rank s, stored source-major;
    entry i of the result is the received row that comes i-th in expert-major order.
    """
    flat = recv_counts.reshape(-1)
    total = int(flat.sum())
    starts = (torch.cumsum(flat, 0) - flat).view_as(recv_counts)
    block_starts = starts.t().reshape(-1)
    block_counts = recv_counts.t().reshape(-1)
    block_offsets = torch.cumsum(block_counts, 0) - block_counts
    within = (torch.arange(total, device=flat.device)
              - block_offsets.repeat_interleave(block_counts, output_size=total))
    return block_starts.repeat_interleave(block_counts, output_size=total) + within
