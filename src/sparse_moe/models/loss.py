"""The training loss: cross-entropy plus the MoE balancing losses, with the parts kept apart.

The trainer backpropagates ``total`` and logs every part separately, so that a rising
balancing loss is visible even while the total falls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_moe.models.layers import ModelOutput


@dataclass
class LossParts:
    total: Tensor  # what to backpropagate
    cross_entropy: Tensor  # mean over counted tokens
    aux: Tensor  # summed weighted balancing losses of all MoE layers
    num_tokens: Tensor  # tokens counted in the cross-entropy
    per_layer: dict[str, Tensor] = field(default_factory=dict)  # detached, for logging

    def scalars(self) -> dict[str, float]:
        """Plain floats for loggers (one device sync)."""
        values = {"loss": self.total, "cross_entropy": self.cross_entropy, "aux_loss": self.aux,
                  **self.per_layer}
        return {k: float(v.detach()) for k, v in values.items()}


def compose_loss(output: ModelOutput, targets: Tensor, ignore_index: int = -100) -> LossParts:
    """``cross_entropy(logits, targets) + sum of the MoE layers' aux losses``.

    ``targets`` has the logits' leading shape; positions equal to ``ignore_index`` (padding)
    do not count. The cross-entropy is computed in fp32 whatever the logits' dtype.
    """
    logits = output.logits
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"compose_loss: expected targets of shape {tuple(logits.shape[:-1])} "
                         f"(the logits' leading shape), found {tuple(targets.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index)
    num_tokens = (flat_targets != ignore_index).sum()
    aux = output.aux_loss.float()
    per_layer = {}
    for i, out in enumerate(output.moe_outputs):
        per_layer[f"moe{i}/importance_loss"] = out.importance_loss.detach()
        per_layer[f"moe{i}/load_loss"] = out.load_loss.detach()
        per_layer[f"moe{i}/threshold_loss"] = out.threshold_loss.detach()
    return LossParts(ce + aux, ce, aux, num_tokens, per_layer)


def perplexity(mean_cross_entropy: float) -> float:
    """``exp`` of a mean per-token cross-entropy in nats."""
    return float(torch.tensor(mean_cross_entropy).exp())
