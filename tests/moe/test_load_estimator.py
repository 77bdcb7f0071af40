"""The smooth load estimator against Monte-Carlo counts, and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_moe.moe import HierarchicalMoE, MoE, MoEConfig, prob_in_top_k

D, N, K = 6, 8, 2
SAMPLES = 40_000
# Binomial standard error at 40k samples is at most 0.0025; 0.012 is ~5 sigma.
TOL = 0.012


def _layer(seed: int) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(D, 8, N, k=K)).train()
    with torch.no_grad():
        moe.router.w_gate.normal_(0, 0.6)
        moe.router.w_noise.normal_(0, 0.6)
    return moe


def _noisy_logits(moe: MoE, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    clean = x @ moe.router.w_gate
    std = F.softplus(x @ moe.router.w_noise) + moe.config.noise_epsilon
    return clean, std, clean + noise * std


@torch.no_grad()
def test_load_probability_matches_redrawing_one_experts_noise():
    """P(x, i) is the chance that i stays in the top k when only eps_i is redrawn."""
    moe = _layer(0)
    x = torch.randn(6, D)
    noise = torch.randn(6, N)
    clean, std, noisy = _noisy_logits(moe, x, noise)
    for t in range(x.shape[0]):
        estimate = moe(x[t:t + 1], noise=noise[t:t + 1]).load  # one token: load = P(x, .)
        for i in range(N):
            redrawn = noisy[t].expand(SAMPLES, N).clone()
            redrawn[:, i] = clean[t, i] + torch.randn(SAMPLES) * std[t, i]
            beaten_by = (redrawn > redrawn[:, i:i + 1]).sum(dim=1)
            frequency = (beaten_by < K).float().mean()
            assert abs(float(estimate[i]) - float(frequency)) < TOL, (t, i)


@torch.no_grad()
def test_expected_load_matches_monte_carlo_expert_counts():
    """Averaged over all noise, the estimator's load equals the expected routed counts."""
    moe = _layer(1)
    x = torch.randn(50, D)
    draws = 400
    counted = torch.zeros(N)
    estimated = torch.zeros(N)
    for _ in range(draws):
        out = moe(x)
        counted += out.counts.float()
        estimated += out.load
    counted, estimated = counted / draws, estimated / draws
    # Per-expert counts over 50 tokens x 400 draws: relative error well under 3%.
    torch.testing.assert_close(estimated, counted, rtol=0.03, atol=0.3)
    assert abs(float(estimated.sum()) - 50 * K) < 1.0


def test_load_loss_gradient_reaches_gate_and_noise_weights():
    moe = _layer(2)
    out = moe(torch.randn(30, D))
    out.load_loss.backward()
    assert moe.router.w_gate.grad.abs().sum() > 0
    assert moe.router.w_noise.grad.abs().sum() > 0


def test_load_gradient_matches_finite_differences():
    """gradcheck in float64 with the noise fixed (top-k choices are locally constant)."""
    torch.manual_seed(3)
    moe = MoE(MoEConfig(D, 8, N, k=K)).double().train()
    x = torch.randn(10, D, dtype=torch.float64)
    noise = torch.randn(10, N, dtype=torch.float64)
    w_gate = (torch.randn(D, N, dtype=torch.float64) * 0.6).requires_grad_()
    w_noise = (torch.randn(D, N, dtype=torch.float64) * 0.6).requires_grad_()

    def load(wg, wn):
        params = {"router.w_gate": wg, "router.w_noise": wn}
        return torch.func.functional_call(moe, params, (x,), {"noise": noise}).load

    assert torch.autograd.gradcheck(load, (w_gate, w_noise), eps=1e-6, atol=1e-5)


def _load_probability_by_cases(clean, std, noisy, top_values, k):
    """P(x, i) written as the paper's two cases, each through its own normal CDF."""
    in_top_k = noisy > top_values[:, k:k + 1]
    prob_if_in = torch.special.ndtr((clean - top_values[:, k:k + 1]) / std)
    prob_if_out = torch.special.ndtr((clean - top_values[:, k - 1:k]) / std)
    return torch.where(in_top_k, prob_if_in, prob_if_out)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_load_probability_and_gradients_match_the_two_case_formula(k):
    """The fused load probability against the paper's cases, values and every gradient."""
    torch.manual_seed(6)
    clean = torch.randn(20, N, dtype=torch.float64, requires_grad=True)
    raw_std = torch.randn(20, N, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(20, N, dtype=torch.float64)
    weights = torch.rand(20, N, dtype=torch.float64)  # a non-uniform incoming gradient

    def loss(formula):
        std = F.softplus(raw_std) + 1e-2
        noisy = clean + noise * std
        top_values = noisy.topk(k + 1, dim=-1).values
        prob = formula(clean, std, noisy, top_values, k)
        return prob, (prob * weights).sum()

    expected, expected_loss = loss(_load_probability_by_cases)
    expected_grads = torch.autograd.grad(expected_loss, (clean, raw_std))
    got, got_loss = loss(prob_in_top_k)
    got_grads = torch.autograd.grad(got_loss, (clean, raw_std))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_load_probability_gradcheck():
    torch.manual_seed(7)
    clean = torch.randn(6, N, dtype=torch.float64, requires_grad=True)
    std = (torch.rand(6, N, dtype=torch.float64) + 0.5).requires_grad_()
    noisy = clean.detach() + torch.randn(6, N, dtype=torch.float64) * std.detach()
    # Thresholds just above the top logits: no entry sits on a threshold, where the choice
    # between the two thresholds (a comparison) would jump under the finite differences.
    top_values = (noisy.topk(K + 1, dim=-1).values + 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, s, t: prob_in_top_k(c, s, noisy, t, K),
                                    (clean, std, top_values))


@torch.no_grad()
def test_eval_load_is_the_plain_count():
    moe = _layer(4).eval()
    out = moe(torch.randn(40, D))
    assert torch.equal(out.load, out.counts.float())
    assert not out.load.requires_grad


@pytest.mark.parametrize("k1,k2", [(1, 2), (2, 2)])
@torch.no_grad()
def test_hierarchical_expected_load_matches_counts(k1, k2):
    """Load_H is a smooth surrogate: averaged over noise it tracks the expected counts."""
    torch.manual_seed(5)
    moe = HierarchicalMoE(MoEConfig(D, 8, 12, k=k2, num_groups=3, k_primary=k1)).train()
    for name, p in moe.named_parameters():
        if "w_gate" in name or "w_noise" in name:
            p.normal_(0, 0.4)
    x = torch.randn(60, D)
    counted = torch.zeros(12)
    estimated = torch.zeros(12)
    for _ in range(300):
        out = moe(x)
        counted += out.counts.float()
        estimated += out.load
    # Load_H multiplies two estimates, so it is close to, not equal to, the expected count.
    torch.testing.assert_close(estimated / 300, counted / 300, rtol=0.1, atol=1.0)
