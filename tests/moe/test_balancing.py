"""The balancing losses balance: the paper's Table 6 effect in miniature.

A layer whose gate starts out sending every token to experts 0 and 1 is trained on a
regression task. Without the losses the imbalance stays (the rich-get-richer loop the paper
describes); with them CV(load) falls to a small value.
"""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import MoE, MoEConfig

D, N = 8, 8


def _train(w_importance: float, w_load: float, seed: int, steps: int = 150) -> tuple[float, float]:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(D, 16, N, k=2, w_importance=w_importance, w_load=w_load))
    skew = torch.zeros(D)
    skew[0] = 2.0
    with torch.no_grad():  # every token prefers experts 0 and 1
        moe.router.w_gate[:, 0] = skew
        moe.router.w_gate[:, 1] = 0.9 * skew
    x = torch.randn(512, D) + skew
    target = torch.tanh(x @ torch.randn(D, D))
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    start = _cv_of_counts(moe, x)
    for _ in range(steps):
        out = moe(x)
        loss = (out.y - target).pow(2).mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return start, _cv_of_counts(moe, x)


@torch.no_grad()
def _cv_of_counts(moe: MoE, x: torch.Tensor) -> float:
    moe.eval()
    counts = moe(x).counts.float()
    moe.train()
    return float(counts.std(unbiased=False) / counts.mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_on_balance_and_losses_off_do_not(seed):
    start, off = _train(0.0, 0.0, seed)
    _, on = _train(0.1, 0.1, seed)
    assert start > 1.5
    assert off > 0.9, f"without balancing losses CV(load) fell to {off:.3f}"
    assert on < 0.3, f"with balancing losses CV(load) is still {on:.3f}"


@pytest.mark.parametrize("weights", [(0.1, 0.0), (0.0, 0.1)])
def test_either_loss_alone_balances(weights):
    _, cv = _train(*weights, seed=0)
    assert cv < 0.5, f"(w_importance, w_load)={weights}: CV(load) {cv:.3f}"
