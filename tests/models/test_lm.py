"""The MoE-LSTM language model against a hand-written dense reference, plus training checks."""

from pathlib import Path

import pytest
import torch

from sparse_moe.models import (
    LayerConfig,
    LMConfig,
    MoELSTMLanguageModel,
    compose_loss,
    lm_preset,
    sample_lm,
    sample_text,
)


def _manual_lstm(lstm, x):
    """The LSTM recurrence written out (gate order i, f, g, o), batch-first, zero start."""
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    batch, steps, _ = x.shape
    h = x.new_zeros(batch, lstm.hidden_size)
    c = x.new_zeros(batch, lstm.hidden_size)
    outs = []
    for t in range(steps):
        i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def _manual_moe(moe, x):
    """Each token on its own: top-k of x W_g, softmax over the kept logits, k expert FFNs."""
    cfg = moe.config
    w1, w2 = moe.experts.weights
    if moe.experts.biases is not None:
        b1, b2 = moe.experts.biases
    else:
        b1, b2 = torch.zeros(len(w1), w1.shape[2]), torch.zeros(len(w2), w2.shape[2])
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for n, token in enumerate(flat):
        top = (token @ moe.router.w_gate).topk(cfg.k)
        gates = torch.softmax(top.values, dim=-1)
        for gate, e in zip(gates, top.indices):
            hidden = torch.relu(token @ w1[e] + b1[e])
            flat_out[n] += gate * (hidden @ w2[e] + b2[e])
    return torch.sigmoid(out)


def test_forward_matches_dense_reference():
    torch.manual_seed(0)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=40)).double().eval()
    moe = model.moe_layers[0].moe
    with torch.no_grad():  # a trained-looking gate, so that routing differs between tokens
        moe.router.w_gate.normal_()
    tokens = torch.randint(0, 40, (3, 7))
    out = model(tokens)
    with torch.no_grad():
        h = model.embedding.weight[tokens]
        h = _manual_lstm(model.layers[0].lstm, h) + h
        h = _manual_moe(moe, h) + h
        h = _manual_lstm(model.layers[2].lstm, h) + h
        expected = h @ model.output.weight.T + model.output.bias
    assert out.logits.shape == (3, 7, 40)
    torch.testing.assert_close(out.logits, expected)
    assert len(out.moe_outputs) == 1 and out.moe_outputs[0].counts.sum() == 3 * 7 * 2


def test_state_carries_over_between_chunks():
    torch.manual_seed(1)
    model = MoELSTMLanguageModel(lm_preset("debug-moe-h", vocab_size=30)).eval()
    tokens = torch.randint(0, 30, (2, 9))
    whole = model(tokens).logits
    first = model(tokens[:, :4])
    second = model(tokens[:, 4:], model.detach_state(first.state))
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole)


def test_mask_keeps_padding_out_of_the_experts():
    torch.manual_seed(2)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=30)).eval()
    tokens = torch.randint(0, 29, (2, 6))  # 29 is kept for padding
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(tokens, mask=mask)
    assert int(out.moe_outputs[0].counts.sum()) == 10 * 2  # 10 real tokens, k=2
    full = model(tokens)
    model.config.pad_id = 29
    tokens[0, 4:] = 29
    by_pad = model(tokens)
    assert int(by_pad.moe_outputs[0].counts.sum()) == 10 * 2
    torch.testing.assert_close(by_pad.logits[0, :4], full.logits[0, :4])
    # Positions before the padding see exactly what they see without a mask.
    torch.testing.assert_close(out.logits[0, :4], full.logits[0, :4])
    torch.testing.assert_close(out.logits[1], full.logits[1])


def _grads(model, tokens, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    parts = compose_loss(model(tokens[:, :-1]), tokens[:, 1:])
    parts.total.backward()
    return parts.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


@pytest.mark.parametrize("preset", ["debug-moe", "debug-moe-h", "debug-dense"])
def test_activation_checkpointing_gives_the_same_gradients(preset):
    torch.manual_seed(3)
    config = lm_preset(preset, vocab_size=30)
    config.dropout = 0.3  # dropout and gating noise must be replayed identically
    model = MoELSTMLanguageModel(config).train()
    tokens = torch.randint(0, 30, (3, 8))
    loss_plain, plain = _grads(model, tokens, seed=11)
    model.set_activation_checkpointing(True)
    loss_ckpt, ckpt = _grads(model, tokens, seed=11)
    assert loss_plain == loss_ckpt
    assert plain.keys() == ckpt.keys() and len(plain) > 5
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("preset", ["debug-moe", "debug-moe-h", "debug-dense", "debug-4xlstm"])
def test_tiny_model_overfits_a_tiny_batch(preset):
    torch.manual_seed(4)
    model = MoELSTMLanguageModel(lm_preset(preset, vocab_size=30))
    tokens = torch.randint(0, 30, (4, 12), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        opt.zero_grad()
        parts = compose_loss(model(tokens[:, :-1]), tokens[:, 1:])
        parts.total.backward()
        opt.step()
    # ln(30) = 3.4 at the start; memorising 44 tokens takes it well below 1.
    assert float(parts.cross_entropy.detach()) < 0.5


def test_greedy_sampling_picks_the_argmax_of_a_full_forward():
    torch.manual_seed(6)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=30)).eval()
    prompt = torch.randint(0, 30, (2, 3))
    out = sample_lm(model, prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], prompt)
    logits = model(out).logits
    torch.testing.assert_close(out[:, 3:], logits[:, 2:-1].argmax(dim=-1), rtol=0, atol=0)


