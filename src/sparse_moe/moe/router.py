"""Gating networks of the sparsely-gated MoE (Shazeer et al., 2017, section 2 and appendix F).

The router decides, for every token, which experts it goes to and with which weight. Its
output is a flat list of (token, expert, weight) assignments, which is all a dispatcher needs,
plus the per-expert statistics that the balancing losses are built from.

All gating math runs in at least fp32 whatever the input dtype: top-k decisions on bf16 logits flip on
rounding, and the normal CDF of the load estimator underflows in half precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Assignments of tokens to experts, one entry per (token, expert) pair.

    ``per_token`` is the number of assignments of every token when it is constant (top-k
    gating: entries are grouped token by token), or ``None`` when it varies (strict balancing).
    """

    token_idx: Tensor  # [A] int64
    expert_idx: Tensor  # [A] int64
    weight: Tensor  # [A] fp32, differentiable
    per_token: int | None


@dataclass
class RouterOutput:
    """What a router hands the layer: the assignments and the balancing statistics.

    ``importance`` and ``load`` are per expert (``[E]``), for this process's tokens; the layer
    sums them over the data-parallel replicas unless ``load_reduced`` says the load was built
    from sums already (hierarchical load is a product of sums, so summing products is wrong).
    """

    routing: Routing
    importance: Tensor  # [E]
    load: Tensor  # [E]
    threshold_loss: Tensor  # scalar; nonzero only for strictly balanced gating in training
    load_reduced: bool = False


@dataclass
class GateDecision:
    """Top-k choice over the rows of one logit matrix."""

    expert_idx: Tensor  # [N, k] int64
    gates: Tensor  # [N, k] fp32, softmax over the kept logits
    load_prob: Tensor | None  # [N, n] P(x, i) of the smooth load estimator, None without noise


def gate_dtype(x: Tensor) -> torch.dtype:
    """Gating runs in fp32 for half-precision inputs and in the input's dtype otherwise."""
    return torch.promote_types(x.dtype, torch.float32)


def cv_squared(values: Tensor, eps: float) -> Tensor:
    """Squared coefficient of variation (variance / mean^2), the paper's balancing measure.

    Uses the population variance, and returns 0 for fewer than two values (nothing to balance).
    """
    values = values.to(gate_dtype(values)).flatten()
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean() ** 2 + eps)


def prob_in_top_k(clean: Tensor, noise_std: Tensor, noisy: Tensor, top_values: Tensor,
                  k: int) -> Tensor:
    """P(x, i): probability that expert i stays in the top k if only its own noise is redrawn.

    The threshold expert i must beat is the k-th largest noisy logit among the *other*
    experts: the (k+1)-th largest overall when i is itself in the top k, the k-th otherwise.
    ``top_values`` holds the k+1 largest noisy logits per row; ``P = Phi((clean - threshold)
    / noise_std)``. Gradients reach ``clean``, ``noise_std`` and the two thresholds in
    ``top_values``; ``noisy`` only picks the threshold.
    """
    return _ProbInTopK.apply(clean, noise_std, noisy, top_values, k)


_LOG_INV_SQRT_2PI = -0.5 * math.log(2 * math.pi)


class _ProbInTopK(torch.autograd.Function):
    """The load probability in a few passes over ``[N, n]``, forward and backward.

    Written out as separate ops (threshold, difference, quotient, normal CDF), autograd makes
    many more passes over the ``[N, n]`` logits (``docs/benchmarks.md``, "Design choices
    measured"). The threshold is picked before the CDF, so there is one normal CDF per entry.
    """

    @staticmethod
    def forward(ctx, clean: Tensor, noise_std: Tensor, noisy: Tensor, top_values: Tensor,
                k: int) -> Tensor:
        threshold_if_in = top_values[:, k:k + 1]
        threshold_if_out = top_values[:, k - 1:k]
        is_in = noisy > threshold_if_in
        z = torch.where(is_in, threshold_if_in, threshold_if_out)
        torch.sub(clean, z, out=z).div_(noise_std)  # z = (clean - threshold) / noise_std
        ctx.save_for_backward(z, noise_std, is_in)
        ctx.k, ctx.top_shape = k, top_values.shape
        return torch.special.ndtr(z)

    @staticmethod
    def backward(ctx, grad_p: Tensor):
        z, noise_std, is_in = ctx.saved_tensors
        k = ctx.k
        # dP/dclean = phi(z) / noise_std, with phi the standard normal density.
        grad_clean = (torch.mul(z, z).mul_(-0.5).add_(_LOG_INV_SQRT_2PI).exp_()
                      .mul_(grad_p).div_(noise_std))
        grad_std = torch.mul(grad_clean, z).neg_() if ctx.needs_input_grad[1] else None
        grad_top = None
        if ctx.needs_input_grad[3]:
            # dP/dthreshold = -dP/dclean, summed over the entries that used each threshold.
            beat_in = torch.where(is_in, grad_clean, 0).sum(dim=1)
            grad_top = grad_clean.new_zeros(ctx.top_shape)
            grad_top[:, k] = -beat_in
            grad_top[:, k - 1] = beat_in - grad_clean.sum(dim=1)
        grad_clean = grad_clean if ctx.needs_input_grad[0] else None
        return grad_clean, grad_std, None, grad_top, None


