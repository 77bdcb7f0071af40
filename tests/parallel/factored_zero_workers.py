"""Ranks that train the debug LM under the GPU ds_configs with FactoredAdam as client optimizer.

For every parameter the rank holds (its experts, the dense weights) the worker reads the fp32
master and the full gradient DeepSpeed is about to step with (``deepspeed.utils.safe_get_*``),
steps an independent ``FactoredAdam`` on those tensors in their own shapes, and compares it
with the master DeepSpeed's step produced from its flat partitions. It then checkpoints,
trains on, and resumes from the checkpoint in a fresh engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from sparse_moe.models import compose_loss, lm_preset
from sparse_moe.optim import FactoredAdam
from sparse_moe.optim.partitions import FACTORED_KEY
from sparse_moe.parallel import (
    ExpertParallelConfig,
    create_expert_parallel_groups,
    factor_flat_partitions,
    moe_param_groups,
    parallelize,
)
from sparse_moe.train.engine import undo_zero_gradient_step

REPO = Path(__file__).resolve().parents[2]
VOCAB, LR = 50, 0.01


# bf16 without ZeRO: DeepSpeed keeps fp32 copies in the parameters' own shapes.
INLINE_CONFIGS = {"bf16_no_zero": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}}


def _engine(ds_config_name: str, ep_size: int, groups: Any):
    config = (dict(INLINE_CONFIGS[ds_config_name]) if ds_config_name in INLINE_CONFIGS
              else json.loads((REPO / "ds_configs" / ds_config_name).read_text()))
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
                  gradient_clipping=0.0)  # the reference steps the raw gradient
    config["train_batch_size"] = 4 * torch.distributed.get_world_size()
    model = parallelize(lm_preset("debug-moe", VOCAB), ExpertParallelConfig(ep_size=ep_size),
                        groups, seed=3)
    optimizer = FactoredAdam(moe_param_groups(model), lr=LR, betas=(0.0, 0.99))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    partitions = factor_flat_partitions(engine, optimizer)  # as build_engine does
    undo_zero_gradient_step(engine, optimizer)
    return engine, optimizer, partitions


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(100 * step + rank))


def _train_step(engine: Any, rank: int, step: int) -> float:
    tokens = _batch(rank, step)
    torch.manual_seed(step)
    out = engine(tokens[:, :-1], targets=tokens[:, 1:])
    loss = compose_loss(out, tokens[:, 1:]).total
    engine.backward(loss)
    return float(loss)


def _master(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master DeepSpeed steps: from its partitions (ZeRO, bf16 optimizer), or the fp32
    copy its fp16/bf16 optimizer without ZeRO keeps beside each parameter."""
    copies = getattr(engine.optimizer, "fp32_groups", None)
    if copies is None or not hasattr(engine.optimizer, "fp16_groups"):
        return safe_get_full_fp32_param(param)
    for low, high in zip(engine.optimizer.fp16_groups, copies):
        for p, master in zip(low, high):
            if p is param:
                return master.detach()
    raise KeyError("parameter not in the optimizer's groups")


def _grad(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(engine.optimizer, "fp16_groups"):
        return param.grad.float()
    return safe_get_full_grad(param).float()


def _loss_scale(engine: Any) -> float:
    return float(getattr(engine.optimizer, "loss_scale", 1.0)) if engine.fp16_enabled() else 1.0


def factored_zero_worker(rank: int, world: int, ds_config_name: str, ep_size: int,
                         checkpoint_dir: str) -> dict[str, Any]:
    groups = create_expert_parallel_groups(ep_size)
    engine, optimizer, partitions = _engine(ds_config_name, ep_size, groups)
    named = list(engine.module.named_parameters())
    shadow = {n: torch.nn.Parameter(_master(engine, p).clone()) for n, p in named}
    reference = FactoredAdam(list(shadow.values()), lr=LR, betas=(0.0, 0.99))
    worst, losses = 0.0, []
    for step in range(1, 4):
        losses.append(_train_step(engine, rank, step))
        scale = _loss_scale(engine)
        grads = {n: _grad(engine, p) / scale for n, p in named}
        skipped_before = engine.skipped_steps
        engine.step()
        if engine.skipped_steps > skipped_before:
            continue  # fp16's loss scaler found an overflow: no update on either side
        for name, param in shadow.items():
            param.grad = grads[name]
        reference.step()
        for name, param in named:
            got, want = _master(engine, param), shadow[name].detach()
            worst = max(worst, float(((got - want).abs() / (want.abs() + 1e-3)).max()))
    numbers = _state_numbers(optimizer, engine)
    engine.save_checkpoint(checkpoint_dir, tag="step3")
    continued = [_continue(engine, rank, step) for step in (4, 5)]
    fresh, fresh_optimizer, _ = _engine(ds_config_name, ep_size, groups)
    fresh.load_checkpoint(checkpoint_dir, tag="step3")
    resumed = [_continue(fresh, rank, step) for step in (4, 5)]
    same_masters = all(torch.equal(_master(engine, a), _master(fresh, b))
                       for (_, a), (_, b) in zip(engine.module.named_parameters(),
                                                 fresh.module.named_parameters()))
    return {"wrapper": type(engine.optimizer).__name__, "partitions": partitions,
            "worst_relative": worst, "losses": losses, "continued": continued,
            "resumed": resumed, "same_masters": same_masters, **numbers,
            "state_keys_after_resume": sorted({k for st in fresh_optimizer.state.values() for k in st})}


def _continue(engine: Any, rank: int, step: int) -> float:
    loss = _train_step(engine, rank, step)
    engine.step()
    return loss


def _state_numbers(optimizer: FactoredAdam, engine: Any) -> dict[str, Any]:
    """Numbers of optimizer state held for the expert groups, against the expert matrices'
    rows + columns and their element count (per rank)."""
    expert_state = expected = expert_elements = 0
    for group in optimizer.param_groups:
        if not group.get("moe"):
            continue
        for tensor in group["params"]:
            state = optimizer.state[tensor]
            layout = optimizer.partition_layouts.get(tensor)
            if layout is None:  # a parameter in its own shape
                expert_state += sum(v.numel() for v in state.values() if torch.is_tensor(v))
                expected += (_rows_plus_cols(tuple(tensor.shape)) if tensor.dim() >= 2
                             else tensor.numel())
                expert_elements += tensor.numel()
                continue
            moments = state[FACTORED_KEY]
            expert_state += sum(t.numel() for part in moments.values() for t in part.values())
            expected += sum(_rows_plus_cols(s) for s in layout.matrices.values())
            expected += sum(f.numel for f in layout.fragments if f.name not in layout.matrices)
            expert_elements += sum(f.numel for f in layout.fragments)
    return {"expert_state_numbers": expert_state, "expected_state_numbers": expected,
            "expert_elements_here": expert_elements}


def _rows_plus_cols(shape: tuple[int, ...]) -> int:
    leading = 1
    for n in shape[:-2]:
        leading *= n
    return leading * (shape[-2] + shape[-1])
