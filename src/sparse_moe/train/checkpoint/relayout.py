"""Resuming a checkpoint on another layout: another world size or expert-parallel size.

DeepSpeed loads the module of a MoE checkpoint at any ``ep_size`` (one file per global expert),
but its optimizer state only at the layout that wrote it: without ZeRO each expert-parallel
rank's optimizer state is one file (``expp_rank_<r>``), under ZeRO each data-parallel rank's
partition of flat buffers. Its universal checkpoints, made to change layouts, key state by
parameter name, and a stacked expert tensor has the same name on every expert-parallel rank
while holding different experts, so they cannot hold a MoE (DeepSpeed issues #5716, #6589).

Here the optimizer state is re-split on load, from DeepSpeed's own files:

1. the module loads through DeepSpeed (``load_module_only``);
2. the saved state is read per parameter: the saved layout's model is rebuilt on the meta
   device (``parallelize`` with an ``ExpertLayout`` for each saved rank), which gives each
   saved optimizer index, or each ZeRO fragment, its parameter and its block of global experts;
   expert state is concatenated over the saved ranks along the expert dimension;
3. this rank takes its share: the unwrapped optimizer gets a state dict for its own
   parameters; a DeepSpeed wrapper (ZeRO, bf16, fp16) gets every parameter's fp32 master and
   moments through DeepSpeed's ``safe_set_full_*`` API, which knows its partitions, and
   ``FactoredAdam``'s factored moments (which its partitions hold per parameter name,
   ``optim/partitions.py``) through ``FactoredAdam.load_full_moments``;
4. the learning-rate schedule, the step counters and the data position follow.

The state at load equals the saved state reassembled, bit for bit (``tests/train/
test_relayout.py``). What a resumed run reproduces is in ``docs/reliability.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_moe.config_io import ConfigError
from sparse_moe.optim.partitions import FACTORED_KEY
from sparse_moe.parallel import deepspeed_internals as ds_internals
from sparse_moe.train.checkpoint.files import (
    expert_parallel_optimizer_file,
    load_model_states,
    zero_optimizer_file,
)
from sparse_moe.train.checkpoint.shards import expert_blocks

FULL_STATE = dict[str, dict[str, Any]]  # parameter name -> optimizer state key -> value
# FactoredAdam's moments, which its flat partitions hold in their own form (optim/partitions.py)
FACTORED_MOMENTS = ("row", "col", "exp_avg_sq")


@dataclass(frozen=True)
class SavedLayout:
    world: int
    ep_size: int
    zero_stage: int
    bf16: bool
    fp16: bool
    micro_batch: int
    accumulation: int
    data_before_expert: bool = False  # DeepSpeed's alternative rank order

    def ep_rank(self, rank: int) -> int:
        """The expert-parallel rank of global ``rank`` in DeepSpeed's layout."""
        if self.data_before_expert:
            return rank // (self.world // self.ep_size)
        return rank % self.ep_size

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def saved_layout(states: dict[str, Any]) -> SavedLayout:
    """The layout that wrote a checkpoint, from its model states file."""
    ds = states.get("ds_config") or {}
    config = states.get("config") or {}
    zero = (ds.get("zero_optimization") or {}).get("stage", 0)
    return SavedLayout(world=int(states["dp_world_size"]),
                       ep_size=int((config.get("parallel") or {}).get("ep_size", 1)),
                       zero_stage=int(zero), bf16=bool((ds.get("bf16") or {}).get("enabled")),
                       fp16=bool((ds.get("fp16") or {}).get("enabled")),
                       micro_batch=int(ds.get("train_micro_batch_size_per_gpu", 1)),
                       accumulation=int(ds.get("gradient_accumulation_steps", 1)),
                       data_before_expert=bool((config.get("parallel") or {}).get(
                           "use_data_before_expert_parallel", False)))


def read_saved_layout(tag_dir: Path) -> tuple[SavedLayout, dict[str, Any]]:
    states = load_model_states(tag_dir)
    return saved_layout(states), states


def layout_changed(saved: SavedLayout, world: int, ep_size: int) -> bool:
    """Whether the optimizer state must be re-split (another world or expert-parallel size)."""
    return (saved.world, saved.ep_size) != (world, ep_size)


def check_resume(saved: SavedLayout, ds_config: dict[str, Any], world: int, ep_size: int,
                 allow_global_batch_change: bool, where: Path) -> None:
    """What resuming on another layout or batch geometry needs; fails naming the field."""
    if layout_changed(saved, world, ep_size):
        check_regime(saved, ds_config, where)
    check_global_batch(saved, ds_config, world, allow_global_batch_change, where)


