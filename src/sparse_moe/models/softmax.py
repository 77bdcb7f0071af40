"""The output softmax: exact, or importance-sampled for training over a large vocabulary.

At the 1B-word benchmark's 793,471 words the full softmax is about 3 MB of fp32 logits per
token, and the backward pass keeps several such tensors. The paper's language models were
trained with a sampled softmax instead (appendix C; Jean et al. 2015): each micro-batch
scores its true targets and one shared set of candidate words drawn from a proposal
``Q``, with each logit corrected by ``-log`` of the word's expected count under ``Q``, so
that ``logsumexp`` over the candidates estimates the full normaliser. Sharing the
candidates across the micro-batch makes the sampled logits one dense product
``[tokens, d] x [d, candidates]``.

The proposal is log-uniform (Zipfian) over ids sorted by frequency, as word vocabularies
are here (``data_prep lm1b`` writes the most frequent word first):
``Q(i) = log((i + 2) / (i + 1)) / log(V + 1)``. Candidates are drawn with replacement and
deduplicated, so a word is in the set with probability ``1 - (1 - Q(i))^S`` after ``S``
draws, and that is its expected count (as TensorFlow's ``sampled_softmax_loss`` with
unique candidates). A candidate equal to a token's own target (an accidental hit) is
removed from that token's normaliser, since the target is always scored. With
``num_samples >= vocab_size`` every word is a candidate with expected count 1 and the loss
is the full softmax's exactly.

Evaluation always uses the exact full softmax, over chunks of tokens small enough that the
logits of a whole batch never exist at once (``chunked_nll``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_moe.config_io import from_dict

SOFTMAX_KINDS = ("full", "sampled")
PROPOSALS = ("log_uniform",)


@dataclass
class SoftmaxConfig:
    """How the language model's training loss normalises over the vocabulary.

    ``full``: the exact softmax (the default). ``sampled``: the importance-sampled softmax
    over ``num_samples`` candidate draws shared by the micro-batch; the targets are always
    scored. Evaluation is exact in both cases, over chunks of at most
    ``eval_chunk_mib`` of fp32 logits.
    """

    kind: str = "full"  # full or sampled (training only; evaluation is always exact)
    num_samples: int = 8192  # sampled: candidate draws per micro-batch (shared by its tokens)
    proposal: str = "log_uniform"  # sampled: the candidates' distribution over frequency-sorted ids
    eval_chunk_mib: int = 256  # evaluation: the largest block of fp32 logits computed at once

    def __post_init__(self) -> None:
        _require(self.kind in SOFTMAX_KINDS, "SoftmaxConfig.kind", f"one of {SOFTMAX_KINDS}",
                 self.kind)
        _require(self.proposal in PROPOSALS, "SoftmaxConfig.proposal", f"one of {PROPOSALS}",
                 self.proposal)
        _require(self.num_samples >= 1, "SoftmaxConfig.num_samples", "a positive integer",
                 self.num_samples)
        _require(self.eval_chunk_mib >= 1, "SoftmaxConfig.eval_chunk_mib", "a positive integer",
                 self.eval_chunk_mib)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "SoftmaxConfig") -> "SoftmaxConfig":
        return from_dict(cls, values, source)

    def eval_chunk_tokens(self, vocab_size: int) -> int:
        """Tokens per evaluation chunk: ``eval_chunk_mib`` of fp32 logits, at least one token."""
        return max(1, (self.eval_chunk_mib << 20) // (4 * vocab_size))


def log_uniform_log_probs(ids: Tensor, vocab_size: int) -> Tensor:
    """``log Q(i)`` of the log-uniform proposal, in fp64 (fp32 loses the rare words' mass)."""
    ids = ids.to(torch.float64)
    return torch.log(torch.log1p(1.0 / (ids + 1.0))) - math.log(math.log(vocab_size + 1.0))


def draw_log_uniform(num_samples: int, vocab_size: int, device: torch.device) -> Tensor:
    """``num_samples`` ids drawn with replacement from the log-uniform proposal.

    The inverse CDF is closed-form: ``floor(exp(u log(V + 1))) - 1`` for ``u ~ U[0, 1)``.
    Drawn from the default generator, which the trainer seeds per step, micro-step and rank.
    """
    u = torch.rand(num_samples, device=device, dtype=torch.float64)
    ids = torch.floor(torch.exp(u * math.log(vocab_size + 1.0))).long() - 1
    return ids.clamp_(0, vocab_size - 1)


def log_expected_counts(ids: Tensor, vocab_size: int, num_samples: int) -> Tensor:
    """``log(1 - (1 - Q(i))^S)``: the log-probability that ``S`` draws include word ``i``."""
    log_q = log_uniform_log_probs(ids, vocab_size)
    included = -torch.expm1(num_samples * torch.log1p(-log_q.exp()))
    return included.log()


@dataclass
class Candidates:
    """A micro-batch's shared candidates and the log of their expected counts."""

    ids: Tensor  # [C] distinct word ids
    log_counts: Tensor  # [C] fp32

    @classmethod
    def draw(cls, config: SoftmaxConfig, vocab_size: int, device: torch.device) -> "Candidates":
        if config.num_samples >= vocab_size:  # every word, each certain: the exact softmax
            ids = torch.arange(vocab_size, device=device)
            return cls(ids, torch.zeros(vocab_size, device=device))
        ids = torch.unique(draw_log_uniform(config.num_samples, vocab_size, device))
        return cls(ids, log_expected_counts(ids, vocab_size, config.num_samples).float())

    def log_counts_of(self, targets: Tensor, vocab_size: int, num_samples: int) -> Tensor:
        """The targets' own correction, from the same proposal (zero when every word is in)."""
        if num_samples >= vocab_size:
            return torch.zeros(targets.shape, device=targets.device)
        return log_expected_counts(targets, vocab_size, num_samples).float()


def sampled_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                candidates: Candidates, config: SoftmaxConfig) -> Tensor:
    """Per-token negative log-likelihood under the sampled softmax, ``[N]``, at least fp32.

    ``hidden`` is ``[N, d]`` (counted tokens only), ``weight`` the ``[V, d]`` softmax matrix
    (perhaps the embedding), ``targets`` ``[N]``. Logits are ``h . w_i + b_i - log E[count_i]``
    for the target and every candidate; a candidate equal to the token's target is masked.
    """
    vocab_size, num_tokens = weight.shape[0], targets.shape[0]
    # One gather of the target and candidate rows: its backward is one scatter into a
    # [V, d] gradient, not one per gather and their sum.
    rows = torch.cat([targets, candidates.ids])
    gathered = weight[rows]
    true_logits = _at_least_fp32((hidden * gathered[:num_tokens]).sum(-1))
    sampled = _at_least_fp32(hidden @ gathered[num_tokens:].t())
    if bias is not None:
        gathered_bias = bias[rows]
        true_logits = true_logits + gathered_bias[:num_tokens]
        sampled = sampled + gathered_bias[num_tokens:]
    true_logits = true_logits - candidates.log_counts_of(targets, vocab_size, config.num_samples)
    sampled = sampled - candidates.log_counts
    accidental = targets[:, None] == candidates.ids[None, :]
    sampled = sampled.masked_fill(accidental, float("-inf"))
    normaliser = torch.logsumexp(torch.cat([true_logits[:, None], sampled], dim=1), dim=1)
    return normaliser - true_logits


