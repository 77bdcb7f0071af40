"""What is logged about one optimizer step, computed in one place.

A step is ``gradient_accumulation_steps`` micro-steps. :class:`StepMetrics` collects each
micro-step's loss parts, tokens and per-expert counts, then :meth:`StepMetrics.finish` averages
the scalars over the micro-steps and the ranks (one all-reduce), adds the engine's own figures
(learning rate, skipped steps) and the paper's balance figures per MoE layer, and returns a
:class:`StepRecord`: the logged metrics, the tokens, whether the update was applied, and the
tokens per expert that ``expert_load.jsonl`` keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sparse_moe.parallel import ExpertParallelConfig, routing_metrics
from sparse_moe.train.distributed import all_reduce_host


@dataclass
class StepRecord:
    metrics: dict[str, float]  # averaged over micro-steps and ranks, as logged
    tokens: float  # target tokens of every rank's micro-batches
    applied: bool  # False when the optimizer skipped the update (overflow, NaN)
    expert_counts: list[list[float]]  # per MoE layer, tokens per expert (summed over ranks)


@dataclass
class StepMetrics:
    world: int
    dispatchers: list[Any]
    parallel: ExpertParallelConfig
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: list[torch.Tensor] | None = None
    _tokens: float = 0.0
    _micro_steps: int = 0

    def add_micro_step(self, scalars: dict[str, float], counts: list[torch.Tensor],
                       tokens: float) -> None:
        """One micro-step's loss parts (``LossParts.scalars()``), its MoE layers' tokens per
        expert (already summed over the data-parallel replicas) and its target tokens."""
        for key, value in scalars.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        counts = [c.detach().float() for c in counts]
        self._counts = counts if self._counts is None else [
            a + b for a, b in zip(self._counts, counts)]
        self._tokens += tokens
        self._micro_steps += 1

    def finish(self, engine: Any) -> StepRecord:
        metrics = self._average_over_ranks({k: v / self._micro_steps
                                            for k, v in self._sums.items()})
        metrics["lr"] = engine.get_lr()[0]
        metrics["skipped_steps"] = float(engine.skipped_steps)
        counts = self._counts or []
        for i, layer in enumerate(counts):
            metrics.update(expert_load_metrics(layer, prefix=f"moe{i}"))
        metrics.update(self._dispatch_metrics())
        return StepRecord(metrics, self._tokens * self.world, bool(engine.was_step_applied()),
                          [c.tolist() for c in counts])

    def _average_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        all_reduce_host(values)
        return {k: float(v) / self.world for k, v in zip(keys, values)}

    def _dispatch_metrics(self) -> dict[str, float]:
        """Dropped fraction (capacity mode) and time in collectives (when timed), per layer.

        From the dispatchers' counters of the step's last micro-batch, reduced over replicas.
        """
        if self.parallel.capacity_factor is None and not self.parallel.time_communication:
            return {}
        out = {}
        for i, dispatcher in enumerate(self.dispatchers):
            routed = routing_metrics(dispatcher)
            if self.parallel.capacity_factor is not None:
                out[f"moe{i}/dropped_fraction"] = routed.dropped_fraction
            if self.parallel.time_communication:
                out[f"moe{i}/all_to_all_seconds"] = routed.all_to_all_seconds
        return out


def expert_load_metrics(counts: torch.Tensor, prefix: str) -> dict[str, float]:
    """Tokens per expert (min/mean/max), CV(load) and max/mean: the paper's balance figures."""
    mean = counts.mean().clamp_min(1e-9)
    return {f"{prefix}/tokens_min": float(counts.min()), f"{prefix}/tokens_mean": float(mean),
            f"{prefix}/tokens_max": float(counts.max()),
            f"{prefix}/cv_load": float(counts.std(unbiased=False) / mean),
            f"{prefix}/max_over_mean": float(counts.max() / mean)}
