"""Per-step routing metrics of an expert-parallel layer, reduced over all replicas."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from sparse_moe.parallel.dispatcher import ExpertParallelDispatcher


@dataclass
class RoutingMetrics:
    """Tokens each expert processed in the last step, over the whole global batch."""

    tokens_per_expert_min: float
    tokens_per_expert_mean: float
    tokens_per_expert_max: float
    cv_load: float  # std / mean of the processed counts
    dropped_fraction: float  # of all assignments; 0 when dropless
    all_to_all_seconds: float  # this rank's time in collectives (0 unless timed)

    def as_dict(self, prefix: str = "moe/") -> dict[str, float]:
        return {prefix + key: value for key, value in asdict(self).items()}


def routing_metrics(dispatcher: ExpertParallelDispatcher, reset_timer: bool = True
                    ) -> RoutingMetrics:
    """Collective over the data-parallel group: every rank must call it after a forward."""
    counters = dispatcher.counters
    if counters.kept_per_expert is None:
        raise RuntimeError("routing_metrics: the dispatcher has not run a forward pass yet")
    kept = counters.kept_per_expert.to(torch.float64)
    totals = torch.cat([kept, kept.new_tensor([counters.dropped, counters.assignments])])
    dist.all_reduce(totals, group=dispatcher.groups.data_parallel)
    per_expert, dropped, assignments = totals[:-2], totals[-2], totals[-1]
    mean = per_expert.mean()
    cv = per_expert.std(unbiased=False) / mean if mean > 0 else mean.new_zeros(())
    seconds = counters.timer.seconds
    if reset_timer:
        counters.timer.reset()
    return RoutingMetrics(float(per_expert.min()), float(mean), float(per_expert.max()),
                          float(cv), float(dropped / assignments) if assignments > 0 else 0.0,
                          seconds)
