"""Decoding: greedy and beam search for the translation model, sampling from the LM.

All of them run the models' own ``decode``/``forward`` one step at a time with the recurrent
state carried over, so a decoded step computes exactly what teacher forcing computes. They
run the model in eval mode (no dropout, no gating noise, inference thresholds for strictly
balanced gating) and restore its mode afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

# The models are annotated as modules: ``MoETranslationModel`` (its ``config``, ``encode``,
# ``decode`` and ``reorder_state``) and ``MoELSTMLanguageModel`` (its forward with a carried
# state). Importing them here would close an import cycle: the models call these functions.
TranslationModel = nn.Module
LanguageModel = nn.Module


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS, without EOS
    score: float  # summed log-probability (EOS included when emitted)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout, no gating noise, inference-time strict gating), then restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


FinishedTest = Callable[[Tensor], bool]


def locally_finished(finished: Tensor) -> bool:
    """Stop when every sequence of this batch has finished."""
    return bool(finished.all())


@torch.no_grad()
def greedy_decode(model: TranslationModel, src: Tensor, max_len: int,
                  all_finished: FinishedTest = locally_finished) -> list[list[int]]:
    """The most likely next token at every step, until EOS or ``max_len`` tokens.

    ``all_finished(finished)`` decides when to stop; a distributed caller passes one that
    agrees across ranks, because MoE layers run collectives that every rank must join.
    """
    with eval_mode(model):
        return _greedy(model, src, max_len, all_finished)


def _greedy(model: TranslationModel, src: Tensor, max_len: int,
            all_finished: FinishedTest) -> list[list[int]]:
    cfg = model.config
    encoded = model.encode(src)
    batch = src.shape[0]
    prev = torch.full((batch, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    emitted = []
    state = None
    for _ in range(max_len):
        step = model.decode(prev, encoded, state)
        state = step.state
        logits = forbid_specials(step.logits[:, -1].float(), cfg.pad_id, cfg.bos_id)
        token = logits.argmax(dim=-1).masked_fill(finished, cfg.pad_id)
        emitted.append(token)
        finished |= token == cfg.eos_id
        if all_finished(finished):
            break
        prev = token.masked_fill(finished, cfg.pad_id).unsqueeze(1)
    rows = torch.stack(emitted, dim=1).tolist() if emitted else [[] for _ in range(batch)]
    return [_until_end(row, cfg.eos_id, cfg.pad_id) for row in rows]


def _until_end(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    out = []
    for t in tokens:
        if t in (eos_id, pad_id):
            break
        out.append(t)
    return out


def forbid_specials(scores: Tensor, pad_id: int, bos_id: int) -> Tensor:
    """Scores with padding and BOS made impossible as outputs (not renormalised)."""
    scores = scores.clone()
    scores[..., [pad_id, bos_id]] = float("-inf")
    return scores


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalisation ``((5 + |Y|) / 6) ** alpha`` (1 when ``alpha`` is 0)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: TranslationModel, src: Tensor, beam_size: int, max_len: int,
                alpha: float = 0.0,
                all_finished: FinishedTest = locally_finished) -> list[Hypothesis]:
    """The best of ``beam_size`` beams per source sentence, GNMT length penalty ``alpha``.

    Finished beams stay in the beam with their score frozen (they can only be extended by
    padding at no cost), so with ``beam_size=1`` and ``alpha=0`` this is greedy decoding.
    ``all_finished`` decides when to stop (see ``greedy_decode``).
    """
    if beam_size < 1:
        raise ValueError(f"beam_search: expected beam_size >= 1, found {beam_size}")
    with eval_mode(model):
        return _beam_search(model, src, beam_size, max_len, alpha, all_finished)


def _beam_search(model: TranslationModel, src: Tensor, beam_size: int, max_len: int,
                 alpha: float, all_finished: FinishedTest) -> list[Hypothesis]:
    cfg = model.config
    device = src.device
    batch, k = src.shape[0], beam_size
    encoded = model.encode(src).repeat_beams(k)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical; keep one so the first step does not tie
    tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    prev = torch.full((batch * k, 1), cfg.bos_id, dtype=torch.long, device=device)
    state = None
    for _ in range(max_len):
        step = model.decode(prev, encoded, state)
        logp = torch.log_softmax(step.logits[:, -1].float(), dim=-1)
        logp = forbid_specials(logp, cfg.pad_id, cfg.bos_id).view(batch, k, -1)
        vocab = logp.shape[-1]
        # A finished beam continues only with padding, at no cost.
        frozen = torch.full_like(logp, float("-inf"))
        frozen[..., cfg.pad_id] = 0.0
        logp = torch.where(finished.unsqueeze(-1), frozen, logp)
        candidates = (scores.unsqueeze(-1) + logp).view(batch, k * vocab)
        scores, flat_idx = candidates.topk(k, dim=-1)
        beam_idx, token = flat_idx // vocab, flat_idx % vocab
        tokens = torch.cat([tokens.gather(1, beam_idx.unsqueeze(-1).expand_as(tokens)),
                            token.unsqueeze(-1)], dim=-1)
        was_finished = finished.gather(1, beam_idx)
        lengths = lengths.gather(1, beam_idx) + (~was_finished).long()
        finished = was_finished | (token == cfg.eos_id)
        rows = (beam_idx + torch.arange(batch, device=device).unsqueeze(1) * k).view(-1)
        state = model.reorder_state(step.state, rows)
        if all_finished(finished):
            break
        prev = token.view(-1, 1)
    return [_best(tokens[b], scores[b], lengths[b], finished[b], alpha, cfg.eos_id, cfg.pad_id)
            for b in range(batch)]


def _best(tokens: Tensor, scores: Tensor, lengths: Tensor, finished: Tensor, alpha: float,
          eos_id: int, pad_id: int) -> Hypothesis:
    normalised = [float(scores[i]) / length_penalty(int(lengths[i]), alpha)
                  for i in range(tokens.shape[0])]
    best = max(range(len(normalised)), key=lambda i: normalised[i])
    return Hypothesis(_until_end(tokens[best].tolist(), eos_id, pad_id), float(scores[best]))


@torch.no_grad()
def sample_lm(model: LanguageModel, prompt: Tensor, max_new_tokens: int,
              temperature: float = 1.0, top_k: int | None = None,
              generator: torch.Generator | None = None, eos_id: int | None = None) -> Tensor:
    """Samples ``max_new_tokens`` tokens after ``prompt`` (``[B, T0]``); returns ``[B, T0 + n]``.

    ``temperature`` 0 means greedy; ``top_k`` restricts sampling to the k likeliest tokens.
    Sequences that emitted ``eos_id`` continue with ``eos_id``.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"sample_lm: expected a prompt of shape [batch, time>=1], "
                         f"found {tuple(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"sample_lm: expected temperature >= 0, found {temperature}")
    with eval_mode(model):
        return _sample(model, prompt, max_new_tokens, temperature, top_k, generator, eos_id)


