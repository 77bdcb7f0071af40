"""A real two-process run of MoE-256-h at ``ep_size=2`` peaks where ``sparse-moe-plan`` says.

The small version of the billion-parameter check in ``docs/benchmarks.md``: each rank's peak
host memory (VmHWM, ``summary.json``), measured through start-up, training steps, evaluation
and a checkpoint save, within 15% of the plan's total for the same configuration. A rank that
built or kept another rank's experts would exceed it by their 512 MiB.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_moe.plan.cli import load_config
from sparse_moe.plan.planner import plan_run
from sparse_moe.train.tasks import resolve_model_config

from .conftest import run_training


@pytest.mark.timeout(400)
def test_moe_256_h_at_ep2_peaks_within_15_percent_of_the_plan(wt_corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["model.preset=moe-256-h", "parallel.ep_size=2", "data.micro_batch_size=2",
                 "data.seq_len=16", "run.steps=3", "run.eval_batches=1",
                 "tracking.wandb=false", "run.progress=false"]
    run_training([f"data.corpus={wt_corpus['corpus']}",
                  f"data.tokenizer={wt_corpus['tokenizer']}", f"run.dir={run_dir}",
                  *overrides], nproc=2, timeout=360)
    config = load_config(None, [f"data.corpus={wt_corpus['corpus']}", *overrides])
    plan = plan_run(config, resolve_model_config(config, 500), 2, "cpu")
    peak = json.loads(Path(run_dir, "summary.json").read_text())["peak_host_memory_mib"]
    total = plan.bytes_per_rank["total"] / 2**20
    assert plan.params_detail["experts"] == 128 * 2 * 512 * 1024
    assert 0.85 * total <= peak <= 1.15 * total, (
        f"rank 0 peaked at {peak:.0f} MiB; the plan says {total:.0f} MiB "
        f"({ {k: round(v / 2**20) for k, v in plan.bytes_per_rank.items()} })")