def check_regime(saved: SavedLayout, ds_config: dict[str, Any], where: Path) -> None:
    """A checkpoint resumes on a new layout with the same precision and ZeRO stage."""
    zero = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    precision = ("bf16" if (ds_config.get("bf16") or {}).get("enabled") else
                 "fp16" if (ds_config.get("fp16") or {}).get("enabled") else "fp32")
    if (zero, precision) != (saved.zero_stage, saved.precision):
        raise ConfigError(f"{where}: deepspeed.zero_stage and deepspeed.precision: expected ZeRO "
                          f"{saved.zero_stage} and {saved.precision} to resume on another layout "
                          f"(as saved), found ZeRO {zero} and {precision}")
    if zero == 0 and precision != "fp32":
        raise ConfigError(f"{where}: deepspeed.precision: {precision} without ZeRO keeps its "
                          "optimizer state in DeepSpeed's FP16_Optimizer, which this resume "
                          "cannot re-split yet; resume on the saved layout (parallel.ep_size="
                          f"{saved.ep_size}, {saved.world} processes), or train with ZeRO-1")


def check_global_batch(saved: SavedLayout, ds_config: dict[str, Any], world: int,
                       allow_change: bool, where: Path) -> None:
    """The same global batch (micro x accumulation x world) unless allowed to change."""
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], \
        ds_config["gradient_accumulation_steps"]
    found = micro * accumulation * world
    if found != saved.global_batch and not allow_change:
        raise ConfigError(
            f"{where}: data.micro_batch_size x deepspeed.gradient_accumulation_steps x world: "
            f"expected a global batch of {saved.global_batch} sequences (saved as "
            f"{saved.micro_batch} x {saved.accumulation} x {saved.world}), found {found} "
            f"({micro} x {accumulation} x {world}); choose the micro-batch or accumulation that "
            "keeps it, or pass run.allow_global_batch_change=true to continue with the new one "
            "(the remaining data of the epoch is re-split; the schedule counts steps, not "
            "samples)")


# ---------------------------------------------------------------- the saved layout's parameters
def _saved_rank_model(model_config: Any, parallel: Any, ep_size: int, ep_rank: int) -> nn.Module:
    from sparse_moe.parallel import ExpertLayout, parallelize

    return parallelize(model_config, replace(parallel, ep_size=ep_size),
                       ExpertLayout(ep_size, ep_rank), seed=0, device="meta")


def _names_by_index(model: nn.Module) -> list[str]:
    """Parameter names in the order of the optimizer's saved indices (``moe_param_groups``)."""
    from sparse_moe.parallel import moe_param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in moe_param_groups(model) for p in group["params"]]


def _is_expert(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False}


def _merge(full: FULL_STATE, name: str, state: dict[str, Any], expert: bool) -> None:
    """Adds one rank's state of ``name``: expert tensors concatenate along the expert dim."""
    if name not in full or not expert:
        full.setdefault(name, dict(state))
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            full[name][key] = torch.cat([full[name][key], value])


def unwrapped_full_state(tag_dir: Path, saved: SavedLayout, model_config: Any,
                         parallel: Any) -> tuple[FULL_STATE, list[dict[str, Any]]]:
    """Every parameter's optimizer state (experts over all saved ranks) and the saved groups'
    hyperparameters, from the ``expp_rank_<r>`` files of a checkpoint without a wrapper."""
    full: FULL_STATE = {}
    groups: list[dict[str, Any]] = []
    for ep_rank in range(saved.ep_size):
        model = _saved_rank_model(model_config, parallel, saved.ep_size, ep_rank)
        names, experts = _names_by_index(model), _is_expert(model)
        saved_optimizer = torch.load(expert_parallel_optimizer_file(tag_dir, ep_rank),
                                     map_location="cpu", weights_only=False)["optimizer"]
        groups = groups or saved_optimizer["param_groups"]
        for index, state in sorted(saved_optimizer["state"].items()):
            _merge(full, names[index], state, names[index] in experts)
    return full, groups


