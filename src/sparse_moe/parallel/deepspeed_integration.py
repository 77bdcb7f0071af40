"""Makes the layer a first-class MoE for DeepSpeed's engine.

DeepSpeed treats a parameter as an expert parameter when ``param.allreduce is False``; it
then reduces its gradient over the expert-data-parallel group named by
``param.group_name`` (dividing by the data-parallel world size, so the gradient scale does
not depend on ``ep_size``), and ZeRO 1/2 keep such parameters in their own ``moe`` optimizer
groups. Expert checkpoint files (one per global expert) are written only for modules that
are instances of ``deepspeed.moe.layer.MoE``, and only for state-dict keys of the form
``<layer>.deepspeed_moe.experts.deepspeed_experts.<local expert>.<name>``.

``DeepSpeedExpertParallelMoE`` is therefore a thin subclass of DeepSpeed's ``MoE`` that
holds our layer as ``deepspeed_moe`` and, in its state dict only, presents the stacked
``[E_local, ...]`` expert tensors as one entry per local expert. The engine's own
checkpointing then saves each rank's experts to per-expert files with global ids and loads
them back (whatever ``ep_size`` the loader uses); the hooks restack them on load.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import Tensor, nn

from sparse_moe.moe import GroupedFFNExperts, MoEConfig, MoEOutput
from sparse_moe.optim.partitions import Fragment, PartitionLayout
from sparse_moe.parallel import deepspeed_internals as ds_internals
from sparse_moe.parallel.groups import ExpertParallelGroups

PER_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
STACKED_PREFIX = "deepspeed_moe.experts."
_PER_EXPERT_KEY = re.compile(r"deepspeed_experts\.(\d+)\.(weights|biases)\.(\d+)$")


def mark_expert_parameters(module: nn.Module, group_name: str) -> int:
    """Marks every expert parameter of ``module`` the way ``deepspeed.moe.experts`` does.

    Returns the number of parameters marked.
    """
    marked = 0
    for sub in module.modules():
        if isinstance(sub, GroupedFFNExperts):
            for param in sub.parameters():
                param.allreduce = False
                param.group_name = group_name
                marked += 1
    return marked


DEEPSPEED_MAX_GROUP_SIZE = 178956971  # split_params_into_different_moe_groups_for_optimizer's


def moe_param_groups(model: nn.Module, max_group_size: int | None = DEEPSPEED_MAX_GROUP_SIZE,
                     **optimizer_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups with experts split out by DeepSpeed's own helper.

    Pass the result to the optimizer (or as ``model_parameters`` to
    ``deepspeed.initialize``); ZeRO 1/2 require expert parameters in ``moe`` groups.

    DeepSpeed's helper cuts expert groups at ``max_group_size`` elements, and when a single
    tensor is larger (the stacked experts of MoE-1024-h hold 537M) it emits an empty group
    before it. ``deepspeed.initialize`` later drops empty groups from the optimizer, after
    the learning-rate scheduler has counted them, and the first ``engine.step()`` failed in
    the scheduler (``zip() argument 2 is longer than argument 1``). Empty groups are dropped
    here, so the optimizer and the scheduler see the same groups from the start.
    """
    group = {"params": [p for p in model.parameters() if p.requires_grad],
             "name": "dense-params", **optimizer_options}
    groups = split_params_into_different_moe_groups_for_optimizer(group, max_group_size)
    return [g for g in groups if g["params"]]


