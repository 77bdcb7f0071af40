"""Ranks that build a model with ``parallelize`` on real gloo process groups."""

from __future__ import annotations

from typing import Any

import torch

from sparse_moe.models import lm_preset
from sparse_moe.parallel import (
    ExpertParallelConfig,
    create_expert_parallel_groups,
    expert_parallel_layers,
    moe_configs,
    parallelize,
)


def _host_memory_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def built_shard_worker(rank: int, world: int, preset: str, ep_size: int,
                       seed: int) -> dict[str, Any]:
    """This rank's experts and dense weights as ``parallelize`` builds them, and one forward
    pass through the real expert-parallel dispatcher (so the build is a working model)."""
    groups = create_expert_parallel_groups(ep_size)
    model = parallelize(lm_preset(preset, 50), ExpertParallelConfig(ep_size=ep_size), groups,
                        seed=seed)
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(rank))
    out = model(tokens)
    layers = expert_parallel_layers(model)
    return {"experts": [[p.detach().clone() for p in layer.experts.parameters()]
                        for layer in layers],
            "first": [layer.experts.first_expert for layer in layers],
            "dense": {n: p.detach().clone() for n, p in model.named_parameters()
                      if getattr(p, "allreduce", True) is not False},
            "finite": bool(torch.isfinite(out.logits).all())}


def startup_memory_worker(rank: int, world: int, preset: str, vocab: int) -> dict[str, float]:
    """Host memory a rank's start-up allocates for its model, against what it holds."""
    groups = create_expert_parallel_groups(world)
    config = lm_preset(preset, vocab)
    moe_configs(config)  # the first meta-device build imports torch's meta kernels (~80 MiB)
    before = _host_memory_mib("VmRSS")
    model = parallelize(config, ExpertParallelConfig(ep_size=world), groups, seed=5)
    peak = _host_memory_mib("VmHWM")
    held = {"experts": 0, "dense": 0}
    for param in model.parameters():
        held["experts" if getattr(param, "allreduce", True) is False else "dense"] += (
            param.numel() * param.element_size())
    return {"before": before, "peak": peak, "expert_mib": held["experts"] / 2**20,
            "dense_mib": held["dense"] / 2**20}
