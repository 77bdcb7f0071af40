"""Memory of one rank of a training run, by component, without building anything real.

The model is built on the meta device with ``parallelize`` for rank 0 of the layout (every
rank holds the same share), which gives the exact tensors a rank holds. Their bytes follow
from the precision and ZeRO regime the DeepSpeed config selects, as DeepSpeed's engine does
(``DeepSpeedEngine._do_optimizer_sanity_check``):

================  ==================================================================
regime            what a rank holds (P: its parameters; /s: split over the ranks that
                  hold a replica, the world for dense ones, the expert-data-parallel
                  group for experts)
================  ==================================================================
fp32, ZeRO 0      fp32 parameters and gradients; the client optimizer's own state on
                  the real shapes (the factored moments of ``FactoredAdam``)
bf16/fp16, 0      half parameters and gradients; DeepSpeed's unfused FP16_Optimizer: fp32
                  master copies and fp32 gradients of everything, in the parameters'
                  shapes (so ``FactoredAdam``'s moments are factored as without it)
bf16, ZeRO 1      half parameters; fp32 gradient accumulation (``grad_accum_dtype``);
(fp32 accum)      DeepSpeed's BF16_Optimizer: fp32 masters /s, optimizer state on the
                  flat partitions (``partitioned_state_numel``)
ZeRO 1/2 (other)  half parameters; half gradients (ZeRO 2: /s) and the reduce bucket;
                  fp32 masters and their gradients /s, optimizer state as above
================  ==================================================================

Outside ZeRO, DeepSpeed all-reduces gradients by flattening them into buckets of at least
500M elements: a transient copy of the largest bucket (``buffers``). One process with the
client optimizer unwrapped reduces nothing (``skip_allreduce_without_replicas``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparse_moe.config_io import ConfigError

ALLREDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeedEngine.allreduce_gradients's default
HALF = 2
FULL = 4


@dataclass(frozen=True)
class Regime:
    """Precision and ZeRO stage, as DeepSpeed will run them."""

    precision: str  # fp32 | bf16 | fp16
    zero_stage: int
    fp32_grad_accumulation: bool
    reduce_bucket_elements: int
    overlap_comm: bool = False  # ZeRO: two reduce buckets instead of one

    @property
    def wrapper(self) -> str:
        """DeepSpeed's optimizer wrapper: none, fp16_optimizer, bf16_optimizer or zero."""
        if self.zero_stage:
            if self.precision == "bf16" and self.fp32_grad_accumulation and self.zero_stage == 1:
                return "bf16_optimizer"
            return "zero"
        return "none" if self.precision == "fp32" else "fp16_optimizer"

    @property
    def param_bytes(self) -> int:
        return FULL if self.precision == "fp32" else HALF


def regime_of(ds_config: dict[str, Any]) -> Regime:
    """The regime a completed DeepSpeed config selects (fails where DeepSpeed would)."""
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled"))
    fp16 = bool((ds_config.get("fp16") or {}).get("enabled"))
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    accum = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    fp32_accum = accum in ("fp32", "float32") and precision != "fp32"
    if fp32_accum and stage == 0:
        raise ConfigError(f"deepspeed.config: data_types.grad_accum_dtype=fp32 with {precision} "
                          "needs ZeRO stage 1 or more (DeepSpeed has no such optimizer at stage "
                          "0); found stage 0")
    bucket = int(zero.get("reduce_bucket_size", ALLREDUCE_BUCKET_ELEMENTS))
    return Regime(precision, stage, fp32_accum, bucket, bool(zero.get("overlap_comm", False)))


@dataclass
class RankTensors:
    """The parameters one rank holds, in module order, and how many ranks share each."""

    dense: list[nn.Parameter] = field(default_factory=list)
    experts: list[nn.Parameter] = field(default_factory=list)
    dense_replicas: int = 1  # ranks holding each dense parameter (the world)
    expert_replicas: int = 1  # ranks holding each expert (the expert-data-parallel group)

    @classmethod
    def of(cls, model: nn.Module, world: int, ep_size: int) -> "RankTensors":
        tensors = cls(dense_replicas=world, expert_replicas=world // ep_size)
        seen: set[int] = set()
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            is_expert = getattr(param, "allreduce", True) is False
            (tensors.experts if is_expert else tensors.dense).append(param)
        return tensors

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.dense + self.experts)

    def sharded_numel(self) -> float:
        """Elements per rank of something split over each parameter's replicas (ZeRO)."""
        return (sum(p.numel() for p in self.dense) / self.dense_replicas
                + sum(p.numel() for p in self.experts) / self.expert_replicas)


@dataclass
class MemoryParts:
    parameters: int
    gradients: int
    optimizer: int  # optimizer state and fp32 master copies
    buffers: int  # gradient-reduction buckets


