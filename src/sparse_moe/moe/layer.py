"""The sparsely-gated MoE layer, flat and hierarchical.

``y = sum_i G(x)_i E_i(x)`` over the experts that the gate keeps. The layer is applied
"convolutionally": any leading shape (``[T, d]``, ``[B, T, d]``) is flattened, so every time
step of every sequence is one token of a single large batch for the experts.

The layer owns the gates and the experts; a dispatcher (``LocalDispatcher`` by default,
an expert-parallel one when distributed) moves tokens to the experts and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparse_moe.moe.config import MoEConfig
from sparse_moe.moe.dispatcher import LocalDispatcher, TokenDispatcher, sort_by_expert, stable_argsort
from sparse_moe.moe.experts import GroupedFFNExperts, group_offsets, grouped_matmul
from sparse_moe.moe.noise import active_keys, token_noise
from sparse_moe.moe.router import (
    NoisyTopKRouter,
    RouterOutput,
    Routing,
    build_router,
    cv_squared,
    gate_and_noise_logits,
    gate_dtype,
    noisy_top_k,
    per_expert_sum,
    top_k_routing,
)


@dataclass
class MoEOutput:
    """Result of one MoE call.

    ``aux_loss`` is the weighted balancing loss to add to the model loss; ``importance``,
    ``load`` and ``counts`` are per-expert (``[num_experts]``) over the global batch the
    dispatcher reduces over. ``counts`` is the number of tokens each expert actually got.
    """

    y: Tensor
    aux_loss: Tensor
    importance: Tensor
    load: Tensor
    counts: Tensor
    importance_loss: Tensor
    load_loss: Tensor
    threshold_loss: Tensor
    # This process's assignments (token index into the flattened input, expert, gate weight):
    # for analyses such as which experts the most frequent words go to.
    routing: Routing | None = None


class _MoEBase(nn.Module):
    """Shared input checks, experts, dispatch and losses of the flat and hierarchical layers."""

    def __init__(self, config: MoEConfig, dispatcher: TokenDispatcher | None = None,
                 init_seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.dispatcher: TokenDispatcher = dispatcher or LocalDispatcher(config.num_experts)
        self.experts = GroupedFFNExperts(
            self.dispatcher.num_local_experts, config.d_model, config.d_hidden, config.d_out,
            config.expert_hidden_layers, config.expert_bias,
            first_expert=self.dispatcher.first_local_expert, init_seed=init_seed)
        # which of the model's MoE layers this is: its keyed gating noise is its own
        self.noise_stream = 0

    def _stream(self, part: int) -> int:
        """The keyed-noise stream of one of this layer's gates (``moe/noise.py``)."""
        return 4 * self.noise_stream + part

    def set_dispatcher(self, dispatcher: TokenDispatcher) -> None:
        """Swaps the dispatcher (the expert-parallel wrapper does this after sharding)."""
        self.dispatcher = dispatcher

    def forward(self, x: Tensor, noise: Tensor | tuple[Tensor, Tensor] | None = None) -> MoEOutput:
        """Applies the layer to ``x`` of shape ``[..., d_model]``.

        ``noise`` fixes the standard-normal gating noise used in training (flat: shape
        ``[..., num_experts]``; hierarchical: a pair ``([..., num_groups],
        [..., num_groups, experts_per_group])``); it is drawn afresh when None.
        """
        self._check_input(x)
        lead_shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        noise = self._flatten_noise(noise, flat.shape[0])
        gate = self._gate(flat, noise)
        y = self._run_experts(flat, gate.routing)
        if self.config.output_sigmoid:
            y = torch.sigmoid(y)
        return self._output(y.reshape(*lead_shape, self.config.d_out), gate)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            found = x.shape[-1] if x.dim() else "a scalar"
            raise ValueError(f"MoE input: expected last dimension d_model={self.config.d_model}, "
                             f"found {found} (input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"MoE input: expected a floating-point tensor, found {x.dtype}")
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"MoE input: expected finite values, found {bad} NaN/Inf entries "
                             f"in a tensor of shape {tuple(x.shape)}")

    def _run_experts(self, flat: Tensor, routing: Routing) -> Tensor:
        dispatched = self.dispatcher.dispatch(flat, routing, self.config.num_experts)
        expert_out = self.experts(dispatched.tokens, dispatched.tokens_per_expert)
        return self.dispatcher.combine(expert_out, routing, dispatched.context, flat.shape[0])

    def _output(self, y: Tensor, gate: RouterOutput) -> MoEOutput:
        cfg = self.config
        importance = self.dispatcher.reduce_statistics(gate.importance)
        load = gate.load if gate.load_reduced else self.dispatcher.reduce_statistics(gate.load)
        counts = torch.bincount(gate.routing.expert_idx, minlength=cfg.num_experts)
        counts = self.dispatcher.reduce_statistics(counts)
        importance_loss = cfg.w_importance * cv_squared(importance, cfg.cv_epsilon)
        load_loss = cfg.w_load * cv_squared(load, cfg.cv_epsilon)
        threshold_loss = cfg.w_threshold * gate.threshold_loss
        aux = importance_loss + load_loss + threshold_loss
        return MoEOutput(y, aux, importance, load, counts, importance_loss, load_loss,
                         threshold_loss, gate.routing)

    def _flatten_noise(self, noise, num_tokens: int):
        raise NotImplementedError

    def _gate(self, flat: Tensor, noise) -> RouterOutput:
        raise NotImplementedError


