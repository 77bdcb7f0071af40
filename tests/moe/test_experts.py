"""The experts' two CPU paths (grouped GEMM, padded bmm) against a per-expert loop.

The reference runs each expert's rows through its own matrices with plain ``@`` in a Python
loop; both paths must give its outputs and every gradient, including experts that receive no
rows, biases, and deep experts.
"""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import experts as experts_module
from sparse_moe.moe.experts import GroupedFFNExperts, padded_row_index, use_padded_batches

PATHS = {"grouped": 0.0, "padded": float("inf")}  # CPU_PADDED_MAX_WASTE forcing each path


def loop_reference(x, counts, weights, biases):
    outputs, start = [], 0
    for e, count in enumerate(counts.tolist()):
        h = x[start:start + count]
        for i, w in enumerate(weights):
            h = h @ w[e] + (biases[i][e] if biases is not None else 0)
            if i < len(weights) - 1:
                h = torch.relu(h)
        outputs.append(h)
        start += count
    return torch.cat(outputs)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("counts,layers,bias", [
    ([3, 0, 5, 1], 1, False), ([3, 0, 5, 1], 2, True), ([0, 0, 7, 0, 2, 0], 1, True),
    ([4, 4, 4, 4, 4, 4, 4, 4], 3, False)])
def test_both_paths_equal_the_loop(path, counts, layers, bias, monkeypatch):
    monkeypatch.setattr(experts_module, "CPU_PADDED_MAX_WASTE", PATHS[path])
    torch.manual_seed(len(counts) * 10 + layers)
    module = GroupedFFNExperts(len(counts), 6, 10, 5, hidden_layers=layers, bias=bias)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 6, requires_grad=True)
    assert use_padded_batches(x, counts) == (path == "padded")
    params = [x, *module.parameters()]
    upstream = torch.randn(x.shape[0], 5)
    y = module(x, counts)
    (y * upstream).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    biases = list(module.biases) if bias else None
    y_ref = loop_reference(x, counts, list(module.weights), biases)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(got, params):
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_padded_rows_fill_each_experts_block_in_order():
    index = padded_row_index(torch.tensor([2, 0, 3]), capacity=3)
    assert index.tolist() == [0, 1, 6, 7, 8]


def test_padding_is_chosen_only_for_small_balanced_groups(monkeypatch):
    x = torch.zeros(100, 4)
    assert use_padded_batches(x, torch.tensor([25, 25, 25, 25]))  # equal groups: free padding
    assert not use_padded_batches(x, torch.tensor([26, 24, 25, 25]))  # the default pads nothing
    monkeypatch.setattr(experts_module, "CPU_PADDED_MAX_WASTE", 2.0)
    assert use_padded_batches(x, torch.tensor([25, 25, 25, 25]))
    assert not use_padded_batches(x, torch.tensor([97, 1, 1, 1]))  # 4x the rows padded
    assert use_padded_batches(x, torch.tensor([50, 20, 20, 10]))  # 2x
    big = torch.zeros(4 * experts_module.CPU_PADDED_MAX_MEAN_ROWS, 4)
    assert not use_padded_batches(big, torch.full((4,), experts_module.CPU_PADDED_MAX_MEAN_ROWS))
    assert not use_padded_batches(x.double(), torch.tensor([25, 25, 25, 25]))
