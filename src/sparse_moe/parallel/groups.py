"""Process groups for expert parallelism, created by DeepSpeed's own group registry.

The groups are DeepSpeed's (``deepspeed.utils.groups``), so the engine reduces expert
gradients over exactly the expert-data-parallel group the layer was sharded for. The
layer never looks them up itself: they are handed to its dispatcher explicitly.

Layout (DeepSpeed's default, ``ep_size=2``, world 4)::

    expert-parallel groups       [0, 1] [2, 3]   tokens travel by all-to-all inside one
    expert-data-parallel groups  [0, 2] [1, 3]   replicas of the same experts (grad all-reduce)
    data-parallel group          [0, 1, 2, 3]    dense params and balancing statistics
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The groups one rank needs, and its place in them."""

    ep_size: int
    name: str  # DeepSpeed's group name, "ep_size_<ep_size>"; marks expert params
    expert_parallel: ProcessGroup
    expert_data_parallel: ProcessGroup
    data_parallel: ProcessGroup
    ep_rank: int
    expert_data_parallel_size: int
    data_parallel_size: int


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the groups of this expert-parallel size."""
    return f"ep_size_{ep_size}"


def create_expert_parallel_groups(ep_size: int,
                                  use_data_before_expert_parallel: bool = False
                                  ) -> ExpertParallelGroups:
    """Creates (once) and returns DeepSpeed's expert and expert-data-parallel groups.

    Needs an initialised default process group; every rank must call it (group creation
    is collective). Calling it again with the same size returns the existing groups.
    """
    import deepspeed

    from sparse_moe.parallel import deepspeed_internals as ds_internals
    from sparse_moe.parallel.layout import check_world
    from sparse_moe.parallel.startup import load_deepspeed_comm_ops

    if not dist.is_initialized():
        raise RuntimeError("create_expert_parallel_groups: torch.distributed is not initialised; "
                           "call deepspeed.init_distributed() (or init_process_group) first")
    check_world(ep_size, dist.get_world_size())
    if not deepspeed.comm.is_initialized():
        load_deepspeed_comm_ops()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    name = expert_group_name(ep_size)
    if not ds_internals.expert_group_exists(name):
        ds_internals.create_expert_and_data_parallel_groups(ep_size, use_data_before_expert_parallel)
    ep_group = ds_internals.expert_parallel_group(name)
    edp_group = ds_internals.expert_data_parallel_group(name)
    dp_group = ds_internals.data_parallel_group()
    return ExpertParallelGroups(
        ep_size=ep_size, name=name, expert_parallel=ep_group, expert_data_parallel=edp_group,
        data_parallel=dp_group, ep_rank=dist.get_rank(group=ep_group),
        expert_data_parallel_size=dist.get_world_size(group=edp_group),
        data_parallel_size=dist.get_world_size(group=dp_group))