class MoE(_MoEBase):
    """Flat sparsely-gated MoE: one gate over ``num_experts`` experts, ``k`` per token."""

    def __init__(self, config: MoEConfig, dispatcher: TokenDispatcher | None = None,
                 init_seed: int | None = None) -> None:
        if config.hierarchical:
            raise ValueError("MoE: config has num_groups > 0; use HierarchicalMoE")
        super().__init__(config, dispatcher, init_seed)
        self.router = build_router(config)

    def _flatten_noise(self, noise, num_tokens: int) -> Tensor | None:
        if noise is None:
            return None
        return _rows(noise, num_tokens, (self.config.num_experts,), "noise")

    def _gate(self, flat: Tensor, noise: Tensor | None) -> RouterOutput:
        if noise is None and self.training and self.config.noisy:
            keys = active_keys(flat.shape[0])
            if keys is not None:
                rows = torch.arange(flat.shape[0], device=flat.device)
                experts = torch.arange(self.config.num_experts, device=flat.device)
                noise = token_noise(keys, self._stream(0), rows, experts).to(flat.device)
        return self.router.route(flat, noise)


class HierarchicalMoE(_MoEBase):
    """Two-level MoE: a primary gate over ``num_groups`` groups, each a MoE with its own gate.

    ``y = sum_i sum_j G_primary(x)_i G_i(x)_j E_ij(x)``. Expert ``(i, j)`` is expert
    ``i * experts_per_group + j`` of the stacked experts. The secondary gates are stacked
    too (``[num_groups, d_model, experts_per_group]``) and run as one grouped GEMM over the
    (token, group) pairs the primary gate chose, so no group's gate sees tokens it was not
    given. Balancing uses the paper's ``Importance_H`` and ``Load_H`` (appendix B).
    """

    def __init__(self, config: MoEConfig, dispatcher: TokenDispatcher | None = None,
                 init_seed: int | None = None) -> None:
        if not config.hierarchical:
            raise ValueError("HierarchicalMoE: expected num_groups > 0 in the config, found 0")
        super().__init__(config, dispatcher, init_seed)
        a, b = config.num_groups, config.experts_per_group
        self.primary = NoisyTopKRouter(config.d_model, a, config.k_primary, config.noisy,
                                       config.noise_epsilon)
        self.w_gate = nn.Parameter(torch.zeros(a, config.d_model, b))
        self.w_noise = nn.Parameter(torch.zeros(a, config.d_model, b)) if config.noisy else None

    def _flatten_noise(self, noise, num_tokens: int):
        if noise is None:
            return None
        a, b = self.config.num_groups, self.config.experts_per_group
        if not isinstance(noise, (tuple, list)) or len(noise) != 2:
            raise ValueError("HierarchicalMoE noise: expected a pair (primary [..., num_groups], "
                             f"secondary [..., num_groups, experts_per_group]), found {type(noise)}")
        return (_rows(noise[0], num_tokens, (a,), "noise[0]"),
                _rows(noise[1], num_tokens, (a, b), "noise[1]"))

    def _gate(self, flat: Tensor, noise) -> RouterOutput:
        cfg = self.config
        a, b = cfg.num_groups, cfg.experts_per_group
        primary_noise, secondary_noise = noise if noise is not None else (None, None)
        keys = active_keys(flat.shape[0]) if noise is None and self.training and cfg.noisy \
            else None
        if keys is not None:
            rows = torch.arange(flat.shape[0], device=flat.device)
            primary_noise = token_noise(keys, self._stream(1), rows,
                                        torch.arange(a, device=flat.device))
        first = self.primary.decide(flat, primary_noise)
        pairs = top_k_routing(first)  # (token, group, primary gate)
        order, tokens_per_group = sort_by_expert(pairs.expert_idx, a)
        token = pairs.token_idx.index_select(0, order)
        group = pairs.expert_idx.index_select(0, order)
        if keys is not None:  # per (token, chosen group): the row's noise over its experts
            columns = group.unsqueeze(1) * b + torch.arange(b, device=flat.device)
            secondary_noise = token_noise(keys, self._stream(2), token, columns)
        second = self._secondary_decision(flat, token, group, tokens_per_group, secondary_noise,
                                          per_pair=keys is not None)

        k2 = cfg.k
        expert = (group.unsqueeze(1) * b + second.expert_idx).reshape(-1)
        weight = (pairs.weight.index_select(0, order).unsqueeze(1) * second.gates).reshape(-1)
        token_rep = token.repeat_interleave(k2)
        # Restore token-major order so each token's k_primary * k assignments are adjacent.
        by_token = stable_argsort(token_rep)
        routing = Routing(token_rep[by_token], expert[by_token], weight[by_token],
                          cfg.k_primary * k2)

        importance = per_expert_sum(routing.expert_idx, routing.weight, a * b)
        load = self._hierarchical_load(first, second, group, tokens_per_group, flat)
        return RouterOutput(routing, importance, load, flat.new_zeros((), dtype=gate_dtype(flat)),
                           load_reduced=True)

    def _secondary_decision(self, flat: Tensor, token: Tensor, group: Tensor,
                            tokens_per_group: Tensor, noise: Tensor | None,
                            per_pair: bool = False):
        """The gate of each chosen group over its experts; ``noise`` is ``[N, a, b]`` (one
        row per token and group), or already one row per (token, group) pair (``per_pair``)."""
        dtype = gate_dtype(flat)
        x_pairs = flat.to(dtype).index_select(0, token)
        offsets = group_offsets(tokens_per_group)
        raw_std = None
        if self.w_noise is not None and self.training:
            clean, raw_std = gate_and_noise_logits(
                x_pairs, self.w_gate.to(dtype), self.w_noise.to(dtype),
                lambda rows, weight: grouped_matmul(rows, weight, offsets))
            if noise is not None and not per_pair:
                noise = noise[token, group]
        else:
            clean = grouped_matmul(x_pairs, self.w_gate.to(dtype), offsets)
        return noisy_top_k(clean, raw_std, self.config.k, noise, self.config.noise_epsilon)

    def _hierarchical_load(self, first, second, group: Tensor, tokens_per_group: Tensor,
                           flat: Tensor) -> Tensor:
        """``Load_H[i, j] = Load_primary[i] * Load_i(X^(i))[j] / |X^(i)|`` (paper, appendix B).

        The three factors are summed over the data-parallel replicas (``reduce_statistics``)
        before they are combined, so the load is that of the global batch.
        """
        a, b = self.config.num_groups, self.config.experts_per_group
        if first.load_prob is not None:
            primary_load = first.load_prob.sum(dim=0)
        else:
            primary_load = tokens_per_group.float()
        if second.load_prob is not None:
            secondary = second.load_prob
        else:
            secondary = second.gates.new_zeros(group.shape[0], b).scatter(1, second.expert_idx, 1.0)
        secondary_load = secondary.new_zeros(a, b).index_add(0, group, secondary)
        reduce = self.dispatcher.reduce_statistics
        primary_load, secondary_load = reduce(primary_load), reduce(secondary_load)
        group_size = reduce(tokens_per_group.float()).clamp_min(1.0)
        return (primary_load.unsqueeze(1) * secondary_load / group_size.unsqueeze(1)).reshape(-1)


def _rows(noise: Tensor, num_tokens: int, tail: tuple[int, ...], name: str) -> Tensor:
    if tuple(noise.shape[-len(tail):]) != tail or noise.numel() != num_tokens * _prod(tail):
        raise ValueError(f"MoE {name}: expected shape [..., {', '.join(map(str, tail))}] with "
                         f"{num_tokens} tokens, found {tuple(noise.shape)}")
    return noise.reshape(num_tokens, *tail)


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
