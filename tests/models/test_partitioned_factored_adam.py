"""FactoredAdam over flat partitions (as ZeRO hands them) against FactoredAdam on the parameters.

Two ranks are simulated by two threads, each stepping its own partition; their sum over ranks
is a barrier that adds both buffers. The group flattens a stacked expert weight, a matrix and a
vector, and is cut at awkward places (inside a row, inside a matrix of the stack), then padded.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from sparse_moe.optim import FactoredAdam, factored_adam, optimizer_state_numel
from sparse_moe.optim.partitions import FACTORED_KEY, Fragment, PartitionLayout, pieces

SHAPES = {"experts.w": (3, 5, 4), "proj.weight": (6, 7), "proj.bias": (6,)}


class ThreadSum:
    """``all_reduce`` for ranks that are threads of one process."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.buffers: list[torch.Tensor | None] = [None] * ranks

    def for_rank(self, rank: int):
        def reduce(buffer: torch.Tensor) -> None:
            self.buffers[rank] = buffer.clone()
            self.barrier.wait()
            total = sum(self.buffers)
            self.barrier.wait()
            buffer.copy_(total)
        return reduce


def _layouts(cuts: list[int], total: int, reduce: ThreadSum):
    """Per rank: (partition start, size, layout) for the flattened group cut at ``cuts``."""
    starts, at = {}, 0
    for name, shape in SHAPES.items():
        starts[name] = at
        at += torch.Size(shape).numel()
    bounds = [0, *cuts, total]
    out = []
    for rank, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        fragments = []
        for name, shape in SHAPES.items():
            first, last = starts[name], starts[name] + torch.Size(shape).numel()
            a, b = max(lo, first), min(hi, last)
            if a < b:
                fragments.append(Fragment(name, shape, a - first, a - lo, b - a))
        out.append((lo, hi - lo, PartitionLayout(
            fragments, {n: s for n, s in SHAPES.items() if len(s) >= 2}, reduce.for_rank(rank),
            vectors={n: s for n, s in SHAPES.items() if len(s) < 2})))
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 6])  # whole fragments; pieces of at most 6 elements
@pytest.mark.parametrize("cuts", [[37], [9, 61]])  # inside a row of expert 1; three ranks
def test_partitions_step_like_the_whole_parameters(chunk, cuts, monkeypatch):
    monkeypatch.setattr(factored_adam, "FACTORED_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    params = {n: nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}
    total = sum(p.numel() for p in params.values())
    reference = FactoredAdam(list(params.values()), lr=0.01, betas=(0.0, 0.9), eps=1e-3)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    padding = 3
    reduce = ThreadSum(len(cuts) + 1)
    ranks = []
    for start, size, layout in _layouts(cuts, total, reduce):
        part = nn.Parameter(torch.cat([flat[start:start + size], torch.zeros(padding)]))
        optimizer = FactoredAdam([part], lr=0.01, betas=(0.0, 0.9), eps=1e-3)
        optimizer.attach_partitions({part: layout})
        ranks.append((start, size, part, optimizer))
    for _ in range(3):
        grads = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        for name, p in params.items():
            p.grad = grads[name].clone()
        reference.step()
        flat_grad = torch.cat([grads[n].reshape(-1) for n in SHAPES])
        for start, size, part, _ in ranks:
            part.grad = torch.cat([flat_grad[start:start + size], torch.zeros(padding)])
        threads = [threading.Thread(target=optimizer.step) for *_, optimizer in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    expected = torch.cat([p.detach().reshape(-1) for p in params.values()])
    got = torch.cat([part.detach()[:size] for _, size, part, _ in ranks])
    # Sums over partitions add in another order: a few fp32 roundings of the moments.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Whole moments read back (a vector's assembled from every rank's fragment).
    read: dict[int, dict] = {}

    def read_back(rank: int, optimizer: FactoredAdam) -> None:
        read[rank] = {name: optimizer.full_moments(name) for name in SHAPES}

    threads = [threading.Thread(target=read_back, args=(r, opt)) for r, (*_, opt) in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for moments in read.values():
        assert torch.equal(moments["proj.bias"]["exp_avg_sq"],
                           reference.state[params["proj.bias"]]["exp_avg_sq"])
        torch.testing.assert_close(moments["experts.w"]["row"],
                                   reference.state[params["experts.w"]]["row"])
    for *_, part, optimizer in ranks:
        assert torch.all(part.detach()[-padding:] == 0)  # padding stays untouched
        moments = optimizer.state[part][FACTORED_KEY]
        for name, param in params.items():
            if param.dim() >= 2:
                torch.testing.assert_close(moments["row"][name], reference.state[param]["row"])
                torch.testing.assert_close(moments["col"][name], reference.state[param]["col"])


def test_partition_state_is_rows_plus_columns_per_matrix():
    reduce = ThreadSum(1)
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    (_, _, layout), = _layouts([], total, reduce)
    layout.all_reduce = None
    part = nn.Parameter(torch.zeros(total))
    optimizer = FactoredAdam([part])
    optimizer.attach_partitions({part: layout})
    optimizer.initialize_state()
    # experts: 3 x (5 + 4); proj.weight: 6 + 7; proj.bias keeps Adam's 6 (and the step counter)
    assert optimizer_state_numel(optimizer) == 3 * (5 + 4) + (6 + 7) + 6


def test_pieces_cover_a_fragment_once_in_whole_rows_of_one_matrix():
    fragment = Fragment("w", (3, 5, 4), 7, 0, 41)  # from inside row 1 to inside row 11
    covered = []
    for piece in pieces(fragment, max_elements=8):
        assert piece.rows == 1 or (piece.col == 0 and piece.width == 4)
        assert piece.row // 5 == (piece.row + piece.rows - 1) // 5  # one matrix of the stack
        assert piece.rows * piece.width <= 8 or piece.rows == 1
        covered += list(range(piece.offset, piece.offset + piece.rows * piece.width))
        first = fragment.param_start + piece.offset
        assert divmod(first, 4) == (piece.row, piece.col)
    assert covered == list(range(41))


def test_a_flat_state_converts_to_the_factored_one_exactly():
    """A checkpoint saved before partitions were factored restores DeepSpeed's ``exp_avg_sq``
    beside the factored state: its row and column sums are the factored averages."""
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    (_, _, layout), = _layouts([], total, ThreadSum(1))
    layout.all_reduce = None
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(total, generator=g) for _ in range(2)]
    params = {n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
    reference = FactoredAdam(list(params.values()), lr=0.01, betas=(0.0, 0.9))
    for grad in grads:
        for p, piece in zip(params.values(), grad.split([p.numel() for p in params.values()])):
            p.grad = piece.view(p.shape).clone()
        reference.step()
    flat = nn.Parameter(torch.zeros(total))
    unfactored = FactoredAdam([flat], lr=0.01, betas=(0.0, 0.9))
    flat.grad = grads[0].clone()
    unfactored.step()  # the old form: Adam's full moment of the partition
    part = nn.Parameter(torch.zeros(total))
    optimizer = FactoredAdam([part], lr=0.01, betas=(0.0, 0.9))
    optimizer.attach_partitions({part: layout})
    optimizer.initialize_state()
    optimizer.state[part].update(step=1, exp_avg_sq=unfactored.state[flat]["exp_avg_sq"].clone())
    part.grad = grads[1].clone()
    optimizer.step()
    moments = optimizer.state[part][FACTORED_KEY]
    assert "exp_avg_sq" not in optimizer.state[part]
    for name, param in params.items():
        state = reference.state[param]
        if param.dim() >= 2:
            torch.testing.assert_close(moments["row"][name], state["row"])
            torch.testing.assert_close(moments["col"][name], state["col"])
        else:
            torch.testing.assert_close(moments["exp_avg_sq"][name], state["exp_avg_sq"])


def test_layouts_are_refused_once_a_flat_state_exists():
    part = nn.Parameter(torch.zeros(10))
    optimizer = FactoredAdam([part])
    part.grad = torch.ones(10)
    optimizer.step()
    layout = PartitionLayout([Fragment("v", (10,), 0, 0, 10)], {})
    with pytest.raises(ValueError, match="already has an unfactored state"):
        optimizer.attach_partitions({part: layout})
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        FactoredAdam([nn.Parameter(torch.zeros(2))]).attach_partitions({part: layout})
