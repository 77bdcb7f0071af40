"""Expert parallelism for the MoE layer, on DeepSpeed's process groups.

    groups = create_expert_parallel_groups(ep_size=2)
    moe = build_moe(config)                       # same seed on every rank
    shard_experts(moe, groups)                    # keep this rank's experts, install EP dispatch
    model.moe = DeepSpeedExpertParallelMoE(moe, groups)   # so the engine treats it as MoE
    engine, *_ = deepspeed.initialize(model=model, model_parameters=moe_param_groups(model), ...)
"""

from sparse_moe.parallel.comm import CommTimer, all_to_all_rows
from sparse_moe.parallel.config import ExpertParallelConfig
from sparse_moe.parallel.deepspeed_integration import (DeepSpeedExpertParallelMoE,
                                                       mark_expert_parameters, moe_param_groups,
                                                       skip_allreduce_without_replicas)
from sparse_moe.parallel.dispatcher import ExpertParallelDispatcher, source_major_to_expert_major
from sparse_moe.parallel.groups import (ExpertParallelGroups, create_expert_parallel_groups,
                                        expert_group_name)
from sparse_moe.parallel.metrics import RoutingMetrics, routing_metrics
from sparse_moe.parallel.sharding import (build_expert_parallel_moe, check_layout,
                                          expert_parameters, shard_experts)

__all__ = [
    "ExpertParallelConfig", "ExpertParallelGroups", "create_expert_parallel_groups",
    "expert_group_name", "ExpertParallelDispatcher", "source_major_to_expert_major",
    "CommTimer", "all_to_all_rows", "DeepSpeedExpertParallelMoE", "mark_expert_parameters",
    "moe_param_groups", "RoutingMetrics", "routing_metrics", "build_expert_parallel_moe",
    "check_layout", "expert_parameters", "shard_experts", "skip_allreduce_without_replicas",
]
