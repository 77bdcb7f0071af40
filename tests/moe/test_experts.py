"""The experts' three CPU paths against a per-expert loop.

The paths: PyTorch's grouped GEMM (one intra-op thread), the worker threads that share out
the groups (several), and one padded bmm. The reference runs each expert's rows through its
own matrices with plain ``@`` in a Python loop; every path must give its outputs and every
gradient, including experts that receive no rows, biases, and deep experts.
"""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import cpu_experts as experts_module
from sparse_moe.moe.cpu_experts import padded_row_index, use_cpu_workers, use_padded_batches
from sparse_moe.moe.experts import GroupedFFNExperts, grouped_matmul

# path -> (CPU_PADDED_MAX_WASTE, intra-op threads) that select it
PATHS = {"grouped": (0.0, 1), "workers": (0.0, 2), "padded": (float("inf"), 1)}


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for one test and puts the old one back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


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
def test_every_path_equals_the_loop(path, counts, layers, bias, monkeypatch, threads):
    waste, num_threads = PATHS[path]
    monkeypatch.setattr(experts_module, "CPU_PADDED_MAX_WASTE", waste)
    monkeypatch.setattr(experts_module, "ROW_BLOCK", 2)  # groups of 3-7 rows span blocks
    threads(num_threads)
    torch.manual_seed(len(counts) * 10 + layers)
    module = GroupedFFNExperts(len(counts), 6, 10, 5, hidden_layers=layers, bias=bias)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 6, requires_grad=True)
    assert use_padded_batches(x, counts) == (path == "padded")
    assert use_cpu_workers(x, len(counts)) == (path == "workers")
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
    assert torch.get_num_threads() == num_threads  # the workers keep their one thread to themselves


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


def test_workers_share_out_rows_and_groups_evenly():
    slices = experts_module._row_slices((5, 0, 17, 3, 40, 0), 2)
    assert [sum(hi - lo for lo, hi, _ in share) for share in slices] == [32, 33]
    assert [(lo, hi, g) for share in slices for lo, hi, g in share] == [
        (0, 5, 0), (5, 22, 2), (22, 25, 3), (25, 32, 4), (32, 65, 4)]
    groups = experts_module._group_shares((5, 0, 17, 3, 40, 0), 2)
    assert [[g for _, _, g in share] for share in groups] == [[0, 1, 2, 3], [4, 5]]


def test_a_thread_started_after_the_workers_gets_the_callers_thread_count(threads):
    """The workers' one thread each must not become the default of later threads."""
    import threading

    threads(2)
    x, weight = torch.randn(12, 4), torch.randn(3, 4, 5)
    grouped_matmul(x, weight, torch.tensor([4, 8, 12], dtype=torch.int32))
    seen = []
    worker = threading.Thread(target=lambda: seen.append(
        (torch.empty(1 << 16).fill_(0.0), torch.get_num_threads())[1]))
    worker.start()
    worker.join()
    assert seen == [2]
