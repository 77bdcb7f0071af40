"""The paper's factored Adam and the warmup/hold/rsqrt schedule.

References: torch.optim.Adam with beta1 = 0 (the unfactored optimizer the factored one must
equal when squared gradients are rank-1), the memory formula rows + cols per matrix, and the
schedule's closed form written out by hand.
"""

import math

import pytest
import torch
from torch import nn

from sparse_moe.models import MoELSTMLanguageModel, compose_loss, lm_preset
from sparse_moe.optim import (
    FactoredAdam,
    OptimizerConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    factored_adam,
    factored_second_moment,
    optimizer_state_numel,
)


def _rank1_grads(shape, steps, seed):
    """Gradients s_t * u v^T (per leading index): their squares are rank-1 matrices."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64)
    v = torch.randn(*shape[:-2], 1, shape[-1], generator=g, dtype=torch.float64)
    return [torch.randn((), generator=g, dtype=torch.float64) * 3 * u * v for _ in range(steps)]


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])  # a matrix and stacked experts
@pytest.mark.parametrize("seed", range(4))
def test_factored_equals_adam_on_rank1_squared_gradients(shape, seed):
    """fp64 parameters keep fp64 state, so the two agree to fp64 rounding: a few units in the
    last place of each step's update (lr = 0.01), over 6 steps."""
    grads = _rank1_grads(shape, steps=6, seed=seed)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed),
                        dtype=torch.float64)
    ours = nn.Parameter(start.clone())
    ref = nn.Parameter(start.clone())
    opt = FactoredAdam([ours], lr=0.01, betas=(0.0, 0.9), eps=1e-8)
    ref_opt = torch.optim.Adam([ref], lr=0.01, betas=(0.0, 0.9), eps=1e-8)
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    assert not torch.equal(ours.detach(), start)
    assert all(v.dtype == torch.float64 for v in opt.state[ours].values()
               if isinstance(v, torch.Tensor))
    ulp = torch.finfo(torch.float64).eps
    # |param| <= ~4 and each step moves it by <= lr: 16 ulps of the parameter's scale per step.
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=6 * 16 * ulp,
                               atol=6 * 16 * ulp)


