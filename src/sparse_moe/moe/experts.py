"""Experts: feed-forward networks with stacked weights, run as grouped matrix products.

Weights are stacked over experts (``[num_experts, d_in, d_out]``) so that one grouped GEMM
runs every expert on its contiguous slice of the expert-sorted tokens, whatever the number
of experts, and so that the stack shards cleanly across expert-parallel ranks.
"""

from __future__ import annotations

import math

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


def group_offsets(tokens_per_group: Tensor) -> Tensor:
    return torch.cumsum(tokens_per_group, dim=0, dtype=torch.int32)


# CPU: at most this many rows (real and padding) per real row for the padded bmm path. 1.0:
# only equal groups (strict balancing, k = num_experts), where padding is free. On a quiet
# 2-core CPU the grouped loop beats padding random groups (64 experts: 1.23x against 1.41x
# the dense ideal; 256: 1.57x against 1.70x); on busy cores padding wins by far (7.2 s
# against 0.54 s), so shared machines may raise it (2.0 covers random groups of 32 rows).
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
    """

    def __init__(self, num_experts: int, d_in: int, d_hidden: int, d_out: int,
                 hidden_layers: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        dims = [d_in] + [d_hidden] * hidden_layers + [d_out]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_in, fan_out))
            for fan_in, fan_out in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_out)) for fan_out in dims[1:]
        ) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i, weight in enumerate(self.weights):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            if self.biases is not None:
                nn.init.uniform_(self.biases[i], -bound, bound)

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
