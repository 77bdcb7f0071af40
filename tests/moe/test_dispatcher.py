"""The local dispatcher's combine pieces against plain tensor arithmetic."""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe.dispatcher import gate_weighted_sum, permute_rows


@pytest.mark.parametrize("expanded", [False, True], ids=["contiguous-grad", "expanded-grad"])
def test_gate_weighted_sum_matches_the_broadcast_sum(expanded):
    """Values and both gradients; ``y.sum()`` hands back an expanded (stride-0) gradient."""
    torch.manual_seed(0)
    rows = torch.randn(6, 3, 5, requires_grad=True)
    gates = torch.rand(6, 3, requires_grad=True)
    upstream = torch.ones(1, 1).expand(6, 5) if expanded else torch.randn(6, 5)

    y = gate_weighted_sum(rows, gates)
    y.backward(upstream)
    got = (y.detach(), rows.grad.clone(), gates.grad.clone())
    rows.grad = gates.grad = None
    y_ref = (rows * gates.unsqueeze(-1)).sum(1)
    y_ref.backward(upstream)
    for g, want in zip(got, (y_ref.detach(), rows.grad, gates.grad)):
        torch.testing.assert_close(g, want)


def test_permute_rows_gradient_is_the_inverse_gather():
    torch.manual_seed(1)
    x = torch.randn(7, 4, requires_grad=True)
    index = torch.randperm(7)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(7))
    upstream = torch.randn(7, 4)
    permute_rows(x, index, inverse).backward(upstream)
    got = x.grad.clone()
    x.grad = None
    x.index_select(0, index).backward(upstream)
    torch.testing.assert_close(got, x.grad)
    torch.testing.assert_close(permute_rows(x, index, inverse), x[index])
