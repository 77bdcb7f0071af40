"""The GNMT-style translation model: step-by-step decoding, beam search, a toy task."""

import itertools

import pytest
import torch

from sparse_moe.models import (
    MoETranslationModel,
    TranslationConfig,
    beam_search,
    compose_loss,
    greedy_decode,
    translation_preset,
)
from sparse_moe.models.decoding import forbid_specials

PAD, BOS, EOS = 0, 1, 2


def _model(seed=0, vocab=12, **overrides):
    torch.manual_seed(seed)
    config = translation_preset("debug-translation", vocab_size=vocab)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = MoETranslationModel(config)
    with torch.no_grad():  # spread the outputs so that decoding has real choices to make
        model.output.weight.mul_(30)
        for name, param in model.decoder_moe.named_parameters():
            if "w_gate" in name:
                param.normal_()
    return model.eval()


def _src(batch=3, length=5, vocab=12, seed=1):
    src = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    src[0, length - 2:] = PAD
    return src


def test_strict_balanced_moe_in_encoder_and_decoder():
    model = _model()
    cfg = model.config.moe_config()
    assert cfg.gating == "strict_balanced" and cfg.w_importance == cfg.w_load == 0.01
    model.train()
    src, tgt = _src(), torch.randint(3, 12, (3, 4))
    out = model(src, tgt)
    assert out.logits.shape == (3, 4, 12) and len(out.moe_outputs) == 2
    # Strict balancing: every expert gets exactly k * |X| / n of the real (unpadded) tokens.
    real_src = int((src != PAD).sum())
    counts = out.moe_outputs[0].counts
    assert counts.tolist() == [real_src * 2 // 4] * 4


HIERARCHICAL = {"d_hidden": 64, "num_experts": 8, "k": 2, "num_groups": 2,
                "gating": "noisy_topk"}


@pytest.mark.parametrize("moe", [None, HIERARCHICAL], ids=["strict", "hierarchical"])
def test_step_by_step_decoding_equals_teacher_forcing(moe):
    model = _model(**({"moe": moe} if moe else {}))
    src = _src()
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(3, 12, (3, 5))], dim=1)
    full = model(src, tgt).logits
    encoded = model.encode(src)
    state, steps = None, []
    for t in range(tgt.shape[1]):
        out = model.decode(tgt[:, t:t + 1], encoded, state)
        state = out.state
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_padding_does_not_change_the_translation_of_a_sentence():
    model = _model()
    src = _src()
    alone = model(src[:1, :3], torch.tensor([[BOS, 5, 6]])).logits
    padded = model(src[:1], torch.tensor([[BOS, 5, 6]])).logits
    torch.testing.assert_close(alone, padded)


def test_beam_of_one_is_greedy():
    model = _model(vocab=16)
    src = _src(batch=4, vocab=16)
    greedy = greedy_decode(model, src, max_len=7)
    model.train()  # decoding switches to eval mode itself and restores the mode
    beam = beam_search(model, src, beam_size=1, max_len=7)
    assert model.training
    assert [h.tokens for h in beam] == greedy
    assert any(len(g) > 0 for g in greedy)


def _sequence_score(model, src, tokens, finished):
    """Log-probability of ``tokens`` (+ EOS if finished) under teacher forcing."""
    tgt = torch.tensor([[BOS] + tokens])
    with torch.no_grad():
        logits = model(src, tgt).logits[0].float()
    logp = forbid_specials(torch.log_softmax(logits, dim=-1), PAD, BOS)
    targets = tokens + [EOS] if finished else tokens
    return float(sum(logp[t, y] for t, y in enumerate(targets)))


def test_exhaustive_beam_finds_the_best_sequence():
    """With a beam as wide as the number of prefixes, beam search is exact search."""
    vocab, max_len = 6, 3
    model = _model(seed=3, vocab=vocab)
    src = _src(batch=1, vocab=vocab, seed=4)
    content = list(range(3, vocab))
    best_score, best = float("-inf"), None
    for length in range(max_len + 1):
        for tokens in itertools.product(content, repeat=length):
            finished = length < max_len
            score = _sequence_score(model, src, list(tokens), finished)
            if score > best_score:
                best_score, best = score, list(tokens)
    # Outputs of max_len steps: n < max_len tokens then EOS, or max_len tokens unfinished.
    hyp = beam_search(model, src, beam_size=(len(content) + 1) ** max_len, max_len=max_len)[0]
    assert hyp.tokens == best
    assert hyp.score == pytest.approx(best_score, abs=1e-4)


def _reverse_set(generator, per_length, vocab, lengths):
    """A fixed toy set: ``per_length`` random sequences of each length and their reversals."""
    batches = []
    for length in lengths:
        src = torch.randint(3, vocab, (per_length, length), generator=generator)
        tgt = src.flip(1)
        tgt_in = torch.cat([torch.full((per_length, 1), BOS), tgt], dim=1)
        tgt_out = torch.cat([tgt, torch.full((per_length, 1), EOS)], dim=1)
        batches.append((src, tgt_in, tgt_out))
    return batches


def test_learns_to_reverse_a_toy_sequence_set():
    vocab = 10
    torch.manual_seed(0)
    model = MoETranslationModel(TranslationConfig(
        vocab_size=vocab, d_model=32, hidden_size=64, dropout=0.0,
        moe={"d_hidden": 64, "num_experts": 4, "k": 2}))
    data = _reverse_set(torch.Generator().manual_seed(1), 16, vocab, range(3, 7))
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    first = None
    for step in range(400):
        src, tgt_in, tgt_out = data[step % len(data)]
        opt.zero_grad()
        parts = compose_loss(model(src, tgt_in), tgt_out, ignore_index=PAD)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        first = first if first is not None else float(parts.cross_entropy.detach())
    model.eval()
    exact = total = 0
    for src, _, _ in data:
        decoded = beam_search(model, src, beam_size=2, max_len=10)
        exact += sum(h.tokens == s.flip(0).tolist() for h, s in zip(decoded, src))
        total += len(src)
    assert first > 2.0  # about ln(10) before training
    assert exact >= 0.8 * total, f"{exact}/{total} sequences reversed exactly"


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(5)
    config = translation_preset("debug-translation", vocab_size=12)
    config.dropout = 0.3
    model = MoETranslationModel(config).train()
    src, tgt = _src(), torch.randint(3, 12, (3, 5))

    def grads():
        model.zero_grad()
        torch.manual_seed(7)
        compose_loss(model(src, tgt[:, :-1]), tgt[:, 1:]).total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_activation_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bad_translation_configs():
    with pytest.raises(ValueError, match="encoder_moe_after"):
        TranslationConfig(vocab_size=10, encoder_layers=2, encoder_moe_after=3)
    with pytest.raises(ValueError, match="TranslationConfig.moe: unknown MoEConfig field"):
        TranslationConfig(vocab_size=10, moe={"d_hidden": 8, "num_experts": 4, "kk": 2})
    with pytest.raises(ValueError, match="non-padding"):
        _model()(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))
