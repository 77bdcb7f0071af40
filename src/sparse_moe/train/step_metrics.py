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
from sparse_moe.parallel import deepspeed_internals as ds_internals
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
    _importance: list[torch.Tensor] | None = None
    grad_norm: float | None = None  # set by the trainer where DeepSpeed reports none
    _tokens: float = 0.0
    _micro_steps: int = 0

    def add_micro_step(self, scalars: dict[str, float], counts: list[torch.Tensor],
                       tokens: float, importance: list[torch.Tensor] | None = None) -> None:
        """One micro-step's loss parts (``LossParts.scalars()``), its MoE layers' tokens per
        expert and gate importance per expert (both already summed over the data-parallel
        replicas) and its target tokens."""
        for key, value in scalars.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts = _accumulate(self._counts, counts)
        if importance is not None:
            self._importance = _accumulate(self._importance, importance)
        self._tokens += tokens
        self._micro_steps += 1

    def finish(self, engine: Any) -> StepRecord:
        metrics = self._average_over_ranks({k: v / self._micro_steps
                                            for k, v in self._sums.items()})
        metrics["lr"] = engine.get_lr()[0]
        metrics["skipped_steps"] = float(ds_internals.skipped_steps(engine))
        counts = self._counts or []
        for i, layer in enumerate(counts):
            metrics.update(expert_load_metrics(layer, prefix=f"moe{i}"))
        for i, layer in enumerate(self._importance or []):
            metrics[f"moe{i}/cv_importance"] = coefficient_of_variation(layer)
        grad_norm = self.grad_norm if self.grad_norm is not None else engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
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


def global_grad_norm(model: torch.nn.Module, world: int, ep_size: int) -> float:
    """The L2 norm of the whole model's gradient (before clipping), on every rank.

    Dense gradients are the same on every rank once reduced; each expert's gradient lives on
    the ``world / ep_size`` ranks of its expert-data-parallel group, so the experts' squares
    summed over the world count each expert that many times. One all-reduce of one number.
    """
    from deepspeed.moe.utils import is_moe_param

    dense, experts = [], []
    for param in model.parameters():
        if param.grad is not None:
            (experts if is_moe_param(param) else dense).append(param.grad.detach())
    device = next(model.parameters()).device
    squares = torch.zeros(2, dtype=torch.float64, device=device)
    for i, grads in enumerate((dense, experts)):
        if grads:
            squares[i] = torch.nn.utils.get_total_norm(grads, norm_type=2.0).double() ** 2
    squares = squares.cpu()
    expert_squares = all_reduce_host(squares[1:].clone())
    return float((squares[0] + expert_squares[0] * ep_size / world).sqrt())


def _accumulate(total: list[torch.Tensor] | None, parts: list[torch.Tensor]
                ) -> list[torch.Tensor]:
    parts = [p.detach().float().flatten() for p in parts]
    return parts if total is None else [a + b for a, b in zip(total, parts)]


def coefficient_of_variation(values: torch.Tensor) -> float:
    """Standard deviation over mean (the paper's CV, whose square the balancing losses use)."""
    return float(values.std(unbiased=False) / values.mean().clamp_min(1e-9))


def expert_load_metrics(counts: torch.Tensor, prefix: str) -> dict[str, float]:
    """Tokens per expert (min/mean/max), CV(load) and max/mean: the paper's balance figures."""
    mean = counts.mean().clamp_min(1e-9)
    return {f"{prefix}/tokens_min": float(counts.min()), f"{prefix}/tokens_mean": float(mean),
            f"{prefix}/tokens_max": float(counts.max()),
            f"{prefix}/cv_load": float(counts.std(unbiased=False) / mean),
            f"{prefix}/max_over_mean": float(counts.max() / mean)}
