"""Turns a built MoE layer into its expert-parallel shard for this rank."""

from __future__ import annotations

import torch
from torch import nn

from sparse_moe.moe import GroupedFFNExperts, HierarchicalMoE, MoE, MoEConfig, build_moe
from sparse_moe.parallel.config import ExpertParallelConfig
from sparse_moe.parallel.dispatcher import ExpertParallelDispatcher
from sparse_moe.parallel.groups import ExpertParallelGroups, create_expert_parallel_groups
from sparse_moe.parallel.layout import check_layer

MoELayer = MoE | HierarchicalMoE


check_layout = check_layer  # the layer's layout check (parallel/layout.py)


def make_dispatcher(config: MoEConfig, groups: ExpertParallelGroups,
                    parallel: ExpertParallelConfig) -> ExpertParallelDispatcher:
    check_layout(config, groups.ep_size)
    return ExpertParallelDispatcher(config.num_experts, groups, parallel.capacity_factor,
                                    parallel.min_capacity, parallel.time_communication)


def shard_experts(layer: MoELayer, groups: ExpertParallelGroups,
                  parallel: ExpertParallelConfig | None = None) -> ExpertParallelDispatcher:
    """Keeps this rank's block of the layer's experts and installs the EP dispatcher.

    The layer must hold all ``num_experts`` experts (as built without a dispatcher, e.g. the
    same seed on every rank). Its expert parameters are replaced by copies of rows
    ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` and marked for DeepSpeed.
    """
    from sparse_moe.parallel.deepspeed_integration import mark_expert_parameters

    parallel = parallel or ExpertParallelConfig(ep_size=groups.ep_size)
    if parallel.ep_size != groups.ep_size:
        raise ValueError(f"ExpertParallelConfig.ep_size: expected {groups.ep_size} (the groups' "
                         f"size), found {parallel.ep_size}")
    cfg = layer.config
    if layer.experts.num_experts != cfg.num_experts:
        raise ValueError(f"shard_experts: expected a layer holding all {cfg.num_experts} experts, "
                         f"found {layer.experts.num_experts} (already sharded?)")
    dispatcher = make_dispatcher(cfg, groups, parallel)
    local = GroupedFFNExperts(dispatcher.num_local_experts, cfg.d_model, cfg.d_hidden, cfg.d_out,
                              cfg.expert_hidden_layers, cfg.expert_bias)
    local.to(device=layer.experts.weights[0].device, dtype=layer.experts.weights[0].dtype)
    block = slice(dispatcher.first_local_expert,
                  dispatcher.first_local_expert + dispatcher.num_local_experts)
    with torch.no_grad():
        for mine, full in zip(local.parameters(), layer.experts.parameters()):
            mine.copy_(full[block])
    layer.experts = local
    layer.set_dispatcher(dispatcher)
    mark_expert_parameters(layer, groups.name)
    return dispatcher


def build_expert_parallel_moe(config: MoEConfig, parallel: ExpertParallelConfig,
                              groups: ExpertParallelGroups | None = None) -> MoELayer:
    """Builds a layer that only ever allocates this rank's experts.

    Expert weights are initialised from this process's RNG; the DeepSpeed engine
    broadcasts dense weights from data-parallel rank 0 and expert weights within their
    expert-data-parallel group, so replicas agree after ``deepspeed.initialize``.
    """
    from sparse_moe.parallel.deepspeed_integration import mark_expert_parameters

    groups = groups or create_expert_parallel_groups(parallel.ep_size,
                                                     parallel.use_data_before_expert_parallel)
    layer = build_moe(config, make_dispatcher(config, groups, parallel))
    mark_expert_parameters(layer, groups.name)
    return layer


def expert_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights and biases of every MoE layer in ``layer``."""
    params: list[nn.Parameter] = []
    for module in layer.modules():
        if isinstance(module, GroupedFFNExperts):
            params.extend(module.parameters())
    return params
