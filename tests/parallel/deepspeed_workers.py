"""Ranks that train and checkpoint through DeepSpeed's engine (ZeRO 1 and 2, EP=2).

Reference: the same model (same seed) as one process, the global batch, loss
``sum(y * g) / W + aux``, one plain ``torch.optim.SGD`` step. Each rank feeds the engine its
slice with loss ``sum(y_r * g_r) + aux``; the engine averages gradients over the world
(dense) and the expert-data-parallel group (experts), so the parameters must agree.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import deepspeed
import torch
from torch import nn

from sparse_moe.moe import MoEConfig, build_moe
from sparse_moe.parallel import (
    DeepSpeedExpertParallelMoE,
    ExpertParallelConfig,
    build_expert_parallel_moe,
    create_expert_parallel_groups,
    moe_param_groups,
    shard_experts,
    skip_allreduce_without_replicas,
)

D = 8
LR = 0.5


class TinyModel(nn.Module):
    """A dense layer feeding the MoE, so that dense and expert parameters both train."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.moe = moe

    def forward(self, x: torch.Tensor, noise: Any = None):
        return self.moe(torch.tanh(self.proj(x)), noise)


def _build(seed: int, hierarchical: bool = False) -> TinyModel:
    torch.manual_seed(seed)
    if hierarchical:
        cfg = MoEConfig(d_model=D, d_hidden=16, num_experts=4, num_groups=2, k=1, k_primary=2,
                        expert_bias=True)
    else:
        cfg = MoEConfig(d_model=D, d_hidden=16, num_experts=4, k=2, expert_bias=True)
    model = TinyModel(build_moe(cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" not in name:
                param.normal_(0.0, 0.5)
    return model


def _ds_config(stage: int, clip: float = 0.0) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": clip,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _engine(model: nn.Module, stage: int, clip: float = 0.0):
    """The engine as the trainer builds it, all-reduce skipped where it has no replicas."""
    params = moe_param_groups(model)
    optimizer = torch.optim.SGD(params, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=_ds_config(stage, clip))
    skip_allreduce_without_replicas(engine, optimizer)
    return engine


def _shard(model: TinyModel, groups) -> TinyModel:
    shard_experts(model.moe, groups, ExpertParallelConfig(ep_size=groups.ep_size))
    model.moe = DeepSpeedExpertParallelMoE(model.moe, groups)
    return model


def _batch(seed: int, rows_per_rank: list[int], num_experts: int):
    gen = torch.Generator().manual_seed(seed)
    total = sum(rows_per_rank)
    return (torch.randn(total, D, generator=gen), torch.randn(total, D, generator=gen),
            torch.randn(total, num_experts, generator=gen))


def _max_param_diff(sharded: nn.Module, reference: nn.Module, first: int, count: int) -> float:
    ref = {n.replace("moe.", "moe.deepspeed_moe.", 1) if n.startswith("moe.") else n: p
           for n, p in reference.named_parameters()}
    worst = 0.0
    for name, param in sharded.named_parameters():
        expected = ref[name].detach()
        if getattr(param, "allreduce", True) is False:
            expected = expected[first:first + count]
        worst = max(worst, float((param.detach() - expected).abs().max()))
    return worst


def zero_step_worker(rank: int, world: int, runs: list[tuple[int, float]]
                     ) -> dict[str, float]:
    """One optimizer step per (ZeRO stage, clip norm); returns the largest parameter difference.

    With clipping the engine must clip by the norm of the *global* gradient, experts of
    every rank included, as ``clip_grad_norm_`` does on the single-process model.
    """
    groups = create_expert_parallel_groups(2)
    rows = [5, 7]
    start = sum(rows[:rank])
    local = slice(start, start + rows[rank])
    out: dict[str, float] = {}
    for stage, clip in runs:
        reference = _build(seed=stage)
        model = _shard(copy.deepcopy(reference), groups)
        x, g, noise = _batch(100 + stage, rows, 4)

        ref_out = reference(x, noise)
        ((ref_out.y * g).sum() / world + ref_out.aux_loss).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        torch.optim.SGD(reference.parameters(), lr=LR).step()
        key = f"zero{stage}_clip" if clip else f"zero{stage}"

        engine = _engine(model, stage, clip)
        result = engine(x[local], noise[local])
        engine.backward((result.y * g[local]).sum() + result.aux_loss)
        engine.step()
        moe = engine.module.moe
        first = groups.ep_rank * moe.num_local_experts
        out[key] = _max_param_diff(engine.module, reference, first, moe.num_local_experts)
        out[f"{key}_moved"] = max(float((p.detach() - q.detach()).abs().max())
                                  for p, q in zip(_build(seed=stage).parameters(),
                                                  reference.parameters()))
    return out


def single_process_step_worker(rank: int, world: int) -> dict[str, Any]:
    """One process, no ZeRO, clipping on: the engine (its all-reduce skipped) against plain
    autograd, ``clip_grad_norm_`` and ``torch.optim.SGD`` on a copy of the same model."""
    reference = _build(seed=5)
    model = copy.deepcopy(reference)
    x, g, noise = _batch(105, [6], 4)
    ref_out = reference(x, noise)
    ((ref_out.y * g).sum() + ref_out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    engine = _engine(model, stage=0, clip=0.5)
    result = engine(x, noise)
    engine.backward((result.y * g).sum() + result.aux_loss)
    engine.step()
    diff = max(float((p.detach() - q.detach()).abs().max())
               for p, q in zip(engine.module.parameters(), reference.parameters()))
    moved = max(float((p.detach() - q.detach()).abs().max())
                for p, q in zip(_build(seed=5).parameters(), reference.parameters()))
    return {"diff": diff, "moved": moved, "allreduce": engine.enable_backward_allreduce}


def built_in_place_worker(rank: int, world: int) -> dict[str, Any]:
    """A layer built shard-only from a per-rank seed agrees after ``deepspeed.initialize``.

    The engine broadcasts dense parameters from rank 0; returns rank 0's dense parameters
    and this rank's expert shapes, for the test to compare across ranks.
    """
    groups = create_expert_parallel_groups(2)
    torch.manual_seed(1000 + rank)  # deliberately different on every rank
    cfg = MoEConfig(d_model=D, d_hidden=16, num_experts=4, k=2)
    layer = build_expert_parallel_moe(cfg, ExpertParallelConfig(ep_size=2), groups)
    with torch.no_grad():
        layer.router.w_gate.normal_()
    before = layer.router.w_gate.detach().clone()
    model = TinyModel(DeepSpeedExpertParallelMoE(layer, groups))
    engine = _engine(model, 2)
    return {"gate_before": before,
            "dense": {n: p.detach().clone() for n, p in engine.module.named_parameters()
                      if getattr(p, "allreduce", True) is not False},
            "expert_shapes": [tuple(p.shape) for p in layer.experts.parameters()],
            "marked": all(p.allreduce is False and p.group_name == "ep_size_2"
                          for p in layer.experts.parameters())}


def checkpoint_worker(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    """Save with EP=2 through the engine, load into a fresh EP=2 model, compare outputs."""
    groups = create_expert_parallel_groups(2)
    x, _, noise = _batch(5, [6, 6], 4)
    results: dict[str, Any] = {}
    for hierarchical in (False, True):
        tag = "hier" if hierarchical else "flat"
        trained = _engine(_shard(_build(seed=21, hierarchical=hierarchical), groups), 2)
        # one step so the saved weights differ from any fresh initialisation
        y = trained(x, _noise_for(trained, x, noise)).y
        trained.backward(y.square().sum())
        trained.step()
        trained.eval()
        with torch.no_grad():
            expected = trained(x).y
        trained.save_checkpoint(save_dir, tag=tag)

        fresh = _engine(_shard(_build(seed=99, hierarchical=hierarchical), groups), 2)
        fresh.eval()
        with torch.no_grad():
            before = fresh(x).y
        fresh.load_checkpoint(save_dir, tag=tag)
        with torch.no_grad():
            after = fresh(x).y
        results[tag] = {"differs_before": float((before - expected).abs().max()),
                        "after": float((after - expected).abs().max())}
        if not hierarchical:
            # the per-expert files also load into another layout: all experts on each rank
            single = _engine(_shard(_build(seed=98), create_expert_parallel_groups(1)), 2)
            single.load_checkpoint(save_dir, tag=tag, load_module_only=True)
            single.eval()
            with torch.no_grad():
                results["ep1_after"] = float((single(x).y - expected).abs().max())
    results["files"] = sorted(os.listdir(os.path.join(save_dir, "flat")))
    return results


def _noise_for(engine, x, noise):
    layer = engine.module.moe.deepspeed_moe
    if layer.config.hierarchical:
        return None
    return noise[: x.shape[0]]


def oversized_expert_group_worker(rank: int, world: int, stage: int) -> dict[str, Any]:
    """Expert tensors above DeepSpeed's ``max_group_size`` (lowered here to 100 elements, so
    that one stacked tensor of 4 x 8 x 16 exceeds it, as MoE-1024-h's do at the real limit):
    the optimizer, its warmup scheduler and the engine agree on the groups and step."""
    from sparse_moe.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler

    model = _shard(_build(seed=7), create_expert_parallel_groups(1))
    groups = moe_param_groups(model, max_group_size=100)
    optimizer = build_optimizer(groups, OptimizerConfig(lr=0.01))
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=4))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=_ds_config(stage))
    x, g, noise = _batch(11, [6], 4)
    lrs = []
    for _ in range(2):
        out = engine(x, noise)
        engine.backward((out.y * g).sum() + out.aux_loss)
        engine.step()
        lrs.append(engine.get_lr())
    return {"groups": len(optimizer.param_groups), "expert_groups": sum(
        bool(group.get("moe")) for group in groups), "lrs": lrs,
        "empty": sum(not group["params"] for group in optimizer.param_groups)}
