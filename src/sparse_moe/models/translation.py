"""The GNMT-style MoE translation model (paper section 5.3 and appendix E).

Encoder: ``encoder_layers`` LSTMs (``hidden_size`` units projected to ``d_model``; the first
one bidirectional), a MoE after layer ``encoder_moe_after``. Decoder: the first LSTM layer's
output is the attention query; the attention context is concatenated to the input of every
later decoder layer; a MoE after decoder layer ``decoder_moe_after``; residual connections
around every LSTM and MoE layer; one shared vocabulary (and embedding) for both languages.
The MoE uses strictly balanced gating with balancing weights 0.01 by default, and is applied
only to real (non-padding) positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparse_moe.models.config import TranslationConfig
from sparse_moe.models.layers import (
    LSTMLayer,
    ModelOutput,
    MoEFactory,
    MoELayer,
    build_full_moe,
    maybe_checkpoint,
    sum_aux_losses,
)
from sparse_moe.models.lm import init_embedding_and_softmax
from sparse_moe.moe import MoEOutput


@dataclass
class EncoderOutput:
    """The encoder's result, kept fixed while decoding."""

    memory: Tensor  # [B, S, d]
    mask: Tensor  # [B, S] True at real source tokens
    moe_outputs: list[MoEOutput]

    def repeat_beams(self, beam_size: int) -> "EncoderOutput":
        """Each source repeated ``beam_size`` times, beams of one source adjacent."""
        return EncoderOutput(self.memory.repeat_interleave(beam_size, dim=0),
                             self.mask.repeat_interleave(beam_size, dim=0), self.moe_outputs)


class Attention(nn.Module):
    """Scaled dot-product attention with a learned query projection, padding masked."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.scale = 1.0 / math.sqrt(d_model)

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        scores = torch.bmm(self.query(query), memory.transpose(1, 2)) * self.scale
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1), memory)


class MoETranslationModel(nn.Module):
    """``forward(src, tgt_in)`` -> ``ModelOutput`` with ``[B, T, vocab]`` logits.

    ``src`` and ``tgt_in`` are padded ``[B, S]`` / ``[B, T]`` id tensors (``pad_id``);
    ``tgt_in`` starts with ``bos_id``. ``encode`` and ``decode`` are exposed separately so
    that greedy and beam-search decoding (``decoding.py``) run the decoder step by step with
    exactly the same computation as training.
    """

    def __init__(self, config: TranslationConfig,
                 moe_factory: MoEFactory = build_full_moe) -> None:
        super().__init__()
        self.config = config
        d, hidden, p = config.d_model, config.hidden_size, config.dropout
        self.embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.dropout = nn.Dropout(p)
        self.encoder = nn.ModuleList()
        for i in range(config.encoder_layers):
            bidirectional = i == 0 and config.bidirectional_first
            proj = d // 2 if bidirectional else d
            self.encoder.append(LSTMLayer(d, hidden, proj, p, True, bidirectional))
        moe_config = config.moe_config()
        self.encoder_moe = (MoELayer(moe_config, p, moe=moe_factory(moe_config, 0))
                            if config.encoder_moe_after else None)
        self.decoder = nn.ModuleList()
        for i in range(config.decoder_layers):
            d_in = d if i == 0 else 2 * d
            # Later layers take [h; context]; their residual (around h) is added below.
            self.decoder.append(LSTMLayer(d_in, hidden, d, p, residual=i == 0))
        decoder_index = 1 if config.encoder_moe_after else 0
        self.decoder_moe = (MoELayer(moe_config, p, moe=moe_factory(moe_config, decoder_index))
                            if config.decoder_moe_after else None)
        self.attention = Attention(d)
        self.output = nn.Linear(d, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.embedding.weight
        init_embedding_and_softmax(self.embedding, self.output)
        with torch.no_grad():
            self.embedding.weight[config.pad_id].zero_()

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in (self.encoder_moe, self.decoder_moe) if m is not None]

    def _checkpointing(self) -> bool:
        return self.config.activation_checkpointing and self.training

    def encode(self, src: Tensor) -> EncoderOutput:
        if src.dim() != 2:
            raise ValueError(f"MoETranslationModel: expected source ids of shape [batch, time], "
                             f"found shape {tuple(src.shape)}")
        mask = src != self.config.pad_id
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("MoETranslationModel: every source sentence needs at least one "
                             "non-padding token; found an empty one")
        ckpt = self._checkpointing()
        h = self.dropout(self.embedding(src))
        moe_outputs = []
        for i, layer in enumerate(self.encoder, start=1):
            h, _ = maybe_checkpoint(ckpt, layer, h, None, lengths)
            if i == self.config.encoder_moe_after:
                h, out = maybe_checkpoint(ckpt, self.encoder_moe, h, mask)
                moe_outputs.append(out)
        return EncoderOutput(h, mask, moe_outputs)

    def decode(self, tgt_in: Tensor, encoded: EncoderOutput,
               state: list[Any] | None = None) -> ModelOutput:
        """Runs the decoder over ``tgt_in`` (``[B, T]``) from ``state`` (None: the start)."""
        ckpt = self._checkpointing()
        mask = tgt_in != self.config.pad_id
        h = self.dropout(self.embedding(tgt_in))
        new_state: list[Any] = []
        moe_outputs: list[MoEOutput] = []
        context = None
        for i, layer in enumerate(self.decoder, start=1):
            layer_state = state[i - 1] if state is not None else None
            if i == 1:
                h, s = maybe_checkpoint(ckpt, layer, h, layer_state)
                context = self.attention(h, encoded.memory, encoded.mask)
            else:
                out, s = maybe_checkpoint(ckpt, layer, torch.cat([h, context], dim=-1),
                                          layer_state)
                h = out + h
            new_state.append(s)
            if i == self.config.decoder_moe_after:
                h, out = maybe_checkpoint(ckpt, self.decoder_moe, h, mask)
                moe_outputs.append(out)
        logits = self.output(h)
        return ModelOutput(logits, sum_aux_losses(moe_outputs, logits), moe_outputs, new_state)

    def forward(self, src: Tensor, tgt_in: Tensor) -> ModelOutput:
        encoded = self.encode(src)
        decoded = self.decode(tgt_in, encoded)
        moe_outputs = encoded.moe_outputs + decoded.moe_outputs
        aux = sum_aux_losses(moe_outputs, decoded.logits)
        return ModelOutput(decoded.logits, aux, moe_outputs, None)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.config.activation_checkpointing = enabled

    @staticmethod
    def reorder_state(state: list[Any], index: Tensor) -> list[Any]:
        """Selects batch rows ``index`` of every LSTM state (beam search reordering)."""
        return [tuple(t.index_select(1, index) for t in s) for s in state]