def test_sampling_is_reproducible_and_respects_top_k():
    torch.manual_seed(7)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=30)).eval()
    prompt = torch.randint(0, 30, (4, 2))
    a = model.generate(prompt, 8, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 8, temperature=0.0)
    torch.testing.assert_close(a, greedy, rtol=0, atol=0)
    b = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(9))
    c = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(b, c)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match=r"LMConfig.layers\[1\]: unknown LayerConfig field"):
        LMConfig.from_dict({"vocab_size": 10, "layers": [
            {"kind": "lstm", "hidden_size": 8}, {"kind": "moe", "moes": {}}]})
    with pytest.raises(ValueError, match="LayerConfig.kind"):
        LayerConfig(kind="gru", hidden_size=4)
    with pytest.raises(ValueError, match="bidirectional"):
        LMConfig(vocab_size=10, layers=[LayerConfig(kind="lstm", hidden_size=4,
                                                    bidirectional=True)])
    with pytest.raises(ValueError, match="LayerConfig.moe: unknown MoEConfig field"):
        MoELSTMLanguageModel(LMConfig(vocab_size=10, d_model=8, layers=[
            LayerConfig(kind="moe", moe={"d_hidden": 8, "num_experts": 2, "top_k": 1})]))
    with pytest.raises(ValueError, match=r"shape \[batch, time\]"):
        MoELSTMLanguageModel(lm_preset("debug-moe"))(torch.zeros(5, dtype=torch.long))


def _sentencepiece(tmp_path):
    import sentencepiece as spm

    data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2"
    lines = [ln for ln in (data / "train.txt").read_text(encoding="utf-8").splitlines()[:3000]
             if ln.strip()]
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=300, model_type="unigram", bos_id=-1,
                                   eos_id=2, unk_id=1, pad_id=0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def test_sample_text_continues_a_memorised_sentence(tmp_path):
    sp = _sentencepiece(tmp_path)
    sentence = "the game was released in japan in january 2011 ."
    ids = sp.encode(sentence) + [sp.eos_id()]
    torch.manual_seed(8)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=sp.get_piece_size()))
    tokens = torch.tensor([ids])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        compose_loss(model(tokens[:, :-1]), tokens[:, 1:]).total.backward()
        opt.step()
    prompt = "the game was"
    prompt_ids = sp.encode(prompt)
    assert ids[:len(prompt_ids)] == prompt_ids  # the prompt is a prefix of the sentence
    text = sample_text(model, sp, prompt, max_new_tokens=30, temperature=0.0,
                       eos_id=sp.eos_id())
    assert (prompt + " " + text).split() == sentence.split()
    assert model.training  # restored after sampling


def test_moe_overrides_replace_every_moe_layers_fields():
    """An ablation of a preset: the overrides win over the layer's own (and default) fields."""
    config = LMConfig(vocab_size=50, d_model=8, layers=[
        LayerConfig(kind="moe", moe={"d_hidden": 16, "num_experts": 4, "k": 2, "w_load": 0.5}),
        LayerConfig(kind="lstm", hidden_size=8),
        LayerConfig(kind="moe", moe={"d_hidden": 16, "num_experts": 2, "k": 1})],
        moe_overrides={"w_importance": 0.0, "w_load": 0.0})
    model = MoELSTMLanguageModel(config)
    configs = [layer.moe.config for layer in model.moe_layers]
    assert [(c.w_importance, c.w_load) for c in configs] == [(0.0, 0.0), (0.0, 0.0)]
    assert [c.num_experts for c in configs] == [4, 2]
    assert all(c.output_sigmoid for c in configs)  # the LM default still applies
    # Zero weights: the auxiliary loss is exactly zero although the gates are unbalanced.
    out = model(torch.randint(0, 50, (3, 5)))
    assert all(float(o.aux_loss.detach()) == 0.0 for o in out.moe_outputs)


def test_bad_moe_overrides_fail_when_the_config_is_made():
    with pytest.raises(ValueError, match="w_load"):
        LMConfig(vocab_size=50, d_model=8, layers=[
            LayerConfig(kind="moe", moe={"d_hidden": 16, "num_experts": 4, "k": 2})],
            moe_overrides={"w_load": -1.0})
    with pytest.raises(ValueError, match="moe_overrides"):
        LMConfig(vocab_size=50, d_model=8, layers=[LayerConfig(kind="lstm", hidden_size=8)],
                 moe_overrides=[1, 2])
