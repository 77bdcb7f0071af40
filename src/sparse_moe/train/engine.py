"""The DeepSpeed engine of a run: one way to build it, for training and for inference.

Training gets the run's completed DeepSpeed config (``ds_config.py``), the configured optimizer
over DeepSpeed's MoE parameter groups and the learning-rate schedule, and the fixes that
depend on what DeepSpeed wrapped: the non-finite guard stays only on an unwrapped optimizer,
whose state is then allocated before the first step; the all-reduce is skipped where there is
no replica; ``FactoredAdam`` learns the layout of ZeRO's flat partitions, so that its moments
stay factored there. Inference (generation, evaluation of a finished run) gets an engine without an
optimizer: fp32 weights, no ZeRO, no monitors, so it can load any run's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch.optim import Optimizer

from sparse_moe.optim import build_optimizer, build_scheduler
from sparse_moe.parallel import deepspeed_internals as ds_internals
from sparse_moe.parallel import (
    factor_flat_partitions,
    moe_param_groups,
    skip_allreduce_without_replicas,
)
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.ds_config import build_ds_config
from sparse_moe.train.nonfinite import NonFiniteGuard

INFERENCE_DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}


@dataclass
class RunEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict[str, Any]
    optimizer: Optimizer | None = None  # the client optimizer (training only)
    guard: NonFiniteGuard | None = None

    @property
    def optimizer_wrapped(self) -> bool:
        """Whether DeepSpeed stepped the optimizer through a wrapper (ZeRO, bf16, fp16)."""
        return self.optimizer is not None and self.engine.optimizer is not self.optimizer


def build_engine(model: torch.nn.Module, config: TrainConfig, world: int, run_dir: Path,
                 training: bool = True, ds_config: dict[str, Any] | None = None) -> RunEngine:
    """``deepspeed.initialize`` for a model built by ``parallelize`` (``ds_config``: the run's,
    when the start-up checks built it already)."""
    if not training:
        engine, *_ = deepspeed.initialize(model=model, config=dict(INFERENCE_DS_CONFIG))
        return RunEngine(engine, dict(INFERENCE_DS_CONFIG))
    if ds_config is None:
        ds_config = build_ds_config(config, world, run_dir, next(model.parameters()).device.type)
    optimizer = build_optimizer(moe_param_groups(model), config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule)
    guard = NonFiniteGuard(optimizer)  # after the scheduler, which wraps optimizer.step too
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    skip_allreduce_without_replicas(engine, optimizer)
    factor_flat_partitions(engine, optimizer)
    undo_zero_gradient_step(engine, optimizer)
    run = RunEngine(engine, ds_config, optimizer, guard)
    if run.optimizer_wrapped:
        guard.disable()  # DeepSpeed's wrapper (ZeRO, bf16, fp16) skips bad steps itself
    elif hasattr(optimizer, "initialize_state"):
        # It steps the model's own parameters: its state is allocated before the first step's
        # buffers (a wrapper would hand it flat partitions of its own instead).
        optimizer.initialize_state()
    return run


def undo_zero_gradient_step(engine: Any, client_optimizer: Optimizer) -> bool:
    """Sets the client optimizer's step counters back to 0 after DeepSpeed's fp16/bf16
    optimizer without ZeRO allocated its state by stepping it once with zero gradients.

    That step leaves every moment at zero but counts as a step, so Adam's bias correction
    would run one step ahead: the first update would be ``sqrt(1 + beta2)`` times too large
    (about 1.41x). Returns whether counters were reset.
    """
    if not ds_internals.is_fp16_optimizer_without_zero(engine.optimizer):
        return False
    for state in client_optimizer.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else 0
    return True
