"""Expert parallelism for the MoE layer, on DeepSpeed's process groups.

A whole model, in one step (this rank's experts only, on its device, wrapped for DeepSpeed):

    groups = create_expert_parallel_groups(ep_size=2)
    model = parallelize(model_config, ExpertParallelConfig(ep_size=2), groups, seed=1234,
                        device=device)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), ...)

One layer built whole elsewhere can also be sharded after the fact:

    moe = build_moe(config)                       # same seed on every rank
    shard_experts(moe, groups)                    # keep this rank's experts, install EP dispatch
    model.moe = DeepSpeedExpertParallelMoE(moe, groups)   # so the engine treats it as MoE
"""

from sparse_moe.parallel.comm import CommTimer, all_to_all_rows
from sparse_moe.parallel.config import ExpertParallelConfig
from sparse_moe.parallel.deepspeed_integration import (
                                                       DeepSpeedExpertParallelMoE,
                                                       factor_flat_partitions,
                                                       mark_expert_parameters,
                                                       moe_param_groups,
                                                       skip_allreduce_without_replicas,
)
from sparse_moe.parallel.dispatcher import ExpertParallelDispatcher, source_major_to_expert_major
from sparse_moe.parallel.groups import ExpertParallelGroups, create_expert_parallel_groups, expert_group_name
from sparse_moe.parallel.layout import check_experts, check_layer, check_world
from sparse_moe.parallel.metrics import RoutingMetrics, routing_metrics
from sparse_moe.parallel.parallelize_model import (
                                                       ExpertLayout,
                                                       check_model_layout,
                                                       expert_parallel_dispatchers,
                                                       expert_parallel_layers,
                                                       layer_seed,
                                                       moe_configs,
                                                       parallelize,
                                                       rank_parameter_count,
)
from sparse_moe.parallel.sharding import (
                                                       build_expert_parallel_moe,
                                                       check_layout,
                                                       expert_parameters,
                                                       shard_experts,
)

__all__ = [
    "ExpertParallelConfig", "ExpertParallelGroups", "create_expert_parallel_groups",
    "expert_group_name", "ExpertParallelDispatcher", "source_major_to_expert_major",
    "CommTimer", "all_to_all_rows", "DeepSpeedExpertParallelMoE", "mark_expert_parameters",
    "factor_flat_partitions",
    "moe_param_groups", "RoutingMetrics", "routing_metrics", "build_expert_parallel_moe",
    "check_layout", "expert_parameters", "shard_experts", "skip_allreduce_without_replicas",
    "ExpertLayout", "check_model_layout", "expert_parallel_dispatchers", "expert_parallel_layers",
    "layer_seed", "moe_configs", "parallelize", "rank_parameter_count", "check_experts",
    "check_layer", "check_world",
]
