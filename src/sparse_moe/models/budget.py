"""Compute and parameter budgets, counted the way the paper's Table 7 counts them.

Ops are multiply-adds per time step (per token) in the forward pass, excluding the embedding
and the softmax: an LSTM with ``h`` units, ``i`` inputs and projection ``p`` costs
``4 h (i + r) + h p`` (``r`` = the recurrent width, ``p`` or ``h``); a MoE costs its gates
(``W_g`` and ``W_noise`` over all experts; for a hierarchical MoE the primary gates plus the
gates of the ``k_primary`` groups a token visits) plus ``k`` experts' weight matrices; a
dense layer its weight matrix. Biases and element-wise work are not counted (the paper
ignores them). Parameters are counted from the module itself: ``params`` are all the
parameters outside the embedding and softmax; ``matrix_params`` only the weight matrices
(what the paper's figures count).

Counting works on a model built on the ``meta`` device, so the 4-billion-parameter presets
cost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparse_moe.models.config import LMConfig, TranslationConfig
from sparse_moe.models.layers import FFNLayer, MoELayer
from sparse_moe.moe import MoEConfig


@dataclass
class Budget:
    ops_per_timestep: int  # multiply-adds per token, without embedding and softmax
    params: int  # all parameters outside the embedding and the softmax
    matrix_params: int  # weight matrices only (the paper's count)
    total_params: int  # everything, embedding and softmax included

    def as_row(self) -> dict[str, float]:
        return {"ops_per_timestep_M": self.ops_per_timestep / 1e6,
                "params_M": self.params / 1e6, "matrix_params_M": self.matrix_params / 1e6,
                "total_params_B": self.total_params / 1e9}


def lstm_ops(lstm: nn.LSTM) -> int:
    """Multiply-adds per time step of a (possibly projected, bidirectional) ``nn.LSTM``."""
    h, p = lstm.hidden_size, lstm.proj_size
    recurrent = p or h
    directions = 2 if lstm.bidirectional else 1
    ops, d_in = 0, lstm.input_size
    for _ in range(lstm.num_layers):
        ops += directions * (4 * h * (d_in + recurrent) + h * p)
        d_in = recurrent * directions
    return ops


def moe_ops(config: MoEConfig) -> int:
    """Multiply-adds per token of a MoE layer: gates plus the experts a token uses."""
    dims = [config.d_model] + [config.d_hidden] * config.expert_hidden_layers + [config.d_out]
    expert = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    gate_mats = 2 if config.noisy else 1
    if config.hierarchical:
        gates = gate_mats * config.d_model * (config.num_groups
                                              + config.k_primary * config.experts_per_group)
    else:
        gates = gate_mats * config.d_model * config.num_experts
    return gates + config.experts_per_token * expert


def module_ops(module: nn.Module) -> int:
    """Ops per time step of the LSTM, MoE and FFN layers inside ``module``."""
    ops = 0
    for sub in module.modules():
        if isinstance(sub, nn.LSTM):
            ops += lstm_ops(sub)
        elif isinstance(sub, MoELayer):
            ops += moe_ops(sub.moe.config)
        elif isinstance(sub, FFNLayer):
            ops += sum(lin.in_features * lin.out_features for lin in sub.linears)
    return ops


def count_budget(model: nn.Module, extra_ops: int = 0) -> Budget:
    """The budget of an LM or translation model (``embedding``/``output`` excluded).

    ``extra_ops`` adds work the layers do not show (the translation model's attention).
    """
    excluded = {id(p) for name in ("embedding", "output") if hasattr(model, name)
                for p in getattr(model, name).parameters()}
    params = matrix = total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in excluded:
            continue
        params += p.numel()
        if p.dim() >= 2 and "bias" not in name:
            matrix += p.numel()
    return Budget(module_ops(model) + extra_ops, params, matrix, total)


def meta_model(factory, config) -> nn.Module:
    """Builds ``factory(config)`` on the meta device: shapes without memory."""
    with torch.device("meta"):
        return factory(config)


def preset_budget(name: str, vocab_size: int | None = None) -> Budget:
    """The budget of a named LM preset (built on the meta device)."""
    from sparse_moe.models.lm import MoELSTMLanguageModel
    from sparse_moe.models.presets import lm_preset

    return count_budget(meta_model(MoELSTMLanguageModel, lm_preset(name, vocab_size)))


__all__ = ["Budget", "count_budget", "lstm_ops", "moe_ops", "module_ops", "preset_budget",
           "meta_model"]


def sampled_columns(config: LMConfig | TranslationConfig) -> int | None:
    """The candidates a sampled softmax scores per micro-batch (at most ``num_samples``
    distinct words), or None for the exact softmax."""
    softmax = getattr(config, "softmax", None)
    if softmax is None or softmax.kind != "sampled" or softmax.num_samples >= config.vocab_size:
        return None
    return softmax.num_samples


def training_multiply_adds(model: Any, config: LMConfig | TranslationConfig, tokens: int) -> int:
    """Forward and backward (3 x forward) multiply-adds of one micro-step, softmax included
    (over the target and the candidates when it is sampled)."""
    columns = sampled_columns(config)
    columns = config.vocab_size if columns is None else columns + 1
    per_token = count_budget(model).ops_per_timestep + config.d_model * columns
    return 3 * per_token * tokens
