"""Where a run's figures go at each logged step and evaluation: DeepSpeed's CSV monitor (every
rank calls it; it writes on rank 0), rank 0's dashboards (W&B, TensorBoard), the expert-load
file, and the windows of tokens per expert between logs and between evaluations."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from sparse_moe.train.config import TrainConfig
from sparse_moe.train.tracking.metric_files import continue_metrics
from sparse_moe.train.tracking.run_info import dashboard_config
from sparse_moe.train.tracking.tracker import NoTracker, Tracker
from sparse_moe.train.tracking.windows import ExpertWindow, sample_translations


def open_tracker(config: TrainConfig, run_dir: Path, run_id: str, model_config: Any,
                 ds_config: dict[str, Any], world: int, module: Any, rank: int,
                 step: int) -> Tracker | NoTracker:
    """Rank 0's dashboards, started at the step the run continues from (after a resume)."""
    if rank != 0:
        return NoTracker()
    run_config = dashboard_config(config, model_config, ds_config, world,
                                  config.parallel.ep_size, module)
    return Tracker(config.tracking, run_dir, run_id, run_config, start_step=step)


class RunLog:
    """The logging of one rank's run, from ``step`` on (after a resume, the metric files are
    cut back to it)."""

    def __init__(self, config: TrainConfig, run_dir: Path, monitor: Any, rank: int, step: int,
                 start_tracker: Callable[[], Tracker | NoTracker]) -> None:
        self.config, self.run_dir, self.monitor, self.rank = config, run_dir, monitor, rank
        if rank == 0:  # one header and each step once in the metric files, after resumes
            continue_metrics(run_dir, monitor, step)
        self.tracker = start_tracker()  # after the cut: it replays the journal up to ``step``
        # Tokens per expert since the last log (idle experts) and the last evaluation (picture).
        self.window = ExpertWindow(since=step)
        self.eval_window = ExpertWindow(since=step)
        self.window_start, self.window_tokens = time.time(), 0.0
        # The last logged training metrics, for the summary (a list of every log would grow
        # without bound over a long run).
        self.last_train: dict[str, float] = {}

    def add_step(self, expert_counts: list[list[float]], tokens: float) -> None:
        self.window.add(expert_counts)
        self.eval_window.add(expert_counts)
        self.window_tokens += tokens

    def train(self, step: int, metrics: dict[str, float], expert_counts: list[list[float]],
              multiply_adds_per_token: float, memory: dict[str, float]) -> dict[str, float]:
        """A logged step: the step's metrics with the window's speed, model FLOP/s, idle
        experts and memory peaks."""
        elapsed = time.time() - self.window_start
        metrics["tokens_per_second"] = self.window_tokens / max(elapsed, 1e-9)
        metrics["model_flops_per_second"] = (2 * multiply_adds_per_token
                                             * metrics["tokens_per_second"])
        metrics.update(self.window.dead_experts())
        metrics.update({f"system/{k}": v for k, v in memory.items()})
        self.window = ExpertWindow(since=step)
        self.log(step, metrics)
        self._append_expert_load(step, expert_counts)
        self.window_start, self.window_tokens = time.time(), 0.0
        return metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if "loss" in metrics:
            self.last_train = {"step": step, **metrics}
        named = {(f"train/{k}" if "/" not in k else k): v for k, v in metrics.items()}
        if self.monitor.enabled:
            self.monitor.write_events([(k, v, step) for k, v in named.items()])
        self.tracker.log_scalars(named, step)

    def evaluation(self, step: int, results: dict[str, float]) -> None:
        """Evaluation metrics, the expert-load picture since the previous evaluation and,
        for translation, a table of sample translations."""
        self.log(step, results)
        self.tracker.log_expert_load(self.eval_window.counts, step, self.eval_window.since)
        self.eval_window = ExpertWindow(since=step)
        samples = self.config.tracking.translation_samples
        for split in self.config.data.eval_splits:
            rows = sample_translations(self.run_dir, split, samples) if samples else []
            self.tracker.log_table(f"{split}/translations", ["reference", "hypothesis"], rows,
                                   step)

    def _append_expert_load(self, step: int, counts: list[list[float]]) -> None:
        """Tokens per expert of every MoE layer at this step (the load heatmap's data)."""
        if self.rank == 0 and counts:
            with open(self.run_dir / "expert_load.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "layers": counts}) + "\n")
