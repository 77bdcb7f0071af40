"""Optimizers and learning-rate schedule: Adam, the paper's factored Adam, warmup/hold/rsqrt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch.optim import Optimizer

from sparse_moe.config_io import from_dict
from sparse_moe.optim.factored_adam import FactoredAdam, factored_second_moment, optimizer_state_numel
from sparse_moe.optim.schedule import ScheduleConfig, build_scheduler, warmup_hold_rsqrt

OPTIMIZER_KINDS = ("adam", "factored_adam")


@dataclass
class OptimizerConfig:
    """``adam`` (torch's Adam, or AdamW with weight decay) or ``factored_adam`` (the paper's)."""

    name: str = "factored_adam"  # factored_adam (the paper's) or adam
    lr: float = 1e-3  # the peak learning rate (the schedule scales it)
    beta1: float = 0.0  # first-moment decay; 0 (the paper's) keeps no first moment
    beta2: float = 0.999  # second-moment decay
    eps: float = 1e-8  # added to the root of the second moment
    weight_decay: float = 0.0  # decoupled (AdamW-style) weight decay

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_KINDS:
            raise ValueError(f"OptimizerConfig.name: expected one of {OPTIMIZER_KINDS}, "
                             f"found {self.name!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  source: str = "OptimizerConfig") -> "OptimizerConfig":
        """Builds the config from a mapping (a YAML section): unknown fields and wrong types fail
        naming ``source`` and the field (``sparse_moe.config_io.from_dict``)."""
        return from_dict(cls, values, source)


def build_optimizer(params: Iterable[Any], config: OptimizerConfig) -> Optimizer:
    """The configured optimizer over ``params`` (tensors or DeepSpeed-style param groups)."""
    betas = (config.beta1, config.beta2)
    if config.name == "factored_adam":
        return FactoredAdam(params, lr=config.lr, betas=betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    if config.weight_decay:
        return torch.optim.AdamW(params, lr=config.lr, betas=betas, eps=config.eps,
                                 weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, betas=betas, eps=config.eps)


__all__ = ["FactoredAdam", "factored_second_moment", "optimizer_state_numel", "ScheduleConfig",
           "build_scheduler", "warmup_hold_rsqrt", "OptimizerConfig", "build_optimizer"]