def factored_state_numel(params: list[nn.Parameter], beta1: float) -> int:
    """``FactoredAdam``'s state on the real shapes: rows + cols per matrix, full for vectors."""
    total = 0
    for p in params:
        if p.dim() >= 2:
            total += math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]
        else:
            total += p.numel()
        if beta1 > 0:
            total += p.numel()
    return total


def optimizer_state_numel(name: str, beta1: float, params: list[nn.Parameter] | None,
                          flat_numel: float) -> float:
    """State elements: on the real shapes (``params``) or on flat partitions (``flat_numel``)
    of an optimizer without their layout (Adam's moments, one or two per element)."""
    moments = 2 if name == "adam" else (2 if beta1 > 0 else 1)
    if params is not None:
        if name == "adam":
            return 2 * sum(p.numel() for p in params)
        return factored_state_numel(params, beta1)
    return moments * flat_numel


def partitioned_state_numel(name: str, beta1: float, tensors: RankTensors) -> float:
    """State elements on ZeRO's flat partitions (ZeRO-1/2, DeepSpeed's bf16 optimizer).

    ``FactoredAdam`` learns their layout (``optim/partitions.py``): every rank of a group
    keeps the rows + columns of all of the group's matrices, and its share of the vectors'
    moments (and of the first moment when ``beta1 > 0``). Adam keeps two per element.
    """
    shard = tensors.sharded_numel()
    if name == "adam":
        return 2 * shard
    total = shard if beta1 > 0 else 0.0
    for params, replicas in ((tensors.dense, tensors.dense_replicas),
                             (tensors.experts, tensors.expert_replicas)):
        for p in params:
            if p.dim() >= 2:
                total += math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]
            else:
                total += p.numel() / replicas
    return total


def largest_allreduce_bucket(tensors: RankTensors) -> int:
    """Elements of the largest bucket DeepSpeed flattens when it all-reduces the gradients.

    Dense gradients and each expert group are bucketed apart; a bucket closes once it holds
    more than ``ALLREDUCE_BUCKET_ELEMENTS`` (``DeepSpeedEngine.allreduce_no_retain``).
    """
    largest = 0
    for group in (tensors.dense, tensors.experts):
        bucket = 0
        for param in group:
            bucket += param.numel()
            if bucket > ALLREDUCE_BUCKET_ELEMENTS:
                largest, bucket = max(largest, bucket), 0
        largest = max(largest, bucket)
    return largest


def memory_parts(tensors: RankTensors, regime: Regime, optimizer: str, beta1: float,
                 world: int) -> MemoryParts:
    """Bytes of parameters, gradients, optimizer and reduction buffers on one rank, at the
    moment of the step that holds the most (see the module docstring for the regimes)."""
    count, shard = tensors.numel, tensors.sharded_numel()
    wrapper, half = regime.wrapper, regime.param_bytes
    bucket = largest_allreduce_bucket(tensors)
    if wrapper == "none":
        state = optimizer_state_numel(optimizer, beta1, tensors.dense + tensors.experts, 0)
        buffers = FULL * bucket if world > 1 else 0
        return MemoryParts(FULL * count, FULL * count, int(FULL * state), buffers)
    if wrapper == "fp16_optimizer":
        # fp32 master copies of everything, in the parameters' shapes (DeepSpeed's unfused
        # fp16/bf16 optimizer), so the moments are factored as without a wrapper. The
        # all-reduce bucket (backward) is freed before the fp32 gradients exist (the step).
        state = optimizer_state_numel(optimizer, beta1, tensors.dense + tensors.experts, 0)
        optimizer_bytes = int(FULL * (count + state))
        if half * bucket > FULL * count:
            return MemoryParts(half * count, half * count, optimizer_bytes, half * bucket)
        return MemoryParts(half * count, (half + FULL) * count, optimizer_bytes, 0)
    state = partitioned_state_numel(optimizer, beta1, tensors)
    masters = int(FULL * (shard + state))
    if wrapper == "bf16_optimizer":
        # fp32 accumulation of every gradient, beside the bf16 gradients backward produced;
        # the engine all-reduces the fp32 ones in flattened buckets.
        return MemoryParts(half * count, (FULL + half) * count, masters, FULL * bucket)
    # ZeRO 1/2: fp32 gradient partitions; stage 1 keeps every half gradient, stage 2 its
    # partition; the reduce buckets (two with overlap_comm) are allocated once.
    gradients = half * (count if regime.zero_stage == 1 else shard) + FULL * shard
    buffers = (2 if regime.overlap_comm else 1) * half * regime.reduce_bucket_elements
    return MemoryParts(half * count, int(gradients), masters, buffers)
