"""The MoE layer against the independent dense reference: outputs, losses and all gradients."""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import HierarchicalMoE, MoE, MoEConfig
from tests.moe import reference as ref

D, H = 12, 20
TOL = dict(atol=1e-5, rtol=1e-5)


def _randomise_gates(module: torch.nn.Module, seed: int) -> None:
    """Zero-initialised gates route by ties; give them random values so routing is decisive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "w_gate" in name or "w_noise" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _experts(moe):
    weights = list(moe.experts.weights)
    biases = list(moe.experts.biases) if moe.experts.biases is not None else None
    return weights, biases


def _expert_tensors(moe):
    weights, biases = _experts(moe)
    return [*weights, *(biases or [])]


def _grads(tensors):
    """Gradients, with 'never reached' (eval-mode noise weights) read as zero on both sides."""
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]


def _zero(tensors):
    for t in tensors:
        t.grad = None


def _check_same(layer_fn, ref_fn, tensors):
    """Runs both with the same upstream gradient and compares value, aux loss and grads."""
    y, aux, extra = layer_fn()
    upstream = torch.randn_like(y)
    ((y * upstream).sum() + aux).backward()
    got = _grads(tensors)
    _zero(tensors)
    y_ref, aux_ref, extra_ref = ref_fn()
    ((y_ref * upstream).sum() + aux_ref).backward()
    want = _grads(tensors)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(aux, aux_ref, **TOL)
    for e, e_ref in zip(extra, extra_ref):
        torch.testing.assert_close(e.to(e_ref.dtype), e_ref, **TOL)
    for g, g_ref in zip(got, want):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("n,k", [(4, 1), (4, 4), (8, 2), (16, 3), (16, 16)])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("sigmoid,bias", [(False, False), (True, True)])
def test_flat_matches_dense_reference(n, k, training, sigmoid, bias):
    torch.manual_seed(n * 100 + k)
    moe = MoE(MoEConfig(D, H, n, k=k, output_sigmoid=sigmoid, expert_bias=bias)).train(training)
    _randomise_gates(moe, seed=n + k)
    x = torch.randn(2, 15, D, requires_grad=True)
    noise = torch.randn(2, 15, n)
    weights, biases = _experts(moe)
    tensors = [x, moe.router.w_gate, moe.router.w_noise, *_expert_tensors(moe)]

    def layer():
        out = moe(x, noise=noise)
        return out.y, out.aux_loss, (out.importance, out.load)

    def dense():
        flat = x.reshape(-1, D)
        y, aux, imp, load = ref.flat_reference(
            flat, moe.router.w_gate, moe.router.w_noise if training else None,
            noise.reshape(-1, n) if training else None, weights, biases, k, sigmoid=sigmoid)
        return y.reshape(2, 15, D), aux, (imp, load)

    _check_same(layer, dense, tensors)


@pytest.mark.parametrize("a,b,k1,k2", [(2, 4, 1, 2), (4, 4, 2, 2), (3, 2, 3, 2), (4, 3, 2, 1)])
@pytest.mark.parametrize("training", [False, True])
def test_hierarchical_matches_dense_reference(a, b, k1, k2, training):
    torch.manual_seed(a * 10 + b)
    cfg = MoEConfig(D, H, a * b, k=k2, num_groups=a, k_primary=k1, expert_bias=training)
    moe = HierarchicalMoE(cfg).train(training)
    _randomise_gates(moe, seed=a * b)
    x = torch.randn(40, D, requires_grad=True)
    noise1, noise2 = torch.randn(40, a), torch.randn(40, a, b)
    weights, biases = _experts(moe)
    tensors = [x, moe.primary.w_gate, moe.primary.w_noise, moe.w_gate, moe.w_noise,
               *_expert_tensors(moe)]

    def layer():
        out = moe(x, noise=(noise1, noise2))
        return out.y, out.aux_loss, (out.importance, out.load)

    def dense():
        y, aux, imp, load = ref.hierarchical_reference(
            x, moe.primary.w_gate, moe.primary.w_noise if training else None, moe.w_gate,
            moe.w_noise if training else None, noise1 if training else None,
            noise2 if training else None, weights, biases, k1, k2)
        return y, aux, (imp, load)

    _check_same(layer, dense, tensors)


@pytest.mark.parametrize("n,k", [(4, 1), (8, 2), (8, 3)])
@pytest.mark.parametrize("training", [False, True])
def test_strictly_balanced_matches_reference(n, k, training):
    torch.manual_seed(7 * n + k)
    moe = MoE(MoEConfig(D, H, n, k=k, gating="strict_balanced",
                        expert_bias=training)).train(training)
    _randomise_gates(moe, seed=n)
    with torch.no_grad():
        moe.router.threshold.copy_(torch.rand(n) * 0.4)
    x = torch.randn(32, D, requires_grad=True)
    weights, biases = _experts(moe)
    tensors = [x, moe.router.w_gate, moe.router.threshold, *_expert_tensors(moe)]

    def layer():
        out = moe(x)
        return out.y, out.aux_loss, (out.counts,)

    def dense():
        y, aux, counts = ref.strict_reference(x, moe.router.w_gate, moe.router.threshold, weights,
                                              biases, k, training)
        return y, aux, (counts,)

    _check_same(layer, dense, tensors)


def test_strict_balancing_gives_every_expert_the_same_count():
    moe = MoE(MoEConfig(D, H, 8, k=2, gating="strict_balanced")).train()
    _randomise_gates(moe, seed=3)
    out = moe(torch.randn(64, D))
    assert out.counts.tolist() == [16] * 8


def test_plain_top_k_has_no_noise_and_no_noise_weights():
    moe = MoE(MoEConfig(D, H, 8, k=2, gating="topk")).train()
    _randomise_gates(moe, seed=5)
    assert moe.router.w_noise is None
    x = torch.randn(30, D)
    torch.testing.assert_close(moe(x).y, moe(x).y, atol=0, rtol=0)
    y, _, _, _ = ref.flat_reference(x, moe.router.w_gate, None, None, *_experts(moe), 2)
    assert moe.experts.biases is None  # off by default, as in the original implementation
    torch.testing.assert_close(moe(x).y, y, **TOL)


def test_eval_is_deterministic_and_training_is_noisy():
    moe = MoE(MoEConfig(D, H, 8, k=2))
    _randomise_gates(moe, seed=9)
    x = torch.randn(200, D)
    moe.eval()
    assert torch.equal(moe(x).counts, moe(x).counts)
    moe.train()
    assert not torch.equal(moe(x).counts, moe(x).counts)


def test_expert_without_tokens_gets_zero_gradient_not_none():
    moe = MoE(MoEConfig(D, H, 4, k=1, gating="topk"))
    with torch.no_grad():
        moe.router.w_gate.zero_()
        moe.router.w_gate[:, 2] = 1.0  # positive inputs all pick expert 2
    x = torch.rand(10, D) + 0.1
    out = moe(x)
    assert out.counts.tolist() == [0, 0, 10, 0]
    out.y.sum().backward()
    w1 = moe.experts.weights[0].grad
    assert w1 is not None
    assert torch.count_nonzero(w1[[0, 1, 3]]) == 0 and torch.count_nonzero(w1[2]) > 0


def test_zero_initialised_gate_spreads_tokens_over_all_experts():
    moe = MoE(MoEConfig(D, H, 16, k=2)).train()
    assert torch.count_nonzero(moe.router.w_gate) == 0
    assert torch.count_nonzero(moe.router.w_noise) == 0
    counts = moe(torch.randn(4000, D)).counts.float()
    assert (counts > 0).all()
    assert counts.std() / counts.mean() < 0.15  # pure noise: near-uniform routing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_route_in_fp32(dtype):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(D, H, 8, k=2)).eval()
    _randomise_gates(moe, seed=11)
    x = torch.randn(64, D).to(dtype)
    out = moe(x)
    assert out.y.dtype == dtype
    full = moe(x.float())  # same rounded input, fp32 experts
    assert torch.equal(out.counts, full.counts)  # routing decided in fp32 either way
    torch.testing.assert_close(out.y.float(), full.y, atol=0.05, rtol=0.05)
    assert out.importance.dtype == torch.float32
