"""``sparse-moe-plan``: what one rank of a training run holds, before anything is built.

    sparse-moe-plan --config run.yaml model.preset=moe-4096-h parallel.ep_size=16 \\
        --world 16 --device-memory 80GiB [--json]

From the same config file and overrides as ``sparse-moe-train`` it builds the rank's model on
the meta device (``parallelize`` with an ``ExpertLayout``), then counts per rank: parameters,
the bytes of parameters, gradients and optimizer state under the configured precision and
ZeRO stage (``memory.py``), an activation estimate for the configured micro-batch with and
without activation checkpointing (``activations.py``), the all-to-all bytes and multiply-adds
of one step, and whether the total fits the device. The total includes the framework's own
resident memory (a measured constant for CPU processes, a stated estimate of the CUDA context
for GPUs; both in ``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError
from sparse_moe.models import LMConfig, TranslationConfig
from sparse_moe.models.budget import sampled_columns, training_multiply_adds
from sparse_moe.plan.activations import lm_activations, translation_activations
from sparse_moe.plan.memory import MemoryParts, RankTensors, memory_parts, regime_of
from sparse_moe.train.config import TrainConfig

# Resident memory of a training process before its model: torch, DeepSpeed, gloo, the
# trainer and its readers. CPU: measured (docs/benchmarks.md, "The framework constant"). CUDA: the CUDA
# context, cuBLAS/cuDNN workspaces and NCCL buffers; not measured here (no GPU was lent),
# a typical figure for a current driver on a Hopper GPU.
FRAMEWORK_BYTES = {"cpu": 380 * 2**20, "cuda": 1024 * 2**20}


@dataclass
class Plan:
    """One rank's share of a run (every rank holds the same share)."""

    world: int
    ep_size: int
    device: str
    regime: dict[str, Any]
    params_per_rank: int
    params_detail: dict[str, int]
    bytes_per_rank: dict[str, int]
    activations: dict[str, int]
    peak_phase: str  # when a rank holds ``total``: a training step, or a checkpoint save
    tokens_per_micro_batch: int
    all_to_all_bytes_per_step: int
    multiply_adds_per_step: int
    device_memory: int | None
    fits: bool | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_run(config: TrainConfig, model: LMConfig | TranslationConfig, world: int,
             device: str = "cuda", device_memory: int | None = None) -> Plan:
    """The plan of rank 0 of ``world`` ranks (all ranks hold the same share)."""
    from sparse_moe.parallel import ExpertLayout, moe_configs, parallelize
    from sparse_moe.parallel.layout import check_world
    from sparse_moe.train.ds_config import build_ds_config

    ep = config.parallel.ep_size
    try:
        check_world(ep, world)
    except ValueError as error:
        raise ConfigError(f"--world {world}: {error}") from None
    try:
        built = parallelize(model, config.parallel, ExpertLayout(ep), seed=config.run.seed,
                            device="meta")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    ds_config = build_ds_config(config, world, Path(config.run.dir))
    regime = regime_of(ds_config)
    tensors = RankTensors.of(built, world, ep)
    parts = memory_parts(tensors, regime, config.optimizer.name, config.optimizer.beta1, world)
    layers = moe_configs(model)
    tokens = micro_batch_tokens(config, model)
    act_bytes = 4 if regime.precision == "fp32" else 2
    estimate = (translation_activations(model, layers[0], tokens, ep, act_bytes)
                if isinstance(model, TranslationConfig)
                else lm_activations(model, layers, tokens, ep, act_bytes))
    activations = (estimate.with_checkpointing if model.activation_checkpointing
                   else estimate.without_checkpointing)
    framework = FRAMEWORK_BYTES[device]
    allocator = retained_heap_allowance(config, device, tensors, parts, regime.wrapper)
    step_total = (parts.parameters + parts.gradients + parts.optimizer + parts.buffers
                  + activations + allocator + framework)
    checkpoint = regime.param_bytes * sum(p.numel() for p in tensors.experts)
    save_total = checkpoint_peak(parts, regime.wrapper, tensors.numel, checkpoint) + framework
    total = max(step_total, save_total)
    counts = {"dense": sum(p.numel() for p in tensors.dense),
              "experts": sum(p.numel() for p in tensors.experts)}
    return Plan(
        world=world, ep_size=ep, device=device,
        regime={"precision": regime.precision, "zero_stage": regime.zero_stage,
                "optimizer_wrapper": regime.wrapper, "optimizer": config.optimizer.name},
        params_per_rank=tensors.numel, params_detail=counts,
        bytes_per_rank={"parameters": parts.parameters, "gradients": parts.gradients,
                        "optimizer": parts.optimizer, "activations": activations,
                        "buffers": parts.buffers, "allocator": allocator,
                        "framework": framework, "checkpoint_save": save_total, "total": total},
        activations={"without_checkpointing": estimate.without_checkpointing,
                     "with_checkpointing": estimate.with_checkpointing},
        peak_phase="training step" if step_total >= save_total else "checkpoint save",
        tokens_per_micro_batch=tokens,
        all_to_all_bytes_per_step=all_to_all_bytes(layers, tokens, ep, act_bytes)
        * ds_config["gradient_accumulation_steps"],
        multiply_adds_per_step=training_multiply_adds(built, model, tokens)
        * ds_config["gradient_accumulation_steps"],
        device_memory=device_memory,
        fits=None if device_memory is None else total <= device_memory,
        notes=plan_notes(regime, config, model))