def noisy_top_k(clean: Tensor, raw_noise_std: Tensor | None, k: int, noise: Tensor | None,
                noise_epsilon: float) -> GateDecision:
    """The paper's noisy top-k gating over the rows of ``clean`` ([N, n] fp32 logits).

    ``raw_noise_std`` is ``x @ W_noise`` (None: no noise, plain top-k); ``noise`` is the
    standard-normal sample eps to use (drawn here when None).
    """
    num_experts = clean.shape[-1]
    if raw_noise_std is None:
        logits, noise_std = clean, None
    else:
        noise_std = F.softplus(raw_noise_std) + noise_epsilon
        if noise is None:
            noise = torch.randn_like(clean)
        logits = clean + noise.to(clean.dtype) * noise_std
    top_values, top_idx = logits.topk(min(k + 1, num_experts), dim=-1)
    gates = torch.softmax(top_values[:, :k], dim=-1)
    load_prob = None
    if noise_std is not None and k < num_experts:
        load_prob = prob_in_top_k(clean, noise_std, logits, top_values, k)
    return GateDecision(top_idx[:, :k], gates, load_prob)


def gate_and_noise_logits(x: Tensor, w_gate: Tensor, w_noise: Tensor,
                          product: Callable[[Tensor, Tensor], Tensor] = torch.matmul
                          ) -> tuple[Tensor, Tensor]:
    """``(x @ w_gate, x @ w_noise)`` as one product against the two matrices side by side.

    ``x`` is read once instead of twice in the forward pass and in each backward product, and
    the product is wider: with few experts the two thin products are far from the machine's
    speed (``docs/benchmarks.md``, "Design choices measured").
    ``product`` is the multiplication (``grouped_matmul`` for stacked secondary gates).
    """
    num_experts = w_gate.shape[-1]
    both = product(x, torch.cat([w_gate, w_noise], dim=-1))
    return both[..., :num_experts], both[..., num_experts:]


def per_expert_sum(index: Tensor, values: Tensor, num_experts: int) -> Tensor:
    """Sums ``values`` into ``num_experts`` bins (differentiable, deterministic on CPU)."""
    out = values.new_zeros(num_experts)
    return out.index_add(0, index, values)


def top_k_routing(decision: GateDecision) -> Routing:
    num_tokens, k = decision.expert_idx.shape
    token_idx = torch.arange(num_tokens, device=decision.expert_idx.device).repeat_interleave(k)
    return Routing(token_idx, decision.expert_idx.reshape(-1), decision.gates.reshape(-1), k)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating: ``H = x W_g + eps * softplus(x W_noise)``, softmax over the top k.

    ``W_g`` and ``W_noise`` start at zero so that at first the choice is pure noise and
    every expert receives traffic. Noise is added only in training.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, noisy: bool,
                 noise_epsilon: float) -> None:
        super().__init__()
        self.k = k
        self.num_experts = num_experts
        self.noise_epsilon = noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts)) if noisy else None

    def route(self, x: Tensor, noise: Tensor | None = None) -> RouterOutput:
        """Top-k routing; the load is the smooth estimator's (the plain count without noise)."""
        decision = self.decide(x, noise)
        routing = top_k_routing(decision)
        importance = per_expert_sum(routing.expert_idx, routing.weight, self.num_experts)
        if decision.load_prob is not None:
            load = decision.load_prob.sum(dim=0)
        else:
            load = torch.bincount(routing.expert_idx, minlength=self.num_experts).float()
        return RouterOutput(routing, importance, load, x.new_zeros((), dtype=gate_dtype(x)))

    def decide(self, x: Tensor, noise: Tensor | None = None) -> GateDecision:
        """The top-k choice alone (the hierarchical layer's gates use it directly)."""
        dtype = gate_dtype(x)
        xg = x.to(dtype)
        raw_std = None
        if self.w_noise is not None and self.training:
            clean, raw_std = gate_and_noise_logits(xg, self.w_gate.to(dtype),
                                                   self.w_noise.to(dtype))
        else:
            clean = xg @ self.w_gate.to(dtype)
        return noisy_top_k(clean, raw_std, self.k, noise, self.noise_epsilon)