def skip_allreduce_without_replicas(engine: DeepSpeedEngine, client_optimizer: Any) -> bool:
    """Turns the engine's gradient all-reduce off where there is nothing to reduce.

    With one process and the client optimizer unwrapped (no ZeRO, no fp16 wrapper, whose
    reductions live inside the optimizer), DeepSpeed's fallback all-reduce still flattens
    every gradient into a bucket, reduces it over a group of one and copies it back: three
    passes over all gradients per step, most of them experts' (``docs/benchmarks.md``,
    "Design choices measured"). Returns whether it was turned off.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != 1 or engine.optimizer is not client_optimizer:
        return False
    engine.enable_backward_allreduce = False
    return True


def factor_flat_partitions(engine: DeepSpeedEngine, client_optimizer: Any) -> int:
    """Gives a ``FactoredAdam`` under ZeRO-1/2 or DeepSpeed's bf16 optimizer the layout of its
    flat partitions, so that its matrices keep factored moments (``optim/partitions.py``).

    DeepSpeed links every parameter to its fragment of the fp32 partition
    (``param._hp_mapping``: where the fragment starts in the parameter and in the partition);
    the ranks sharing a group are its data-parallel group, the expert-data-parallel group for
    experts (``real_dp_process_group``). Returns the number of partitions given a layout (0
    when the optimizer is not wrapped that way: unwrapped, or fp16/bf16 without ZeRO, where
    DeepSpeed keeps fp32 copies in the parameters' own shapes).
    """
    wrapper = engine.optimizer
    if not hasattr(client_optimizer, "attach_partitions") or wrapper is client_optimizer:
        return 0
    partitions = ds_internals.flat_fp32_partitions(wrapper)
    low_precision = ds_internals.low_precision_groups(wrapper)
    if partitions is None or low_precision is None:
        return 0
    layouts = {}
    for i, (flat, params) in enumerate(zip(partitions, low_precision)):
        layouts[flat] = _partition_layout(params, ds_internals.parameter_names(wrapper),
                                          ds_internals.partition_group(wrapper, i))
    client_optimizer.attach_partitions(layouts)
    return len(layouts)


def _partition_layout(params: list[nn.Parameter], names: dict[nn.Parameter, str],
                      group: Any) -> PartitionLayout:
    fragments = []
    for param in params:
        piece = ds_internals.fragment(param)
        if piece is None:
            continue  # no element of this parameter lies in this rank's partition
        fragments.append(Fragment(names[param], tuple(param.shape), piece.parameter_start,
                                  piece.partition_start, piece.numel))
    reduce = None
    if dist.get_world_size(group=group) > 1:
        def reduce(buffer: Tensor) -> None:
            dist.all_reduce(buffer, group=group)
    return PartitionLayout(
        fragments=sorted(fragments, key=lambda f: f.part_start),
        matrices={names[p]: tuple(p.shape) for p in params if p.dim() >= 2},
        vectors={names[p]: tuple(p.shape) for p in params if p.dim() < 2},
        all_reduce=reduce)


class DeepSpeedExpertParallelMoE(DeepSpeedMoE):
    """A sparse_moe layer (flat or hierarchical) that DeepSpeed's engine recognises as MoE.

    ``DeepSpeedMoE.__init__`` is deliberately not called: it would build DeepSpeed's own
    gate and experts. The attributes the engine reads (``num_experts``, ``ep_size``,
    ``num_local_experts``, ``expert_group_name``) are set here instead.
    """

    def __init__(self, layer: nn.Module, groups: ExpertParallelGroups | Any) -> None:
        """``groups``: the process groups the layer was sharded for, or anything else with their
        ``ep_size`` and ``name`` (an ``ExpertLayout`` for a build that only counts)."""
        nn.Module.__init__(self)
        expected_local = layer.config.num_experts // groups.ep_size
        if layer.experts.num_experts != expected_local:
            raise ValueError(f"DeepSpeedExpertParallelMoE: expected a layer sharded for "
                             f"ep_size={groups.ep_size} ({expected_local} local experts), "
                             f"found {layer.experts.num_experts} local experts")
        self.deepspeed_moe = layer
        self.num_experts = layer.config.num_experts
        self.ep_size = groups.ep_size
        self.num_local_experts = layer.experts.num_experts
        self.expert_group_name = groups.name
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        mark_expert_parameters(layer, groups.name)
        self.register_state_dict_post_hook(_split_experts_hook)
        self.register_load_state_dict_pre_hook(_stack_experts_hook)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this; the groups already exist (the layer was sharded for them)."""
        if not ds_internals.expert_group_exists(self.expert_group_name):
            raise RuntimeError(f"DeepSpeedExpertParallelMoE: DeepSpeed has no process group "
                               f"{self.expert_group_name!r}; create it with "
                               "create_expert_parallel_groups before building the layer")

    def forward(self, x: Tensor, noise: Any = None) -> MoEOutput:  # type: ignore[override]
        return self.deepspeed_moe(x, noise)

    # The layer's own view, so that readers of a model (budgets, analyses) need not know that
    # DeepSpeed's wrapper is there.
    @property
    def config(self) -> MoEConfig:
        return self.deepspeed_moe.config

    @property
    def experts(self) -> GroupedFFNExperts:
        return self.deepspeed_moe.experts

    @property
    def dispatcher(self) -> Any:
        return self.deepspeed_moe.dispatcher


def _split_experts_hook(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                        local_metadata: Any) -> None:
    """``experts.weights.i`` [E_local, ...] -> ``experts.deepspeed_experts.e.weights.i``."""
    for key in [k for k in state_dict if k.startswith(prefix + STACKED_PREFIX)]:
        rest = key[len(prefix + STACKED_PREFIX):]
        kind, _, index = rest.partition(".")
        if kind not in ("weights", "biases") or not index.isdigit():
            continue
        stacked = state_dict.pop(key)
        for expert in range(stacked.shape[0]):
            state_dict[f"{prefix}{PER_EXPERT_PREFIX}{expert}.{rest}"] = stacked[expert]


def _stack_experts_hook(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                        local_metadata: Any, strict: bool, missing_keys: list[str],
                        unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Inverse of ``_split_experts_hook``; incomplete sets are left for strict loading to name.

    Each expert's tensor is copied straight into its row of the stacked parameter, which then
    stands in the state dict for itself (loading copies it onto itself): no stacked copy of
    the experts is ever made, so loading costs the files DeepSpeed read and nothing more.
    """
    num_local = module.num_local_experts
    found: dict[str, dict[int, str]] = {}
    for key in [k for k in state_dict if k.startswith(prefix + PER_EXPERT_PREFIX)]:
        match = _PER_EXPERT_KEY.search(key)
        if match:
            found.setdefault(f"{match.group(2)}.{match.group(3)}", {})[int(match.group(1))] = key
    for rest, per_expert in found.items():
        if sorted(per_expert) != list(range(num_local)):
            error_msgs.append(f"{prefix}{STACKED_PREFIX}{rest}: expected local experts "
                              f"0..{num_local - 1} in the checkpoint, found {sorted(per_expert)}")
            continue
        target = module.deepspeed_moe.experts.get_parameter(rest)
        slices = [state_dict.pop(per_expert[e]) for e in range(num_local)]
        if any(piece.shape != target.shape[1:] for piece in slices):
            stacked = torch.stack(slices)  # strict loading names the mismatch
        else:
            with torch.no_grad():
                for row, piece in zip(target, slices):
                    row.copy_(piece)
            stacked = target.detach()
        state_dict[f"{prefix}{STACKED_PREFIX}{rest}"] = stacked
