"""An estimate of the activation memory of one micro-batch, layer by layer.

Counts the tensors each layer keeps for its backward pass, per token (``N`` tokens in the
micro-batch, element size ``b``): an LSTM its gates, cell and output (``4h + 2h + r``); a MoE
its gating logits and load estimator (about five per expert of the gates a token meets), and
for every expert a token uses its input row, hidden row and output rows (plus the rows the
all-to-all receives when the experts are spread); the softmax its logits, their fp32 copy,
the log-probabilities and, during backward, their gradient (``N x vocab`` each, which is why
the paper trained with a sampled softmax; with ``softmax.kind: sampled``, ``N x candidates``).
Dropout masks and residual sums add a few ``d`` per token. With activation checkpointing
every layer keeps only its input; its own activations exist again while it is recomputed, one layer at a time.

This is an estimate (autograd's exact set of saved tensors differs by kernel and device);
``docs/benchmarks.md`` compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_moe.models import LMConfig, TranslationConfig
from sparse_moe.models.budget import sampled_columns
from sparse_moe.moe import MoEConfig

GATE_TENSORS_PER_EXPERT = 5  # clean and noisy logits, noise std, load probability, its CDF
MASK_BYTES = 1


@dataclass(frozen=True)
class ActivationEstimate:
    without_checkpointing: int
    with_checkpointing: int


def lstm_bytes(tokens: int, hidden: int, out: int, directions: int, b: int) -> int:
    return tokens * directions * (6 * hidden + out) * b + tokens * out * directions * (
        2 * b + MASK_BYTES)


def moe_bytes(tokens: int, config: MoEConfig, ep_size: int, b: int) -> int:
    if config.hierarchical:
        gate_width = config.num_groups + config.k_primary * config.experts_per_group
    else:
        gate_width = config.num_experts
    gates = GATE_TENSORS_PER_EXPERT * tokens * gate_width * 4  # gates run in fp32
    rows = tokens * config.experts_per_token
    hidden = config.d_hidden * config.expert_hidden_layers
    experts = rows * (config.d_model + hidden + 2 * config.d_out) * b
    exchanged = rows * (config.d_model + config.d_out) * b if ep_size > 1 else 0
    tail = tokens * config.d_out * (3 * b + MASK_BYTES)  # sigmoid, dropout, residual
    return gates + experts + exchanged + tail


def softmax_bytes(tokens: int, d_in: int, vocab: int, b: int) -> int:
    """Logits (model dtype), their fp32 copy (half precision only), log-probabilities and
    their gradient (fp32), and the gradient of the softmax input."""
    copies = 3 if b == 4 else 4
    return tokens * vocab * (b + (copies - 1) * 4) + tokens * d_in * b


def _combine(layers: list[int], boundaries: int, softmax: int) -> ActivationEstimate:
    return ActivationEstimate(sum(layers) + boundaries + softmax,
                              boundaries * (len(layers) + 1) + max(layers, default=0) + softmax)


def lm_activations(config: LMConfig, moe_configs: list[MoEConfig], tokens: int,
                   ep_size: int, b: int) -> ActivationEstimate:
    d = config.d_model
    layers, moes, width = [], iter(moe_configs), d
    for layer in config.layers:
        if layer.kind == "lstm":
            out = layer.proj_size or layer.hidden_size
            layers.append(lstm_bytes(tokens, layer.hidden_size, out, 1, b))
        elif layer.kind == "moe":
            moe = next(moes)
            layers.append(moe_bytes(tokens, moe, ep_size, b))
            out = moe.d_out
        else:
            hidden = layer.hidden_size * layer.hidden_layers
            layers.append(tokens * (hidden + 3 * width) * b + tokens * width * MASK_BYTES)
            out = width
        width = out
    embedding = tokens * d * (b + MASK_BYTES)
    return _combine(layers, embedding, lm_softmax_bytes(config, tokens, width, b))


def lm_softmax_bytes(config: LMConfig, tokens: int, d_in: int, b: int) -> int:
    """The training softmax: over the vocabulary, or (sampled) over the target and the shared
    candidates, with the gathered candidate and target rows of the softmax matrix and the
    accidental-hit mask."""
    samples = sampled_columns(config)
    if samples is None:
        return softmax_bytes(tokens, d_in, config.vocab_size, b)
    gathered = (samples + tokens) * d_in * b
    return softmax_bytes(tokens, d_in, samples + 1, b) + gathered + tokens * samples * MASK_BYTES


def translation_activations(config: TranslationConfig, moe: MoEConfig, tokens: int,
                            ep_size: int, b: int) -> ActivationEstimate:
    """``tokens`` padded positions on each side (``data.max_tokens``)."""
    d, hidden = config.d_model, config.hidden_size
    layers = []
    for i in range(config.encoder_layers):
        bidirectional = i == 0 and config.bidirectional_first
        layers.append(lstm_bytes(tokens, hidden, d // 2 if bidirectional else d,
                                 2 if bidirectional else 1, b))
    for i in range(config.decoder_layers):
        layers.append(lstm_bytes(tokens, hidden, d, 1, b) + (tokens * 2 * d * b if i else 0))
    layers += [moe_bytes(tokens, moe, ep_size, b)] * sum(
        1 for after in (config.encoder_moe_after, config.decoder_moe_after) if after)
    attention = 3 * tokens * d * b
    boundaries = 2 * tokens * d * (b + MASK_BYTES) + attention
    return _combine(layers, boundaries, softmax_bytes(tokens, d, config.vocab_size, b))