def checkpoint_peak(parts: MemoryParts, wrapper: str, count: int, expert_copy: int) -> int:
    """What a rank holds while DeepSpeed saves a checkpoint: parameters, optimizer state and
    what outlives a step, plus one copy of its experts (DeepSpeed clones every local expert
    before writing them). Gradients are gone by then (set to None after the step), except
    the bf16 optimizer's fp32 accumulation buffers; ZeRO's reduce buckets stay allocated."""
    persistent = {"bf16_optimizer": 4 * count, "zero": parts.buffers}.get(wrapper, 0)
    return parts.parameters + parts.optimizer + persistent + expert_copy


def retained_heap_allowance(config: TrainConfig, device: str, tensors: RankTensors,
                            parts: MemoryParts, wrapper: str) -> int:
    """CPU runs that keep freed host memory (``run.retain_host_memory``) serve every buffer
    from one heap; a long-lived block allocated between two steps can split the space a large
    transient buffer freed, and the next step's copy then extends the heap (measured:
    ``docs/benchmarks.md``). Counted here as the worst case: one more copy of the largest step
    buffer (the all-reduce bucket or a gradient)."""
    if device != "cpu" or not config.run.retain_host_memory or wrapper != "none":
        return 0  # DeepSpeed's wrappers allocate their buffers once, before the first step
    largest_gradient = max((p.numel() for p in tensors.dense + tensors.experts), default=0)
    gradient_bytes = parts.gradients // max(tensors.numel, 1) * largest_gradient
    return max(parts.buffers, gradient_bytes)


def micro_batch_tokens(config: TrainConfig, model: LMConfig | TranslationConfig) -> int:
    """Positions in one micro-batch: sequences x length (LM), ``data.max_tokens`` a side
    (translation)."""
    if isinstance(model, TranslationConfig):
        return config.data.max_tokens
    return config.data.micro_batch_size * config.data.seq_len


def all_to_all_bytes(layers: list, tokens: int, ep: int, element: int) -> int:
    """Bytes this rank sends per micro-step: every MoE layer's rows to the other ranks of its
    group, forward (dispatch, combine) and backward (both again), routing spread evenly."""
    if ep == 1:
        return 0
    sent = 0
    for config in layers:
        rows = tokens * config.experts_per_token * (ep - 1) / ep
        sent += 2 * rows * (config.d_model + config.d_out) * element
    return int(sent)


LARGE_VOCABULARY = 100_000


def plan_notes(regime: Any, config: TrainConfig, model_config: Any = None) -> list[str]:
    notes = []
    if (model_config is not None and model_config.vocab_size >= LARGE_VOCABULARY
            and sampled_columns(model_config) is None):
        notes.append(f"the full softmax over {model_config.vocab_size:,} words dominates the "
                     "activations; model.overrides.softmax.kind=sampled trains with the paper's "
                     "sampled softmax (evaluation stays exact)")
    return notes