def _sample(model: LanguageModel, prompt: Tensor, max_new_tokens: int,
            temperature: float, top_k: int | None, generator: torch.Generator | None,
            eos_id: int | None) -> Tensor:
    out = model(prompt)
    state, logits = out.state, out.logits[:, -1]
    generated = [prompt]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_k, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        generated.append(token.unsqueeze(1))
        out = model(token.unsqueeze(1), state)
        state, logits = out.state, out.logits[:, -1]
    return torch.cat(generated, dim=1)


class TextTokenizer(Protocol):
    """What ``sample_text`` needs: SentencePiece's ``encode``/``decode`` of plain ids."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@torch.no_grad()
def sample_text(model: LanguageModel, tokenizer: TextTokenizer, prompt: str,
                max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                seed: int | None = None, eos_id: int | None = None,
                bos_id: int | None = None) -> str:
    """Continues ``prompt`` with sampled text (the prompt itself is not repeated).

    ``tokenizer`` is a ``sentencepiece.SentencePieceProcessor`` or anything with the same
    ``encode``/``decode``; ``bos_id`` is prepended when the model was trained with one.
    Generation stops at ``eos_id``.
    """
    ids = ([bos_id] if bos_id is not None else []) + list(tokenizer.encode(prompt))
    if not ids:
        raise ValueError("sample_text: the prompt encodes to no tokens; give a non-empty "
                         "prompt or a bos_id")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = sample_lm(model, torch.tensor([ids], device=device), max_new_tokens, temperature,
                    top_k, generator, eos_id)
    new = out[0, len(ids):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id)]
    return tokenizer.decode(new)


def _pick(logits: Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
