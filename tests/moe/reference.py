"""An independent, deliberately naive MoE: every expert on every token, masked by the gates.

It shares no code with ``sparse_moe.moe``: gates come from a full sort instead of top-k,
experts run one plain matmul at a time, and the load estimator computes each expert's
threshold by literally removing that expert's column, as the paper defines it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_top_k_softmax(h: Tensor, k: int) -> Tensor:
    """softmax(KeepTopK(h, k)) over the last dimension; entries outside the top k get 0."""
    kth = h.sort(dim=-1, descending=True).values[..., k - 1:k]
    masked = torch.where(h >= kth, h, torch.full_like(h, float("-inf")))
    return torch.softmax(masked, dim=-1)


def load_probability(clean: Tensor, noisy: Tensor, std: Tensor, k: int) -> Tensor:
    """P(x, i) = Phi((clean_i - kth largest of noisy without column i) / std_i)."""
    n = clean.shape[-1]
    cols = []
    for i in range(n):
        others = torch.cat([noisy[:, :i], noisy[:, i + 1:]], dim=1)
        threshold = others.sort(dim=1, descending=True).values[:, k - 1]
        normal = torch.distributions.Normal(torch.zeros_like(threshold), torch.ones_like(threshold))
        cols.append(normal.cdf((clean[:, i] - threshold) / std[:, i]))
    return torch.stack(cols, dim=1)


def cv2(v: Tensor) -> Tensor:
    mean = v.mean()
    return ((v - mean) ** 2).mean() / (mean ** 2 + 1e-10)


def expert_outputs(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None) -> Tensor:
    """[T, n, d_out]: each expert applied to every token, one expert at a time."""
    n = weights[0].shape[0]
    outs = []
    for e in range(n):
        h = x
        for layer, w in enumerate(weights):
            h = h @ w[e]
            if biases is not None:
                h = h + biases[layer][e]
            if layer < len(weights) - 1:
                h = torch.relu(h)
        outs.append(h)
    return torch.stack(outs, dim=1)


def gate_and_load(x: Tensor, w_gate: Tensor, w_noise: Tensor | None, noise: Tensor | None,
                  k: int, eps: float) -> tuple[Tensor, Tensor]:
    """Dense gates [T, n] and the per-token load contribution [T, n] of one noisy top-k gate."""
    clean = x @ w_gate
    if w_noise is None or noise is None:
        gates = keep_top_k_softmax(clean, k)
        return gates, (gates > 0).to(x.dtype)
    std = F.softplus(x @ w_noise) + eps
    noisy = clean + noise * std
    gates = keep_top_k_softmax(noisy, k)
    if k == clean.shape[-1]:
        return gates, torch.ones_like(gates)
    return gates, load_probability(clean, noisy, std, k)


def flat_reference(x, w_gate, w_noise, noise, weights, biases, k, eps=1e-2, w_imp=0.1,
                   w_load=0.1, sigmoid=False):
    """Returns (y, aux_loss, importance, load) of a flat noisy top-k MoE."""
    gates, load_rows = gate_and_load(x, w_gate, w_noise, noise, k, eps)
    y = (gates.unsqueeze(-1) * expert_outputs(x, weights, biases)).sum(dim=1)
    if sigmoid:
        y = torch.sigmoid(y)
    importance, load = gates.sum(0), load_rows.sum(0)
    return y, w_imp * cv2(importance) + w_load * cv2(load), importance, load


def hierarchical_reference(x, primary_gate, primary_noise_w, w_gate, w_noise, noise1, noise2,
                           weights, biases, k1, k2, eps=1e-2, w_imp=0.1, w_load=0.1):
    """(y, aux_loss, importance, load) of a two-level MoE with every group's gate dense.

    ``w_gate``/``w_noise`` are ``[a, d, b]``; ``noise2`` is ``[T, a, b]``.
    """
    a, _, b = w_gate.shape
    g1, load1_rows = gate_and_load(x, primary_gate, primary_noise_w, noise1, k1, eps)
    experts = expert_outputs(x, weights, biases).reshape(x.shape[0], a, b, -1)
    y = x.new_zeros(x.shape[0], experts.shape[-1])
    importance = x.new_zeros(a, b)
    load = x.new_zeros(a, b)
    for i in range(a):
        wn = None if w_noise is None else w_noise[i]
        nz = None if noise2 is None else noise2[:, i]
        g2, load2_rows = gate_and_load(x, w_gate[i], wn, nz, k2, eps)
        combined = g1[:, i:i + 1] * g2
        y = y + (combined.unsqueeze(-1) * experts[:, i]).sum(dim=1)
        importance[i] = combined.sum(0)
        routed = g1[:, i] > 0  # X^(i)
        size = routed.sum().clamp_min(1).to(x.dtype)
        load[i] = load1_rows[:, i].sum() * load2_rows[routed].sum(0) / size
    importance, load = importance.flatten(), load.flatten()
    return y, w_imp * cv2(importance) + w_load * cv2(load), importance, load


def strict_reference(x, w_gate, threshold, weights, biases, k, training, w_imp=0.1, w_load=0.1,
                     w_threshold=1.0):
    """(y, aux_loss, counts) of strictly balanced gating (paper, appendix F)."""
    probs = torch.softmax(x @ w_gate, dim=-1)
    t, n = probs.shape
    threshold_mask = (probs > threshold).to(x.dtype)
    if training:
        m = min(t, max(1, k * t // n))
        mask = torch.zeros_like(probs)
        for e in range(n):
            mask[probs[:, e].argsort(descending=True)[:m], e] = 1.0
        thr_loss = ((threshold_mask - mask) * (probs.detach() - threshold)).sum() / t
    else:
        mask, thr_loss = threshold_mask, torch.zeros((), dtype=x.dtype)
    kept = probs * mask
    gates = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    y = (gates.unsqueeze(-1) * expert_outputs(x, weights, biases)).sum(dim=1)
    counts = mask.sum(0)
    aux = w_imp * cv2(gates.sum(0)) + w_load * cv2(counts) + w_threshold * thr_loss
    return y, aux, counts