def zero_full_state(tag_dir: Path, saved: SavedLayout, model_config: Any, parallel: Any
                    ) -> tuple[FULL_STATE, dict[str, torch.Tensor]]:
    """Every parameter's fp32 master and optimizer moments, reassembled from the ZeRO
    partitions of every saved data-parallel rank (DeepSpeed records where each parameter's
    fragment lies in each partition: ``param_slice_mappings``)."""
    experts = _is_expert(_saved_rank_model(model_config, parallel, saved.ep_size, 0))
    pieces: dict[tuple[int, str], list[tuple[int, dict[str, torch.Tensor]]]] = {}
    factored: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for rank in range(saved.world):
        masters, base, slices = ds_internals.read_zero_partition_file(
            zero_optimizer_file(tag_dir, rank, saved.bf16))
        for group, mapping in enumerate(slices):
            moments = base[group].get(FACTORED_KEY)  # FactoredAdam's partitions (partitions.py)
            for name, fragment in mapping.items():
                # a dense parameter is split over every rank; an expert block over the ranks
                # of its expert-data-parallel group (DeepSpeed's layout: rank % ep_size)
                ep_rank = saved.ep_rank(rank) if name in experts else 0
                window = slice(fragment.start, fragment.start + fragment.numel)
                tensors = {"fp32": masters[group][window]}
                tensors.update({key: value[window] for key, value in base[group].items()
                                if torch.is_tensor(value) and value.dim() > 0})
                if moments is not None and name in moments["exp_avg_sq"]:
                    tensors["exp_avg_sq"] = moments["exp_avg_sq"][name]
                if moments is not None and name in moments["row"]:  # whole, on every rank
                    factored.setdefault((ep_rank, name), {"row": moments["row"][name],
                                                          "col": moments["col"][name]})
                pieces.setdefault((ep_rank, name), []).append((rank, tensors))
    full: FULL_STATE = {}
    masters_out: dict[str, torch.Tensor] = {}
    for ep_rank in range(saved.ep_size):
        model = _saved_rank_model(model_config, parallel, saved.ep_size, ep_rank)
        for name, param in model.named_parameters():
            if name not in experts and ep_rank:
                continue  # dense parameters: every expert-parallel rank holds the same
            parts = pieces.get((ep_rank, name), [])
            state = {key: torch.cat([p[1][key] for p in sorted(parts, key=lambda p: p[0])])
                     .view(param.shape) for key in (parts[0][1] if parts else {})}
            master = state.pop("fp32")
            state.update(factored.get((ep_rank, name), {}))
            _merge(full, name, state, name in experts)
            masters_out[name] = master if name not in masters_out else \
                torch.cat([masters_out[name], master])
    return full, masters_out


def _local_rows(value: Any, param: nn.Parameter, first: int, count: int) -> Any:
    return value[first:first + count] if torch.is_tensor(value) and value.dim() > 0 else value


def load_unwrapped_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module,
                             full: FULL_STATE, saved_groups: list[dict[str, Any]]) -> None:
    """This rank's share of ``full`` into an unwrapped client optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = expert_blocks(model)
    state, index = {}, 0
    groups = []
    hyper = {k: v for k, v in saved_groups[0].items() if k not in ("params", "name")}
    for group in optimizer.param_groups:
        ids = []
        for param in group["params"]:
            name = names[id(param)]
            first, count = blocks.get(name, (0, None))
            saved = full[name]
            state[index] = {k: _local_rows(v, param, first, count) if count else v
                            for k, v in saved.items()}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper,
                       "params": ids, **({"name": group["name"]} if "name" in group else {})})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_wrapped_optimizer(engine: Any, model: nn.Module, full: FULL_STATE,
                           masters: dict[str, torch.Tensor], step: int) -> None:
    """Every parameter's fp32 master and moments into DeepSpeed's wrapper, which splits them
    into its partitions (``deepspeed.utils.safe_set_full_*``)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    client = ds_internals.wrapped_optimizer(engine.optimizer)
    ensure_optimizer_state(client)
    link_optimizer_state(engine)
    factored = bool(getattr(client, "partition_layouts", None))
    blocks = expert_blocks(model)
    for name, param in model.named_parameters():
        first, count = blocks.get(name, (0, param.shape[0] if param.dim() else 0))
        rows = slice(first, first + count) if name in blocks else slice(None)
        safe_set_full_fp32_param(param, masters[name][rows].to(param.device))
        tensors = {key: value[rows] for key, value in full[name].items()
                   if torch.is_tensor(value) and value.dim() > 0}
        moments = {k: tensors.pop(k) for k in FACTORED_MOMENTS if factored and k in tensors}
        if moments:
            client.load_full_moments(name, moments)
        for key, value in tensors.items():
            safe_set_full_optimizer_state(param, value.to(param.device), key)
    for state in client.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the state of every (flat) parameter before it is overwritten: DeepSpeed's
    wrappers leave it to the first step. ``FactoredAdam`` allocates it; another optimizer takes
    one step with zero gradients (no change to a parameter without weight decay, and the
    fp32 masters are set afterwards anyway)."""
    if hasattr(optimizer, "initialize_state"):
        optimizer.initialize_state()
        return
    missing = [p for g in optimizer.param_groups for p in g["params"] if p not in optimizer.state]
    if not missing:
        return
    for param in missing:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param in missing:
        param.grad = None


def link_optimizer_state(engine: Any) -> None:
    """Ties each parameter's fragment to the wrapper's optimizer state, which DeepSpeed does
    only at the first step: the ``safe_*_full_optimizer_state`` API needs it before that."""
    ds_internals.link_fragments_to_optimizer_state(engine.optimizer)


def resize_schedule(state: dict[str, Any], groups: int) -> dict[str, Any]:
    """A ``LambdaLR`` state for another number of parameter groups (all share one schedule)."""
    out = dict(state)
    for key in ds_internals.LAMBDA_LR_PER_GROUP_KEYS:
        values = state.get(key)
        if isinstance(values, list) and values:
            if any(v != values[0] for v in values):
                raise ConfigError(f"the learning-rate schedule's {key} differs between parameter "
                                  f"groups ({values}); cannot spread it over {groups} groups")
            out[key] = [values[0]] * groups
    return out
