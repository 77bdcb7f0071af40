"""Every use of DeepSpeed's (and one of PyTorch's) private names, in one place.

DeepSpeed has no public API for what these do: create and look up expert-parallel process
groups, read where a parameter's fragment lies in a ZeRO partition, link that fragment to the
optimizer state before the first step, read a ZeRO checkpoint's partitions, restore the
engine's step counters on another layout, learn which files a save writes, keep the CSV
monitor from writing a second header, find a JIT-built op's build directory. (The checkpoint
file names, which DeepSpeed makes in private methods too, are in ``train/checkpoint/files.py``
and pinned by ``tests/train/test_checkpoint_files.py``.) Each function here names what it relies on, and
``tests/parallel/test_deepspeed_internals.py`` pins that behaviour against the installed
DeepSpeed, so an upgrade that changes one fails there, by name, rather than somewhere in a
training run. The rest of the code calls these functions or DeepSpeed's public API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

# ------------------------------------------------------------------ process groups
# deepspeed.utils.groups keeps its expert-parallel groups in module-level dicts keyed by a name
# ("ep_size_<n>") and creates them with _create_expert_and_data_parallel; its public
# initialize() is deprecated and builds groups for one size only.


def expert_group_exists(name: str) -> bool:
    from deepspeed.utils import groups

    return name in groups._get_expert_parallel_group_dict()


def create_expert_and_data_parallel_groups(ep_size: int, data_before_expert: bool) -> None:
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(
        ep_size, use_data_before_expert_parallel_=data_before_expert)


def expert_parallel_group(name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(name)


def data_parallel_group() -> Any:
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


# ------------------------------------------------------------------ ZeRO and bf16 wrappers
class Fragment(NamedTuple):
    """Where this rank's piece of a parameter lies: its first element in the flattened
    parameter, its first element in the rank's flat partition, and its length."""

    parameter_start: int
    partition_start: int
    numel: int


def flat_fp32_partitions(wrapper: Any) -> list[torch.Tensor] | None:
    """This rank's fp32 partition of each parameter group (ZeRO-1/2: ``single_partition_of_
    fp32_groups``; the bf16 optimizer: ``fp32_groups_flat_partition``), or None."""
    return (getattr(wrapper, "single_partition_of_fp32_groups", None)
            or getattr(wrapper, "fp32_groups_flat_partition", None))


def low_precision_groups(wrapper: Any) -> list[list[torch.nn.Parameter]] | None:
    """The model's parameters of each group as the wrapper holds them (``bit16_groups`` under
    ZeRO, ``bf16_groups`` in the bf16 optimizer), or None."""
    return getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None)


def partition_group(wrapper: Any, index: int) -> Any:
    """The ranks sharing group ``index``'s partitions (the expert-data-parallel group for
    experts): ``real_dp_process_group``."""
    return wrapper.real_dp_process_group[index]


def parameter_names(wrapper: Any) -> dict[torch.nn.Parameter, str]:
    return wrapper.param_names


def fragment(param: torch.nn.Parameter) -> Fragment | None:
    """The parameter's fragment in this rank's partition (``param._hp_mapping``), or None when
    none of its elements lies there."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return Fragment(mapping.lp_fragment_address.start, mapping.hp_fragment_address.start,
                    mapping.hp_fragment_address.numel)


def link_fragments_to_optimizer_state(wrapper: Any) -> bool:
    """Ties each fragment to the optimizer state, which DeepSpeed does lazily at the first step
    (``_lazy_init_hp_params_optimizer_state``); ``safe_set_full_optimizer_state`` needs it
    before then. Returns whether the wrapper has the method."""
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    return link is not None


def wrapped_optimizer(wrapper: Any) -> torch.optim.Optimizer:
    """The client optimizer inside DeepSpeed's wrapper (``.optimizer``)."""
    return wrapper.optimizer


def is_fp16_optimizer_without_zero(optimizer: Any) -> bool:
    """DeepSpeed's fp16/bf16 wrapper without ZeRO (``runtime.fp16``'s two classes), which
    allocates the client's state by stepping it once with zero gradients."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer))


class ZeroPartitionFile(NamedTuple):
    """One data-parallel rank's ZeRO optimizer file, as its ``optimizer_state_dict`` holds it."""

    masters: list[torch.Tensor]  # the fp32 partition of each group
    states: list[dict[str, Any]]  # the client optimizer's state of each group's partition
    slices: list[dict[str, Any]]  # per group: parameter name -> fragment (.start, .numel)


def read_zero_partition_file(path: Any) -> ZeroPartitionFile:
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    masters = (saved.get("single_partition_of_fp32_groups")
               or saved.get("fp32_groups_flat_partition"))
    return ZeroPartitionFile(masters, saved["base_optimizer_state"]["state"],
                             saved["param_slice_mappings"])


# ------------------------------------------------------------------ the engine
def set_step_counters(engine: Any, global_steps: int, global_samples: int,
                      skipped_steps: int) -> None:
    """What ``load_checkpoint`` restores with the optimizer, set by hand when the optimizer
    state is re-split instead (``load_module_only``)."""
    engine.global_steps = global_steps
    engine.global_samples = global_samples
    engine.skipped_steps = skipped_steps


def skipped_steps(engine: Any) -> int:
    return int(engine.skipped_steps)


def intercept_checkpoint_writes(engine: Any,
                                save: Callable[[Callable[[Any, str], None], Any, str], None]
                                ) -> None:
    """Every file ``engine.save_checkpoint`` writes goes through ``save(original, state,
    path)``: the engine writes each through ``engine.checkpoint_engine.save``, by position
    for some files and by keyword (``state_dict=``, ``path=``) for others, so the wrapper
    keeps ``CheckpointEngine.save``'s parameter names."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save

    def wrapped(state_dict: Any, path: str) -> None:
        save(original, state_dict, path)

    checkpoint_engine.save = wrapped


def csv_monitor_files(monitor: Any) -> list[str] | None:
    """The metric names DeepSpeed's CSV monitor has written a header for (``filenames``): a
    name listed there gets no second header. None without a CSV monitor."""
    csv_monitor = getattr(monitor, "csv_monitor", None)
    return None if csv_monitor is None else csv_monitor.filenames


# ------------------------------------------------------------------ JIT-built ops
def op_compatible(name: str) -> bool:
    """Whether DeepSpeed found op ``name`` buildable here (``deepspeed.ops.__compatible_ops__``)."""
    import deepspeed

    return bool(deepspeed.ops.__compatible_ops__.get(name, False))


def extension_build_directory(name: str) -> Path:
    """Where torch's JIT loader builds extension ``name`` (``cpp_extension._get_build_directory``,
    which honours ``TORCH_EXTENSIONS_DIR``); the loader's ``lock`` baton lives there."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, False))


# ------------------------------------------------------------------ PyTorch's LambdaLR
# LambdaLR.state_dict keeps one entry per parameter group under these keys (``_last_lr`` is
# private): a schedule saved with another number of groups is resized through them.
LAMBDA_LR_PER_GROUP_KEYS = ("base_lrs", "_last_lr", "lr_lambdas")