class StrictlyBalancedRouter(nn.Module):
    """Strictly balanced gating (paper, appendix F), used by the translation models.

    ``G_sigma(x) = softmax(x W_g)`` over all experts, multiplied by a sparse mask and
    renormalised. In training the mask is batch-wise: each expert keeps the
    ``m = k |X| / n`` tokens with the highest gate value for it, so every expert receives
    exactly ``m`` tokens (a token may get more or fewer than ``k`` experts, or none). At
    inference a per-expert threshold ``T`` replaces it (``mask = G_sigma(x) > T``); ``T`` is
    learned by the paper's loss ``sum (M_threshold - M_batchwise)(G_sigma - T)``, computed on
    detached gate values so that it moves only ``T``, and divided by the batch size so that
    its weight does not depend on the batch.
    """

    def __init__(self, d_model: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.threshold = nn.Parameter(torch.full((num_experts,), 1.0 / num_experts))

    def route(self, x: Tensor, noise: Tensor | None = None) -> RouterOutput:
        """Batch-wise (training) or thresholded (inference) routing; ``noise`` is not used.

        The load is the count of tokens each expert got (no smooth estimator: no noise)."""
        if x.shape[0] == 0:
            return _empty_output(x, self.num_experts)
        routing, threshold_loss = self.assign(x)
        counts = torch.bincount(routing.expert_idx, minlength=self.num_experts).float()
        importance = per_expert_sum(routing.expert_idx, routing.weight, self.num_experts)
        return RouterOutput(routing, importance, counts, threshold_loss)

    def assign(self, x: Tensor) -> tuple[Routing, Tensor]:
        """The routing and the threshold loss (zero outside training)."""
        dtype = gate_dtype(x)
        probs = torch.softmax(x.to(dtype) @ self.w_gate.to(dtype), dim=-1)
        num_tokens = probs.shape[0]
        threshold_mask = probs > self.threshold
        if self.training:
            mask = self._batchwise_mask(probs)
            diff = threshold_mask.float() - mask.float()
            threshold_loss = (diff * (probs.detach() - self.threshold)).sum() / max(num_tokens, 1)
        else:
            mask = threshold_mask
            threshold_loss = probs.new_zeros(())
        token_idx, expert_idx = mask.nonzero(as_tuple=True)
        kept = probs * mask
        norm = kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        weight = (kept / norm)[token_idx, expert_idx]
        return Routing(token_idx, expert_idx, weight, None), threshold_loss

    def _batchwise_mask(self, probs: Tensor) -> Tensor:
        num_tokens = probs.shape[0]
        per_expert = min(num_tokens, max(1, (self.k * num_tokens) // self.num_experts))
        top_tokens = probs.topk(per_expert, dim=0).indices  # [m, n]
        mask = torch.zeros_like(probs, dtype=torch.bool)
        return mask.scatter(0, top_tokens, True)


def _empty_output(x: Tensor, num_experts: int) -> RouterOutput:
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    zeros = torch.zeros(num_experts, device=x.device)
    return RouterOutput(Routing(empty, empty, torch.zeros(0, device=x.device), None), zeros,
                        zeros, zeros.sum())


def build_router(config) -> nn.Module:
    """The flat router ``config.gating`` names (``MoEConfig``): a new gate is a class with
    ``route(x, noise) -> RouterOutput`` and an entry here."""
    if config.gating == "strict_balanced":
        return StrictlyBalancedRouter(config.d_model, config.num_experts, config.k)
    return NoisyTopKRouter(config.d_model, config.num_experts, config.k, config.noisy,
                           config.noise_epsilon)

