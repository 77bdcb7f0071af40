"""Configuration of expert parallelism (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sparse_moe.config_io import from_dict


@dataclass
class ExpertParallelConfig:
    """How an MoE layer is spread over processes.

    ``ep_size`` ranks share one copy of the experts (each holds ``num_experts / ep_size``);
    the world is split into ``world_size / ep_size`` such groups, and the replicas of an
    expert across groups form its expert-data-parallel group. ``capacity_factor`` (None:
    dropless) bounds the tokens each rank may send to one expert at
    ``ceil(capacity_factor * assignments / num_experts)``; the excess is dropped and counted.
    """

    ep_size: int = 1  # ranks that share one copy of the experts (each holds 1/ep_size)
    # None: dropless; otherwise each rank sends an expert at most capacity_factor x its share
    capacity_factor: float | None = None
    min_capacity: int = 0  # the least capacity per expert when capacity_factor is set
    # Measure the wall time of every all-to-all (forward and backward); costs a sync each.
    time_communication: bool = False
    # DeepSpeed's alternative rank layout: consecutive ranks form expert-data-parallel groups.
    use_data_before_expert_parallel: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.ep_size, int) and self.ep_size >= 1, "ep_size",
                 "a positive integer", self.ep_size)
        _require(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                 "None (dropless) or a positive number", self.capacity_factor)
        _require(isinstance(self.min_capacity, int) and self.min_capacity >= 0, "min_capacity",
                 "a non-negative integer", self.min_capacity)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  source: str = "ExpertParallelConfig") -> "ExpertParallelConfig":
        """Builds the config from a mapping (a YAML section): unknown fields and wrong types fail
        naming ``source`` and the field (``sparse_moe.config_io.from_dict``)."""
        return from_dict(cls, values, source)


def _require(ok: bool, field: str, expected: str, found: Any) -> None:
    if not ok:
        raise ValueError(f"ExpertParallelConfig.{field}: expected {expected}, found {found!r}")
