"""The sampled softmax against the exact softmax, and the proposal against Monte-Carlo counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_moe.models import compose_loss
from sparse_moe.models.config import LMConfig
from sparse_moe.models.lm import MoELSTMLanguageModel
from sparse_moe.models.softmax import (
    Candidates,
    SoftmaxConfig,
    chunked_nll,
    draw_log_uniform,
    full_nll,
    log_expected_counts,
    log_uniform_log_probs,
    sampled_nll,
    token_nll,
)

IGNORE = -100


def _problem(vocab: int, tokens: int = 24, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64).mul_(0.5).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).mul_(0.5).requires_grad_()
    # Zipf-like targets: frequent ids low, as in a frequency-sorted vocabulary.
    u = torch.rand(tokens, generator=g, dtype=torch.float64)
    targets = (u.log() / math.log(0.95)).floor().long().clamp(max=vocab - 1)
    return hidden, weight, bias, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_every_word_sampled_is_the_full_softmax_with_its_gradients():
    hidden, weight, bias, targets = _problem(vocab=50)
    config = SoftmaxConfig(kind="sampled", num_samples=50)
    candidates = Candidates.draw(config, 50, hidden.device)
    assert candidates.ids.tolist() == list(range(50))
    sampled = sampled_nll(hidden, weight, bias, targets, candidates, config).sum()
    reference = F.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum")
    assert sampled.item() == pytest.approx(reference.item(), rel=1e-12)
    for got, want in zip(_grads(sampled, hidden, weight, bias), _grads(reference, hidden, weight, bias)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _loop_reference(hidden, weight, bias, targets, ids, log_counts, log_count_of):
    """The estimator written out token by token: the target and the other candidates."""
    losses = []
    for h, t in zip(hidden, targets):
        true = h @ weight[t] + bias[t] - log_count_of(t)
        others = [h @ weight[j] + bias[j] - c for j, c in zip(ids.tolist(), log_counts) if j != int(t)]
        losses.append(torch.logsumexp(torch.stack([true, *others]), 0) - true)
    return torch.stack(losses)


def test_accidental_hits_are_removed_and_corrections_applied():
    vocab, samples = 400, 60
    hidden, weight, bias, targets = _problem(vocab)
    config = SoftmaxConfig(kind="sampled", num_samples=samples)
    torch.manual_seed(3)
    candidates = Candidates.draw(config, vocab, hidden.device)
    hits = torch.isin(targets, candidates.ids)
    assert hits.any() and not hits.all()  # both cases occur in this draw
    log_q = lambda i: math.log(math.log((i + 2) / (i + 1)) / math.log(vocab + 1))  # noqa: E731
    log_count = lambda i: math.log(1 - (1 - math.exp(log_q(int(i)))) ** samples)  # noqa: E731
    counts = [log_count(i) for i in candidates.ids.tolist()]
    torch.testing.assert_close(candidates.log_counts.double(), torch.tensor(counts, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    got = sampled_nll(hidden, weight, bias, targets, candidates, config)
    want = _loop_reference(hidden, weight, bias, targets, candidates.ids, candidates.log_counts.double(),
                           log_count)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # fp32 logits


def test_log_uniform_draws_match_the_proposal_and_the_inclusion_probability():
    vocab = 1000
    torch.manual_seed(0)
    draws = 400_000
    ids = draw_log_uniform(draws, vocab, torch.device("cpu"))
    assert 0 <= int(ids.min()) and int(ids.max()) < vocab
    q = log_uniform_log_probs(torch.arange(vocab), vocab).exp()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-12)
    freq = torch.bincount(ids, minlength=vocab).double() / draws
    for i in (0, 1, 5, 50, 500):
        sigma = math.sqrt(float(q[i]) * (1 - float(q[i])) / draws)
        assert abs(float(freq[i] - q[i])) < 6 * sigma, (i, float(freq[i]), float(q[i]))
    # Inclusion of a word in a set of S draws, against the closed form, over 4000 sets.
    samples, sets = 40, 4000
    included = torch.zeros(vocab, dtype=torch.float64)
    for _ in range(sets):
        included[torch.unique(draw_log_uniform(samples, vocab, torch.device("cpu")))] += 1
    expected = log_expected_counts(torch.arange(vocab), vocab, samples).exp()
    for i in (0, 3, 30, 300):
        p = float(expected[i])
        sigma = math.sqrt(p * (1 - p) / sets)
        assert abs(float(included[i]) / sets - p) < 6 * sigma, (i, float(included[i]) / sets, p)


def test_the_gradient_approaches_the_full_softmax_as_samples_grow():
    """Mean squared error of one draw's gradient against the exact one, over 60 draws each."""
    vocab = 600
    hidden, weight, bias, targets = _problem(vocab, tokens=32, seed=1)
    exact = _grads(F.cross_entropy(hidden @ weight.t() + bias, targets), hidden, weight)
    errors = []
    for samples in (20, 60, 180, 540):
        config = SoftmaxConfig(kind="sampled", num_samples=samples)
        torch.manual_seed(samples)
        total = 0.0
        for _ in range(60):
            candidates = Candidates.draw(config, vocab, hidden.device)
            grads = _grads(sampled_nll(hidden, weight, bias, targets, candidates, config).mean(),
                           hidden, weight)
            total += sum(float((g - e).pow(2).sum() / e.pow(2).sum()) for g, e in zip(grads, exact))
        errors.append(total / 60)
    # Each mean is over 60 draws; its spread across seeds is under 10% (ratios of 0.48-0.64 seen).
    assert all(later < 0.75 * earlier for earlier, later in zip(errors, errors[1:])), errors


