"""Configuration of the sparsely-gated MoE layer (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sparse_moe.config_io import from_dict

GATING_KINDS = ("noisy_topk", "topk", "strict_balanced")
EXPERT_TYPES = ("ffn",)
EXPERT_ACTIVATIONS = ("relu",)


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer.

    Flat layers use ``num_experts`` experts and ``k`` per token. A hierarchical layer
    (``num_groups > 0``) splits the same ``num_experts`` into ``num_groups`` groups of
    ``num_experts // num_groups``; the primary gate picks ``k_primary`` groups and each
    group's gate picks ``k`` of its experts, so a token uses ``k_primary * k`` experts.
    """

    d_model: int  # input width (set from the model)
    d_hidden: int  # each expert's hidden width
    num_experts: int  # experts in the layer (all groups together when hierarchical)
    k: int = 4  # experts a token uses (per group when hierarchical)
    d_out: int | None = None  # output width (None: d_model)
    # noisy_topk (the paper's), topk (no noise, no W_noise), strict_balanced (batch-wise mask
    # in training, learned thresholds at inference)
    gating: str = "noisy_topk"
    noise_epsilon: float = 1e-2  # added to the noise's standard deviation
    w_importance: float = 0.1  # weight of the importance loss (CV^2 of importance)
    w_load: float = 0.1  # weight of the load loss (CV^2 of the smooth load)
    w_threshold: float = 1.0  # weight of the threshold loss (strict_balanced)
    cv_epsilon: float = 1e-10  # keeps CV^2 finite when a statistic is all zeros
    expert_type: str = "ffn"  # feed-forward networks (the only kind)
    expert_hidden_layers: int = 1  # ReLU hidden layers of d_hidden in each expert
    expert_activation: str = "relu"  # the experts' activation (the only kind)
    expert_bias: bool = False  # biases in the experts (off, as in the original experts)
    output_sigmoid: bool = False  # a sigmoid on the layer's output (the paper's LM)
    num_groups: int = 0  # groups of a hierarchical layer (0: flat)
    k_primary: int | None = None  # groups a token uses (None: k)
    check_finite: bool = False  # raise on NaN/Inf inputs (costs one reduction)

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_model
        if self.k_primary is None and self.num_groups > 0:
            self.k_primary = self.k
        for name in ("d_model", "d_hidden", "num_experts", "d_out", "expert_hidden_layers"):
            _require(getattr(self, name) >= 1, name, "a positive integer", getattr(self, name))
        _require(self.gating in GATING_KINDS, "gating", f"one of {GATING_KINDS}", self.gating)
        _require(self.expert_type in EXPERT_TYPES, "expert_type", f"one of {EXPERT_TYPES}",
                 self.expert_type)
        _require(self.expert_activation in EXPERT_ACTIVATIONS, "expert_activation",
                 f"one of {EXPERT_ACTIVATIONS}", self.expert_activation)
        for name in ("w_importance", "w_load", "w_threshold", "cv_epsilon"):
            _require(getattr(self, name) >= 0, name, "a non-negative number", getattr(self, name))
        _require(self.noise_epsilon > 0, "noise_epsilon", "a positive number", self.noise_epsilon)
        _require(self.num_groups >= 0, "num_groups", "0 (flat) or a positive group count",
                 self.num_groups)
        if self.num_groups > 0:
            self._validate_hierarchical()
        else:
            _require(1 <= self.k <= self.num_experts, "k",
                     f"an integer in [1, num_experts={self.num_experts}]", self.k)

    def _validate_hierarchical(self) -> None:
        _require(self.num_experts % self.num_groups == 0, "num_experts",
                 f"a multiple of num_groups={self.num_groups}", self.num_experts)
        _require(self.gating != "strict_balanced", "gating",
                 "noisy_topk or topk for a hierarchical layer", self.gating)
        per_group = self.num_experts // self.num_groups
        _require(1 <= self.k <= per_group, "k",
                 f"an integer in [1, experts per group={per_group}]", self.k)
        _require(1 <= self.k_primary <= self.num_groups, "k_primary",
                 f"an integer in [1, num_groups={self.num_groups}]", self.k_primary)

    @property
    def hierarchical(self) -> bool:
        return self.num_groups > 0

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups if self.hierarchical else self.num_experts

    @property
    def noisy(self) -> bool:
        return self.gating == "noisy_topk"

    @property
    def experts_per_token(self) -> int:
        """Experts each token uses on average (exactly, except for strictly balanced gating)."""
        return self.k * (self.k_primary if self.hierarchical else 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "MoEConfig") -> "MoEConfig":
        """Builds the config from a mapping (a YAML section): unknown fields and wrong types fail
        naming ``source`` and the field (``sparse_moe.config_io.from_dict``)."""
        return from_dict(cls, values, source)


def _require(ok: bool, field: str, expected: str, found: Any) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field}: expected {expected}, found {found!r}")
