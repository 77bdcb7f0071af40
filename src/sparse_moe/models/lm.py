"""The paper's MoE-LSTM language model and its compute-matched dense baselines.

embedding -> dropout -> [LSTM | MoE | FFN layers, each with dropout and a residual] ->
softmax. The paper's model (section 5.1, appendix C) is LSTM-512 -> MoE -> LSTM-512 with a
sigmoid on the MoE output; the dense baselines replace the MoE by LSTMs (4xLSTM-512), one
projected LSTM (LSTM-2048-512) or a single wide or deep expert (MoE-1-Wide, MoE-1-Deep).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_moe.models.config import LayerConfig, LMConfig
from sparse_moe.models.decoding import sample_lm
from sparse_moe.models.layers import (
    FFNLayer,
    LSTMLayer,
    LSTMState,
    ModelOutput,
    MoEFactory,
    MoELayer,
    build_full_moe,
    maybe_checkpoint,
    sum_aux_losses,
)
from sparse_moe.models.softmax import token_nll

LM_MOE_DEFAULTS = {"output_sigmoid": True}


def init_embedding_and_softmax(embedding: nn.Embedding, output: nn.Linear) -> None:
    """Small uniform embedding (as PyTorch's word-language-model example) and a zero softmax bias.

    A unit-variance embedding shared with the softmax makes an untrained model predict its
    input token with near certainty; a small one starts from a near-uniform prediction.
    """
    nn.init.uniform_(embedding.weight, -0.1, 0.1)
    if output.weight is not embedding.weight:
        nn.init.uniform_(output.weight, -0.1, 0.1)
    if output.bias is not None:
        nn.init.zeros_(output.bias)


class MoELSTMLanguageModel(nn.Module):
    """A stack of LSTM, MoE and FFN layers between an embedding and a softmax.

    ``forward(tokens, state=None, mask=None)`` takes ``[B, T]`` token ids (and optionally a
    ``[B, T]`` bool mask of real tokens; by default ``tokens != pad_id`` when the config
    names a ``pad_id``, else every position counts) and returns a
    ``ModelOutput`` with ``[B, T, vocab]`` logits, the summed balancing loss, the per-layer
    ``MoEOutput`` list and the new recurrent state (one ``(h, c)`` per LSTM layer, ``None``
    for other layers), so text can be generated one step at a time. Given ``targets``
    (``[B, T]``, -100 where not counted) it returns their negative log-likelihood instead of
    logits: sampled in training with ``softmax.kind: sampled``, exact otherwise.

    ``moe_factory`` builds each MoE layer's MoE (see ``MoEFactory``; all experts by default).
    """

    def __init__(self, config: LMConfig, moe_factory: MoEFactory = build_full_moe) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList()
        width = config.d_model
        for layer_config in config.layers:
            layer = self._build_layer(layer_config, width, moe_factory)
            self.layers.append(layer)
            width = layer.d_out
        if width != config.d_model and config.tie_embeddings:
            raise ValueError(f"LMConfig.tie_embeddings: the last layer's width {width} must equal "
                             f"d_model={config.d_model} to share the embedding")
        self.output = nn.Linear(width, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.embedding.weight
        init_embedding_and_softmax(self.embedding, self.output)

    def _build_layer(self, layer: LayerConfig, width: int, moe_factory: MoEFactory) -> nn.Module:
        cfg = self.config
        if layer.kind == "lstm":
            return LSTMLayer(width, layer.hidden_size, layer.proj_size, cfg.dropout, cfg.residual)
        if layer.kind == "ffn":
            return FFNLayer(width, layer.hidden_size, layer.hidden_layers, layer.output_sigmoid,
                            cfg.dropout, cfg.residual)
        moe = layer.moe_config(width, cfg.moe_overrides, **LM_MOE_DEFAULTS)
        index = sum(isinstance(built, MoELayer) for built in self.layers)
        return MoELayer(moe, cfg.dropout, cfg.residual, moe_factory(moe, index))

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [layer for layer in self.layers if isinstance(layer, MoELayer)]

    def forward(self, tokens: Tensor, state: list[Any] | None = None,
                mask: Tensor | None = None, targets: Tensor | None = None) -> ModelOutput:
        if tokens.dim() != 2:
            raise ValueError(f"MoELSTMLanguageModel: expected token ids of shape [batch, time], "
                             f"found shape {tuple(tokens.shape)}")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"MoELSTMLanguageModel state: expected {len(self.layers)} entries "
                             f"(one per layer), found {len(state)}")
        if mask is None and self.config.pad_id is not None:
            mask = tokens != self.config.pad_id
        checkpointing = self.config.activation_checkpointing and self.training
        h = self.embedding_dropout(self.embedding(tokens))
        new_state: list[Any] = []
        moe_outputs = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LSTMLayer):
                layer_state: LSTMState | None = state[i] if state is not None else None
                h, s = maybe_checkpoint(checkpointing, layer, h, layer_state)
                new_state.append(s)
            elif isinstance(layer, MoELayer):
                h, out = maybe_checkpoint(checkpointing, layer, h, mask)
                moe_outputs.append(out)
                new_state.append(None)
            else:
                h = maybe_checkpoint(checkpointing, layer, h)
                new_state.append(None)
        aux = sum_aux_losses(moe_outputs, h)
        if targets is None:
            return ModelOutput(self.output(h), aux, moe_outputs, new_state)
        nll = token_nll(h, self.output.weight, self.output.bias, targets, self.config.softmax,
                        self.training)
        return ModelOutput(None, aux, moe_outputs, new_state, nll)

    @staticmethod
    def detach_state(state: list[Any] | None) -> list[Any] | None:
        """The state without its autograd history (truncated backpropagation through time)."""
        if state is None:
            return None
        return [None if s is None else tuple(t.detach() for t in s) for s in state]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.config.activation_checkpointing = enabled

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> Tensor:
        """Samples a continuation of ``prompt`` (``[B, T0]``), one token at a time.

        See ``sparse_moe.models.decoding.sample_lm``.
        """
        return sample_lm(self, prompt, max_new_tokens, temperature, top_k, generator, eos_id)
