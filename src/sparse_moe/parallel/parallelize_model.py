"""From a model config to this rank's model in one step (torchtitan's ``parallelize``).

    groups = create_expert_parallel_groups(ep_size)
    model = parallelize(model_config, parallel_config, groups, seed=run_seed, device=device)
    engine, *_ = deepspeed.initialize(model=model, ...)

The model is built directly on ``device`` and each MoE layer holds only this rank's block of
experts: no process ever allocates another rank's experts, so start-up memory is the rank's
share (the dense part plus ``1 / ep_size`` of the experts) whatever the model's size. Each MoE
layer gets its expert-parallel dispatcher, its experts are marked for DeepSpeed, and it is
wrapped as DeepSpeed's ``MoE`` (``DeepSpeedExpertParallelMoE``) so that the engine reduces and
checkpoints the experts as its own.

Initialisation does not depend on the layout: dense weights come from the run seed (they are
built in the same order, consuming the same random numbers, on every rank), and expert ``e``
of MoE layer ``l`` from a seed derived from (run seed, ``l``, ``e``). The experts of an
``ep_size=4`` build, gathered, equal those of an ``ep_size=1`` build bit for bit.

``groups`` may also be an :class:`ExpertLayout` (a rank's place in a layout, without process
groups): the model is then for counting and planning only (usually on the meta device), and
its dispatchers refuse to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparse_moe.models import LMConfig, TranslationConfig, build_model
from sparse_moe.models.layers import MoELayer
from sparse_moe.moe import MoEConfig, build_moe
from sparse_moe.moe.router import Routing
from sparse_moe.parallel.config import ExpertParallelConfig
from sparse_moe.parallel.deepspeed_integration import DeepSpeedExpertParallelMoE
from sparse_moe.parallel.dispatcher import ExpertParallelDispatcher
from sparse_moe.parallel.groups import ExpertParallelGroups, expert_group_name
from sparse_moe.parallel.layout import check_layer

ModelConfig = LMConfig | TranslationConfig


@dataclass(frozen=True)
class ExpertLayout:
    """Rank ``ep_rank`` of an expert-parallel group of ``ep_size``, with no processes behind it.

    Enough to build a rank's share of a model on the meta device (parameter counts, the
    planner, checkpoint checks before any process group exists).
    """

    ep_size: int
    ep_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ExpertLayout.ep_rank: expected an integer in [0, {self.ep_size}), "
                             f"found {self.ep_rank}")

    @property
    def name(self) -> str:
        return expert_group_name(self.ep_size)


class PlannedDispatcher:
    """The expert block of an :class:`ExpertLayout`; a model built with it cannot run."""

    def __init__(self, num_experts: int, layout: ExpertLayout) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts // layout.ep_size
        self.first_local_expert = layout.ep_rank * self.num_local_experts

    def dispatch(self, x: Tensor, routing: Routing, num_experts: int) -> Any:
        raise RuntimeError("this model was built for an ExpertLayout (counting and planning "
                           "only); build it with the process groups of "
                           "create_expert_parallel_groups to run it")

    combine = dispatch

    def reduce_statistics(self, values: Tensor) -> Tensor:
        return self.dispatch(values, None, 0)  # type: ignore[arg-type]


def layer_seed(run_seed: int, moe_index: int) -> int:
    """The initialisation seed of a model's ``moe_index``-th MoE layer (experts derive theirs)."""
    words = np.random.SeedSequence([run_seed, moe_index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def moe_configs(model_config: ModelConfig) -> list[MoEConfig]:
    """The MoEConfig of every MoE layer of a model, in model order (a meta build, no memory)."""
    found: list[MoEConfig] = []

    def record(config: MoEConfig, index: int) -> nn.Module:
        found.append(config)
        return build_moe(config, PlannedDispatcher(config.num_experts, ExpertLayout(1)))

    with torch.device("meta"):
        build_model(model_config, record)
    return found


def check_model_layout(model_config: ModelConfig, ep_size: int) -> None:
    """Every MoE layer splits evenly over ``ep_size`` ranks (whole groups per rank)."""
    for index, config in enumerate(moe_configs(model_config)):
        try:
            check_layer(config, ep_size)
        except ValueError as error:
            raise ValueError(f"MoE layer {index}: {error}") from None


def parallelize(model_config: ModelConfig, parallel: ExpertParallelConfig,
                groups: ExpertParallelGroups | ExpertLayout, *, seed: int,
                device: torch.device | str = "cpu") -> nn.Module:
    """This rank's model: dense layers and its own experts, on ``device``, ready for DeepSpeed.

    ``seed`` is the run seed (dense weights, and with the layer index every expert's). Fails
    before allocating anything when ``groups.ep_size`` does not split some MoE layer evenly.
    """
    if parallel.ep_size != groups.ep_size:
        raise ValueError(f"parallel.ep_size: expected {groups.ep_size} (the groups' size), "
                         f"found {parallel.ep_size}")
    check_model_layout(model_config, groups.ep_size)

    def local_moe(config: MoEConfig, index: int) -> nn.Module:
        if isinstance(groups, ExpertLayout):
            dispatcher: Any = PlannedDispatcher(config.num_experts, groups)
        else:
            dispatcher = ExpertParallelDispatcher(config.num_experts, groups,
                                                  parallel.capacity_factor, parallel.min_capacity,
                                                  parallel.time_communication)
        layer = build_moe(config, dispatcher, init_seed=layer_seed(seed, index))
        layer.noise_stream = index
        return DeepSpeedExpertParallelMoE(layer, groups)

    torch.manual_seed(seed)
    with torch.device(device):
        return build_model(model_config, local_moe)


def expert_parallel_layers(model: nn.Module) -> list[DeepSpeedExpertParallelMoE]:
    """The model's MoE layers as DeepSpeed sees them, in model order."""
    return [m.moe for m in model.modules()
            if isinstance(m, MoELayer) and isinstance(m.moe, DeepSpeedExpertParallelMoE)]


def expert_parallel_dispatchers(model: nn.Module) -> list[ExpertParallelDispatcher]:
    """Each MoE layer's dispatcher, in model order (their counters feed the step metrics)."""
    return [layer.dispatcher for layer in expert_parallel_layers(model)]


def rank_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters this rank holds: ``dense`` (replicated on every rank) and ``experts``."""
    counts = {"dense": 0, "experts": 0}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        kind = "experts" if getattr(param, "allreduce", True) is False else "dense"
        counts[kind] += param.numel()
    return counts
