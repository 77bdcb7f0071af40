"""Code that runs inside the spawned ranks, comparing against the single-process layer.

Every rank builds the same full layer from one seed and keeps a copy as the
single-process reference (``LocalDispatcher``, all experts), then shards the other copy
for expert parallelism. Both see the same global batch and the same fixed gating noise:
the reference all of it, each rank its slice. Losses follow data-parallel semantics:

    rank r:      L_r   = sum(y_r * g_r) + aux          (aux is identical on every rank)
    reference:   L_ref = sum(y * g) / W + aux
    mean_r dL_r/dtheta == dL_ref/dtheta  for every parameter, which is what DeepSpeed's
    engine computes (dense grads all-reduced over the world, expert grads over the
    expert-data-parallel group, both divided by W).

Workers return plain numbers (max absolute differences, flags); the tests assert on them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sparse_moe.moe import MoEConfig, build_moe
from sparse_moe.parallel import (
    ExpertParallelConfig,
    create_expert_parallel_groups,
    routing_metrics,
    shard_experts,
)

D_MODEL, D_HIDDEN = 8, 16


@dataclass
class Scenario:
    """One comparison: a layer, a global batch split over ranks, and forced routing."""

    name: str
    config: dict[str, Any]
    rows_per_rank: list[int]
    seed: int = 0
    # (rank or None for all, global expert or group, logit push) applied to the noise
    force: list[tuple[int | None, int, float]] = field(default_factory=list)
    capacity_factor: float | None = None
    time_communication: bool = False
    training: bool = True


def flat_config(**kw: Any) -> dict[str, Any]:
    return {**dict(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=4, k=2), **kw}


def hier_config(**kw: Any) -> dict[str, Any]:
    base = dict(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=8, num_groups=4, k=2,
                k_primary=2)
    return {**base, **kw}


def _rank_rows(scenario: Scenario, rank: int) -> slice:
    start = sum(scenario.rows_per_rank[:rank])
    return slice(start, start + scenario.rows_per_rank[rank])


def _randomise_gates(layer: torch.nn.Module, generator: torch.Generator) -> None:
    """Gate weights start at zero; random ones make every gradient path non-trivial."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("threshold"):  # strictly balanced gating: around 1/E
                param.copy_(torch.rand(param.shape, generator=generator) / param.numel())
            elif "experts" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _make_noise(cfg: MoEConfig, scenario: Scenario, total: int, generator: torch.Generator):
    if cfg.hierarchical:
        a, b = cfg.num_groups, cfg.experts_per_group
        primary = torch.randn(total, a, generator=generator)
        secondary = torch.randn(total, a, b, generator=generator)
        for rank, group, push in scenario.force:
            rows = slice(None) if rank is None else _rank_rows(scenario, rank)
            primary[rows, group] += push
        return primary, secondary
    noise = torch.randn(total, cfg.num_experts, generator=generator)
    for rank, expert, push in scenario.force:
        rows = slice(None) if rank is None else _rank_rows(scenario, rank)
        noise[rows, expert] += push
    return noise


def _slice_noise(noise, rows: slice):
    if noise is None:
        return None
    if isinstance(noise, tuple):
        return tuple(n[rows] for n in noise)
    return noise[rows]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return 0.0 if a.numel() == 0 else float((a.detach().double() - b.detach().double()).abs().max())


def run_scenario(scenario: Scenario, rank: int, world: int, ep_size: int,
                 device: str = "cpu") -> dict[str, Any]:
    """Forward + backward of the sharded layer against the reference; returns differences.

    ``device="cuda"``: both layers and every tensor on this rank's GPU (NCCL).
    """
    cfg = MoEConfig(**scenario.config)
    gen = torch.Generator().manual_seed(scenario.seed)
    torch.manual_seed(scenario.seed)
    layer = build_moe(cfg)
    _randomise_gates(layer, gen)
    layer.train(scenario.training)
    reference = copy.deepcopy(layer)

    groups = create_expert_parallel_groups(ep_size)
    parallel = ExpertParallelConfig(ep_size=ep_size, capacity_factor=scenario.capacity_factor,
                                    time_communication=scenario.time_communication)
    dispatcher = shard_experts(layer, groups, parallel)
    on = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    layer.to(on)
    reference.to(on)

    total = sum(scenario.rows_per_rank)
    x = torch.randn(total, D_MODEL, generator=gen).to(on)
    out_grad = torch.randn(total, cfg.d_out, generator=gen).to(on)
    noise = _make_noise(cfg, scenario, total, gen) if cfg.gating != "strict_balanced" else None
    noise = _to(noise, on)
    rows = _rank_rows(scenario, rank)

    x_ref = x.clone().requires_grad_(True)
    ref = reference(x_ref, noise)
    ((ref.y * out_grad).sum() / world + ref.aux_loss).backward()

    x_local = x[rows].clone().requires_grad_(True)
    out = layer(x_local, _slice_noise(noise, rows))
    ((out.y * out_grad[rows]).sum() + out.aux_loss).backward()

    result: dict[str, Any] = {
        "y": _max_diff(out.y, ref.y[rows]),
        "aux_loss": _max_diff(out.aux_loss, ref.aux_loss),
        "importance": _max_diff(out.importance, ref.importance),
        "load": _max_diff(out.load, ref.load),
        "counts": _max_diff(out.counts, ref.counts),
        "x_grad": _max_diff(x_local.grad / world, x_ref.grad[rows]),
        "y_scale": float(ref.y.detach().abs().max()),
    }
    result.update(_compare_grads(layer, reference, dispatcher, groups, world))
    result["idle_expert_grads"] = _idle_expert_grads(layer, ref.counts, dispatcher)
    metrics = routing_metrics(dispatcher)
    counts = ref.counts.double()
    result["metrics"] = {
        "min": abs(metrics.tokens_per_expert_min - float(counts.min())),
        "mean": abs(metrics.tokens_per_expert_mean - float(counts.mean())),
        "max": abs(metrics.tokens_per_expert_max - float(counts.max())),
        "cv": abs(metrics.cv_load - float(counts.std(unbiased=False) / counts.mean())),
        "dropped_fraction": metrics.dropped_fraction,
        "all_to_all_seconds": metrics.all_to_all_seconds,
    }
    result["received_rows"] = dispatcher.counters.received
    return result


