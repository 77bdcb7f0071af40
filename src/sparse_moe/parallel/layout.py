"""The one place that says which expert-parallel layouts are valid.

``ep_size`` ranks share one copy of the experts, each holding a contiguous block of
``num_experts / ep_size``; the world is split into ``world / ep_size`` such groups. So
``ep_size`` divides the world and every MoE layer's experts, and, since each group of a
hierarchical layer lives on one rank (as the paper places each secondary MoE on one device),
its groups too. Every check of these (the trainer, the input checks, the planner, the groups,
the dispatcher, ``parallelize``) calls a function here, so they all say the same.
"""

from __future__ import annotations

from sparse_moe.moe import MoEConfig

FIELD = "parallel.ep_size"


def check_world(ep_size: int, world: int) -> None:
    """``ep_size`` divides the number of processes."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 \
            or world % ep_size:
        raise ValueError(f"{FIELD}: expected a divisor of the world size {world}, found "
                         f"{ep_size!r}")


def check_experts(num_experts: int, ep_size: int) -> None:
    """``ep_size`` divides a layer's experts (every rank gets the same number)."""
    if num_experts % ep_size:
        raise ValueError(f"{FIELD}: expected a divisor of MoEConfig.num_experts={num_experts}, "
                         f"found {ep_size}")


def check_layer(config: MoEConfig, ep_size: int) -> None:
    """``ep_size`` splits a layer's experts evenly, and a hierarchical layer's groups whole."""
    check_experts(config.num_experts, ep_size)
    if config.hierarchical and config.num_groups % ep_size:
        raise ValueError(f"{FIELD}: expected a divisor of MoEConfig.num_groups="
                         f"{config.num_groups} (each group of experts lives on one rank), "
                         f"found {ep_size}")
