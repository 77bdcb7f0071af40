"""Capacity-factor mode: drops follow the documented rule and are counted.

The reference applies the rule by hand on the global batch (each rank sends an expert
at most ``ceil(cf * assignments / E)`` rows, its earliest tokens first) and computes every
kept expert densely, one expert at a time.
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import run_distributed
from tests.parallel.workers import capacity_worker


@pytest.mark.timeout(180)
def test_capacity_mode_drops_and_counts_like_the_rule():
    tight = run_distributed(capacity_worker, 2, 2, 0.75, timeout=150)
    for rank, result in enumerate(tight):
        assert result["y"] <= 1e-5, f"rank {rank}: output differs by {result['y']:.3g}"
        assert result["expected_dropped_fraction"] > 0, "the scenario must overflow an expert"
        assert result["dropped_fraction"] == pytest.approx(result["expected_dropped_fraction"])


@pytest.mark.timeout(180)
def test_capacity_mode_without_expert_parallelism_drops_like_the_rule():
    """EP=1 x DP=2: each rank runs every expert, with the same per-rank capacity rule."""
    for rank, result in enumerate(run_distributed(capacity_worker, 2, 1, 0.75, timeout=150)):
        assert result["y"] <= 1e-5, f"rank {rank}: output differs by {result['y']:.3g}"
        assert result["expected_dropped_fraction"] > 0, "the scenario must overflow an expert"
        assert result["dropped_fraction"] == pytest.approx(result["expected_dropped_fraction"])
