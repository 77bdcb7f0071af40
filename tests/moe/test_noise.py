"""Keyed gating noise (``moe/noise.py``): standard normal, independent between cells, and the
same for a token whatever else is in its batch.

References: the standard normal distribution (moments and the Kolmogorov-Smirnov distance,
over a million cells; the generator is deterministic, so the figures are fixed, and the bounds
are the ones a true N(0, 1) sample of that size meets with probability above 1 - 1e-6), and
the same layer run on the whole batch and on its halves.
"""

from __future__ import annotations

import math

import torch

from sparse_moe.moe import MoEConfig, build_moe
from sparse_moe.moe.noise import keyed_noise, keyed_normal

N_ROWS, N_COLS = 4096, 256  # 1,048,576 cells


def _cells(seed: int = 7, stream: int = 0) -> torch.Tensor:
    rows = torch.arange(N_ROWS)
    return keyed_normal(seed, stream, rows // 64, rows % 64, torch.arange(N_COLS))


def test_cells_are_standard_normal():
    z = _cells().double().flatten()
    n = z.numel()
    bound = 5.0 / math.sqrt(n)  # five standard errors
    assert abs(float(z.mean())) < bound
    assert abs(float(z.var()) - 1.0) < 5.0 * math.sqrt(2.0 / n)
    assert abs(float((z ** 3).mean())) < 5.0 * math.sqrt(15.0 / n)  # skewness
    assert abs(float((z ** 4).mean()) - 3.0) < 5.0 * math.sqrt(96.0 / n)  # kurtosis
    ordered = z.sort().values
    cdf = 0.5 * (1 + torch.erf(ordered / math.sqrt(2)))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float((cdf - empirical).abs().max())
    assert ks < math.sqrt(-0.5 * math.log(1e-6 / 2) / n)  # Kolmogorov-Smirnov at 1e-6


def test_neighbouring_cells_are_uncorrelated_and_keys_matter():
    z = _cells().double()
    n = z.numel()
    bound = 5.0 / math.sqrt(n)
    assert abs(float((z[:, 1:] * z[:, :-1]).mean())) < bound  # next expert
    assert abs(float((z[1:] * z[:-1]).mean())) < bound  # next position / sample
    assert torch.equal(_cells(), _cells())  # deterministic
    for other in (_cells(seed=8), _cells(stream=1)):
        assert abs(float((z * other.double()).mean())) < bound


def test_a_token_gets_its_noise_whatever_else_is_in_the_batch():
    """A MoE layer under keyed noise routes each sequence the same in a batch of 8 as in two
    batches of 4 (what another layout hands each rank)."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(d_model=8, d_hidden=16, num_experts=16, k=2)).train()
    with torch.no_grad():
        layer.router.w_noise.normal_()  # noise that matters
    x = torch.randn(8, 5, 8)
    ids = torch.arange(100, 108)

    def run(rows: slice):
        with keyed_noise(3, ids[rows], 5):
            out = layer(x[rows])
        return out.routing.expert_idx.view(-1, 5, 2), out.y

    whole_experts, whole_y = run(slice(0, 8))
    halves = [run(slice(0, 4)), run(slice(4, 8))]
    assert torch.equal(whole_experts, torch.cat([h[0] for h in halves]))
    torch.testing.assert_close(whole_y, torch.cat([h[1] for h in halves]), rtol=0, atol=1e-6)
    torch.manual_seed(1)  # the process's generator no longer matters
    assert torch.equal(run(slice(0, 8))[0], whole_experts)
