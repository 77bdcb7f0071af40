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
    do not count. The cross-entropy is computed in fp32 whatever the logits' dtype. An
    output without logits carries its per-position ``token_nll`` (the model was given the
    targets, ``models/softmax.py``); its counted positions are averaged.
    """
    num_tokens = (targets != ignore_index).sum()
    ce = _mean_cross_entropy(output, targets, ignore_index, num_tokens)
    aux = output.aux_loss.float()
    per_layer = {}
    for i, out in enumerate(output.moe_outputs):
        per_layer[f"moe{i}/importance_loss"] = out.importance_loss.detach()
        per_layer[f"moe{i}/load_loss"] = out.load_loss.detach()
        per_layer[f"moe{i}/threshold_loss"] = out.threshold_loss.detach()
    return LossParts(ce + aux, ce, aux, num_tokens, per_layer)


def _mean_cross_entropy(output: ModelOutput, targets: Tensor, ignore_index: int,
                        num_tokens: Tensor) -> Tensor:
    if output.logits is None:
        if output.token_nll is None or output.token_nll.shape != targets.shape:
            found = None if output.token_nll is None else tuple(output.token_nll.shape)
            raise ValueError(f"compose_loss: expected the output's token_nll of shape "
                             f"{tuple(targets.shape)} (the targets'), found {found}")
        return output.token_nll.float().sum() / num_tokens.clamp(min=1)
    logits = output.logits
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"compose_loss: expected targets of shape {tuple(logits.shape[:-1])} "
                         f"(the logits' leading shape), found {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index)


def perplexity(mean_cross_entropy: float) -> float:
    """``exp`` of a mean per-token cross-entropy in nats."""
    return float(torch.tensor(mean_cross_entropy).exp())