def full_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood under the exact softmax, ``[N]``, at least fp32."""
    return F.cross_entropy(_at_least_fp32(F.linear(hidden, weight, bias)), targets, reduction="none")


def chunked_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int) -> Tensor:
    """``full_nll`` over blocks of ``chunk_tokens`` tokens, without gradients (evaluation):
    at most ``chunk_tokens x V`` logits exist at any time."""
    with torch.no_grad():
        return torch.cat([full_nll(hidden[i:i + chunk_tokens], weight, bias,
                                   targets[i:i + chunk_tokens])
                          for i in range(0, hidden.shape[0], chunk_tokens)])


def token_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
              config: SoftmaxConfig, training: bool, ignore_index: int = -100) -> Tensor:
    """Per-position negative log-likelihood ``[...]`` (targets' shape; 0 where ignored).

    Training with ``kind: sampled`` uses the sampled softmax; everything else is exact, in
    chunks when no gradient is needed.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != ignore_index).nonzero().squeeze(1)
    rows, labels = flat_hidden[counted], flat_targets[counted]
    if training and config.kind == "sampled":
        candidates = Candidates.draw(config, weight.shape[0], hidden.device)
        nll = sampled_nll(rows, weight, bias, labels, candidates, config)
    elif torch.is_grad_enabled():
        nll = full_nll(rows, weight, bias, labels)
    else:
        nll = chunked_nll(rows, weight, bias, labels, config.eval_chunk_tokens(weight.shape[0]))
    out = nll.new_zeros(flat_targets.shape)
    return out.index_copy(0, counted, nll).reshape(targets.shape)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision logits in fp32 (the normaliser needs it); fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _require(ok: bool, name: str, expected: str, found: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, found {found!r}")