def _compare_grads(layer, reference, dispatcher, groups, world: int) -> dict[str, Any]:
    """Reduces grads as DeepSpeed does, then compares with the reference's."""
    ref_params = dict(reference.named_parameters())
    block = slice(dispatcher.first_local_expert,
                  dispatcher.first_local_expert + dispatcher.num_local_experts)
    worst, missing = 0.0, []
    for name, param in layer.named_parameters():
        expected = ref_params[name].grad
        if param.grad is None and expected is not None:
            missing.append(name)  # still reduce below, or the ranks fall out of step
        grad = torch.zeros_like(param) if param.grad is None else param.grad.clone()
        is_expert = getattr(param, "allreduce", True) is False
        dist.all_reduce(grad, group=groups.expert_data_parallel if is_expert else None)
        grad /= world
        if expected is None:  # not in the graph (e.g. a threshold at inference)
            expected = torch.zeros_like(ref_params[name])
        if is_expert:
            expected = expected[block]
        worst = max(worst, _max_diff(grad, expected))
    return {"grads": worst, "missing_grads": missing}


def _idle_expert_grads(layer, global_counts, dispatcher) -> list[float | None]:
    """Largest |grad| of each local expert that no token in the global batch chose."""
    first, n = dispatcher.first_local_expert, dispatcher.num_local_experts
    idle = [e - first for e in range(first, first + n) if int(global_counts[e]) == 0]
    out: list[float | None] = []
    for local in idle:
        grads = [p.grad for p in layer.experts.parameters()]
        out.append(None if any(g is None for g in grads)
                   else max(float(g[local].abs().max()) for g in grads))
    return out


def deadlock_worker(rank: int, world: int) -> None:
    """Rank 0 waits in an all-reduce that rank 1 never joins."""
    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        import time

        time.sleep(30)


def equivalence_worker(rank: int, world: int, ep_size: int, scenarios: list[Scenario],
                       device: str = "cpu") -> dict[str, dict[str, Any]]:
    return {s.name: run_scenario(s, rank, world, ep_size, device) for s in scenarios}


def _to(noise, device: torch.device):
    """Fixed noise (a tensor, a pair of tensors, or None) on ``device``."""
    if noise is None or isinstance(noise, torch.Tensor):
        return None if noise is None else noise.to(device)
    return tuple(n.to(device) for n in noise)


def capacity_worker(rank: int, world: int, ep_size: int, capacity_factor: float
                    ) -> dict[str, Any]:
    """Capacity mode against a dense reference that applies the same drop rule by hand.

    Rule: each rank sends an expert at most ``ceil(cf * assignments / E)`` rows, the
    earliest tokens of its own batch first; a dropped (token, expert) contributes nothing.
    """
    cfg = MoEConfig(**flat_config(expert_bias=True))
    rows_per_rank = [6, 10] if world == 2 else [6] * world
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    layer = build_moe(cfg)
    _randomise_gates(layer, gen)
    reference = copy.deepcopy(layer)
    groups = create_expert_parallel_groups(ep_size)
    dispatcher = shard_experts(layer, groups, ExpertParallelConfig(
        ep_size=ep_size, capacity_factor=capacity_factor))
    total = sum(rows_per_rank)
    x = torch.randn(total, D_MODEL, generator=gen)
    noise = torch.randn(total, cfg.num_experts, generator=gen)
    noise[:, 0] += 3.0  # crowd expert 0 so that it overflows
    start = sum(rows_per_rank[:rank])
    rows = slice(start, start + rows_per_rank[rank])

    out = layer(x[rows], noise[rows])
    y_expected, dropped_total = _dense_capacity_reference(reference, x, noise, rows_per_rank,
                                                          capacity_factor, rank)
    metrics = routing_metrics(dispatcher)
    return {"y": _max_diff(out.y, y_expected), "dropped_fraction": metrics.dropped_fraction,
            "expected_dropped_fraction": dropped_total / (total * cfg.k)}


def _dense_capacity_reference(reference, x, noise, rows_per_rank, capacity_factor, rank):
    cfg = reference.config
    weights = [w.detach() for w in reference.experts.weights]
    biases = [b.detach() for b in reference.experts.biases]

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:  # written out densely, one expert
        h = torch.relu(v @ weights[0][e] + biases[0][e])
        return h @ weights[1][e] + biases[1][e]

    with torch.no_grad():
        decision = reference.router.decide(x, noise)
    dropped_total, outputs = 0, []
    start = 0
    for n in rows_per_rank:
        cap = math.ceil(capacity_factor * n * cfg.k / cfg.num_experts)
        used = [0] * cfg.num_experts
        y = torch.zeros(n, cfg.d_out)
        for t in range(n):
            for slot in range(cfg.k):
                e = int(decision.expert_idx[start + t, slot])
                if used[e] < cap:
                    used[e] += 1
                    y[t] += decision.gates[start + t, slot] * expert(e, x[start + t])
                else:
                    dropped_total += 1
        outputs.append(y)
        start += n
    return outputs[rank], dropped_total