def test_chunked_evaluation_equals_the_unchunked_softmax():
    hidden, weight, bias, targets = _problem(vocab=97, tokens=50)
    whole = full_nll(hidden, weight, bias, targets)
    # The product's blocking depends on the row count: a few fp64 roundings of d = 8 terms.
    eps = torch.finfo(torch.float64).eps
    for chunk in (1, 7, 50, 64):
        torch.testing.assert_close(chunked_nll(hidden, weight, bias, targets, chunk), whole.detach(),
                                   rtol=16 * eps, atol=16 * eps)
    config = SoftmaxConfig(eval_chunk_mib=1)
    assert config.eval_chunk_tokens(793_471) == 1 and config.eval_chunk_tokens(1024) == 256


def _lm(tie: bool, softmax: dict, checkpointing: bool = False) -> MoELSTMLanguageModel:
    torch.manual_seed(0)
    layers = [{"kind": "lstm", "hidden_size": 16},
              {"kind": "moe", "moe": {"num_experts": 4, "k": 2, "d_hidden": 8}}]
    config = LMConfig(vocab_size=120, d_model=16, layers=layers, tie_embeddings=tie, dropout=0.0,
                      softmax=softmax, activation_checkpointing=checkpointing)
    return MoELSTMLanguageModel(config)


def _batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 120, (3, 9), generator=g)
    targets = torch.randint(0, 120, (3, 9), generator=g)
    targets[0, :4] = IGNORE
    return tokens, targets


@pytest.mark.parametrize("tie", [False, True])
def test_the_model_scores_targets_exactly_in_evaluation_and_with_all_words_sampled(tie):
    tokens, targets = _batch()
    model = _lm(tie, {"kind": "sampled", "num_samples": 120, "eval_chunk_mib": 1})
    torch.manual_seed(1)  # the same gating noise in both passes
    logits = model(tokens).logits
    reference = F.cross_entropy(logits.reshape(-1, 120), targets.reshape(-1), ignore_index=IGNORE)
    torch.manual_seed(1)
    out = model(tokens, targets=targets)
    assert out.logits is None and out.token_nll.shape == targets.shape
    assert torch.all(out.token_nll[targets == IGNORE] == 0)
    loss = compose_loss(out, targets, ignore_index=IGNORE).cross_entropy
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    params = [p for p in model.parameters()]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():
        chunked = model(tokens, targets=targets).token_nll
    with torch.no_grad():
        eval_logits = model(tokens).logits
    exact = F.cross_entropy(eval_logits.reshape(-1, 120), targets.reshape(-1), ignore_index=IGNORE,
                            reduction="none").reshape(targets.shape)
    torch.testing.assert_close(chunked, exact, rtol=1e-6, atol=1e-6)


def test_sampled_training_is_the_same_with_activation_checkpointing():
    tokens, targets = _batch()
    results = []
    for checkpointing in (False, True):
        model = _lm(False, {"kind": "sampled", "num_samples": 30}, checkpointing)
        torch.manual_seed(11)
        loss = compose_loss(model(tokens, targets=targets), targets, ignore_index=IGNORE).total
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_softmax_fields_name_the_field():
    with pytest.raises(ValueError, match=r"SoftmaxConfig.kind: expected one of"):
        SoftmaxConfig(kind="hierarchical")
    with pytest.raises(ValueError, match=r"SoftmaxConfig.num_samples: expected a positive"):
        SoftmaxConfig(kind="sampled", num_samples=0)
    with pytest.raises(ValueError, match=r"LMConfig.softmax.*num_sample"):
        LMConfig.from_dict({"vocab_size": 10, "layers": [{"kind": "lstm", "hidden_size": 4}],
                            "softmax": {"num_sample": 3}})


def test_token_nll_is_zero_where_ignored_and_counts_only_targets():
    hidden, weight, bias, targets = _problem(vocab=30, tokens=10)
    targets = targets.clone()
    targets[::3] = IGNORE
    nll = token_nll(hidden, weight, bias, targets, SoftmaxConfig(), training=True)
    counted = targets != IGNORE
    assert torch.all(nll[~counted] == 0)
    torch.testing.assert_close(nll[counted], full_nll(hidden[counted], weight, bias, targets[counted]))