def test_factored_estimate_is_exact_for_rank1_and_approximate_otherwise():
    a, b = torch.rand(6, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    square = torch.outer(a, b)
    est = factored_second_moment(square.sum(-1), square.sum(-2))
    torch.testing.assert_close(est, square)
    full_rank = torch.rand(6, 4, dtype=torch.float64) + torch.eye(6, 4, dtype=torch.float64) * 5
    est = factored_second_moment(full_rank.sum(-1), full_rank.sum(-2))
    assert not torch.allclose(est, full_rank)
    # Row and column sums of the estimate are those of the true second moment.
    torch.testing.assert_close(est.sum(-1), full_rank.sum(-1))
    torch.testing.assert_close(est.sum(-2), full_rank.sum(-2))


# All 3 matrices at once; 2, then 1; each matrix by blocks of 2 rows (5 x 4 > 8), the last short.
@pytest.mark.parametrize("chunk", [1 << 20, 40, 8])
def test_factored_update_on_full_rank_gradients_matches_the_formula(chunk, monkeypatch):
    """Full-rank squares (where the estimate is not Adam's), in fp32 and for a bf16 parameter:
    the step equals ``-lr g / (sqrt(R C^T / sum R / (1 - beta2^t)) + eps)`` written out,
    whether the stacked matrices are updated together, in chunks, or by blocks of rows."""
    monkeypatch.setattr(factored_adam, "FACTORED_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        start = torch.randn(3, 5, 4, generator=g).to(dtype)
        param = nn.Parameter(start.clone())
        opt = FactoredAdam([param], lr=0.01, betas=(0.0, 0.9), eps=1e-3)
        row = torch.zeros(3, 5, dtype=torch.float64)
        col = torch.zeros(3, 4, dtype=torch.float64)
        expected = start.double()
        for t in range(1, 4):
            grad = torch.randn(3, 5, 4, generator=g)
            param.grad = grad.to(dtype)
            opt.step()
            square = grad.to(dtype).double() ** 2
            row = 0.9 * row + 0.1 * square.sum(-1)
            col = 0.9 * col + 0.1 * square.sum(-2)
            second = factored_second_moment(row, col) / (1 - 0.9 ** t)
            update = grad.to(dtype).double() / (second.sqrt() + 1e-3)
            expected = (expected - 0.01 * update).to(dtype).double()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(param.detach().double(), expected, rtol=tolerance,
                                   atol=tolerance)


def test_vectors_follow_adam_exactly():
    start = torch.randn(9, dtype=torch.float64)
    ours, ref = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = FactoredAdam([ours], lr=0.05, betas=(0.0, 0.99))
    ref_opt = torch.optim.Adam([ref], lr=0.05, betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        grad = torch.randn(9, generator=g, dtype=torch.float64)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())


def test_unfactored_with_momentum_and_decay_is_adamw():
    """factored=False, beta1 > 0 and decoupled decay: torch's AdamW, step for step."""
    start = torch.randn(4, 5, dtype=torch.float64)
    ours, ref = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = FactoredAdam([ours], lr=0.03, betas=(0.9, 0.99), weight_decay=0.1, factored=False)
    ref_opt = torch.optim.AdamW([ref], lr=0.03, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())


def test_state_is_rows_plus_cols_per_matrix():
    torch.manual_seed(0)
    model = MoELSTMLanguageModel(lm_preset("debug-moe"))
    opt = FactoredAdam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (2, 6))
    compose_loss(model(tokens[:, :-1]), tokens[:, 1:]).total.backward()
    opt.step()
    expected = 0
    for p in model.parameters():
        if p.grad is None:
            continue
        if p.dim() >= 2:
            leading = math.prod(p.shape[:-2])
            expected += leading * (p.shape[-2] + p.shape[-1])  # per expert matrix
        else:
            expected += p.numel()
    assert optimizer_state_numel(opt) == expected
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.step()
    num_params = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert optimizer_state_numel(adam) - len(adam.state) == 2 * num_params  # + step scalars
    assert optimizer_state_numel(opt) < 0.2 * num_params
    # Stacked expert weights [E, d_in, d_out] keep one row and one column vector per expert.
    w = model.moe_layers[0].moe.experts.weights[0]
    assert opt.state[w]["row"].shape == w.shape[:-1]
    assert opt.state[w]["col"].shape == (w.shape[0], w.shape[2])


def test_factored_adam_trains_the_language_model():
    torch.manual_seed(0)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=50))
    opt = build_optimizer(model.parameters(), OptimizerConfig("factored_adam", lr=0.01))
    assert isinstance(opt, FactoredAdam)
    tokens = torch.randint(0, 50, (4, 13), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        parts = compose_loss(model(tokens[:, :-1]), tokens[:, 1:])
        parts.total.backward()
        opt.step()
        losses.append(float(parts.cross_entropy.detach()))
    assert losses[0] > 3.5  # about ln(50) at the start
    assert losses[-1] < 0.5 * losses[0]


def test_schedule_warmup_hold_rsqrt():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, hold_steps=3))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * n / 4 for n in range(1, 5)] + [2.0] * 3
    expected += [2.0 * math.sqrt(7 / n) for n in range(8, 13)]
    assert lrs == pytest.approx(expected)


def test_schedule_and_optimizer_configs_reject_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        ScheduleConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="OptimizerConfig.name"):
        OptimizerConfig(name="sgd")
    with pytest.raises(ValueError, match="unknown OptimizerConfig field"):
        OptimizerConfig.from_dict({"lr": 1.0, "momentum": 0.9})


def test_state_allocated_up_front_steps_exactly_like_lazily_allocated_state():
    """``initialize_state`` only moves the allocation: the same updates, the same state."""
    g = torch.Generator().manual_seed(9)
    start = [torch.randn(3, 5, 4, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    runs = []
    for eager in (False, True):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = FactoredAdam(params, lr=0.01)
        if eager:
            opt.initialize_state()
            assert optimizer_state_numel(opt) == 3 * (5 + 4) + 7
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            opt.step()
        runs.append((params, opt.state_dict()["state"]))
    (lazy, lazy_state), (eager, eager_state) = runs
    for a, b in zip(lazy, eager):
        assert torch.equal(a, b)
    for key in lazy_state:
        for name, value in lazy_state[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(eager_state[key][name]))


@pytest.mark.parametrize("chunk", [1 << 20, 64])  # one chunk; 16 chunks, the last one short
def test_vectors_step_like_adam_whole_or_in_chunks(chunk, monkeypatch):
    """Vectors (and the flat partitions DeepSpeed's wrappers hand the optimizer) keep Adam's
    full second moment; updated in chunks, the step is the same."""
    monkeypatch.setattr(factored_adam, "FACTORED_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(12)
    start = torch.randn(1000, generator=g, dtype=torch.float64)
    ours, ref = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = FactoredAdam([ours], lr=0.01, betas=(0.0, 0.9), eps=1e-8)
    ref_opt = torch.optim.Adam([ref], lr=0.01, betas=(0.0, 0.9), eps=1e-8)
    for _ in range(5):
        grad = torch.randn(1000, generator=g, dtype=torch.float64)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    assert not torch.equal(ours.detach(), start)
    ulp = torch.finfo(torch.float64).eps
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=5 * 16 * ulp, atol=5 * 16 * ulp)
