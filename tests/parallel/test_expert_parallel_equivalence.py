"""Expert-parallel layer == single-process layer fed the global batch (fp32, 1e-5).

Layouts: EP=2 (world 2), EP=4 (world 4), EP=2 x DP=2 (world 4) and EP=1 x DP=2 (world 2,
where the dispatcher skips its all-to-alls); flat and hierarchical;
plus the cases that hang other systems. Each job spawns its ranks once and runs several
scenarios; a deadlock makes the job raise after its timeout instead of hanging.
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import run_distributed
from tests.parallel.workers import Scenario, deadlock_worker, equivalence_worker, flat_config, hier_config

TOL = 1e-5
PUSH = 60.0  # a noise offset that decides the top-k outright

EP2_SCENARIOS = [
    Scenario("flat", flat_config(expert_bias=True), [5, 7]),
    Scenario("hierarchical", hier_config(), [6, 5], seed=1),
    # Rank 0 routes everything to experts 2 and 3 (owned by rank 1); expert 1 gets nothing.
    Scenario("tokens_all_elsewhere", flat_config(), [4, 4], seed=2,
             force=[(0, 2, PUSH), (0, 3, PUSH), (None, 1, -PUSH)]),
    # Every token picks expert 3: rank 0's experts receive no row at all.
    Scenario("all_to_one_expert", flat_config(k=1), [3, 5], seed=3, force=[(None, 3, PUSH)]),
    Scenario("empty_local_batch", flat_config(), [0, 6], seed=4, time_communication=True),
    Scenario("hierarchical_empty_rank", hier_config(), [5, 0], seed=5),
    Scenario("topk_no_noise", flat_config(gating="topk", k=1), [4, 4], seed=6),
    # Inference of strictly balanced gating: a varying number of experts per token.
    Scenario("strict_balanced_eval", flat_config(gating="strict_balanced"), [5, 6], seed=8,
             training=False),
]

WORLD4_SCENARIOS = [
    Scenario("flat", flat_config(num_experts=8, expert_bias=True), [3, 4, 2, 5], seed=10),
    Scenario("hierarchical", hier_config(), [4, 3, 5, 2], seed=11),
    Scenario("empty_and_idle", flat_config(num_experts=8, k=1), [0, 4, 3, 3], seed=12,
             force=[(None, 7, PUSH)]),
]


def _check(results: list[dict], name: str, idle_rank: int | None = None) -> None:
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        scale = max(1.0, r["y_scale"])
        assert r["missing_grads"] == [], f"rank {rank}: no gradient for {r['missing_grads']}"
        for key in ("y", "aux_loss", "importance", "load", "counts", "x_grad", "grads"):
            assert r[key] <= TOL * scale, f"{name} rank {rank}: {key} differs by {r[key]:.3g}"
        for key in ("min", "mean", "max", "cv"):
            assert r["metrics"][key] <= 1e-9, f"{name} rank {rank}: metric {key} differs"
        assert r["metrics"]["dropped_fraction"] == 0.0
    if idle_rank is not None:
        assert results[idle_rank][name]["received_rows"] == 0


@pytest.fixture(scope="module")
def ep2_results():
    return run_distributed(equivalence_worker, 2, 2, EP2_SCENARIOS, timeout=150)


@pytest.fixture(scope="module")
def ep4_results():
    return run_distributed(equivalence_worker, 4, 4, WORLD4_SCENARIOS, timeout=200)


@pytest.fixture(scope="module")
def ep1_dp2_results():
    scenarios = [s for s in EP2_SCENARIOS if s.name in EP1_SCENARIO_NAMES]
    return run_distributed(equivalence_worker, 2, 1, scenarios, timeout=150)


EP1_SCENARIO_NAMES = ["flat", "hierarchical", "empty_local_batch", "strict_balanced_eval"]


@pytest.fixture(scope="module")
def ep2_dp2_results():
    return run_distributed(equivalence_worker, 4, 2, WORLD4_SCENARIOS, timeout=200)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["flat", "hierarchical", "topk_no_noise",
                                  "strict_balanced_eval"])
def test_ep2_matches_single_process(ep2_results, name):
    _check(ep2_results, name)


@pytest.mark.timeout(240)
def test_rank_whose_tokens_all_go_elsewhere_and_idle_expert(ep2_results):
    _check(ep2_results, "tokens_all_elsewhere")
    # expert 1 (on rank 0) gets no token anywhere: its gradient exists and is exactly zero
    assert ep2_results[0]["tokens_all_elsewhere"]["idle_expert_grads"] == [0.0]


@pytest.mark.timeout(240)
def test_all_tokens_to_one_expert(ep2_results):
    _check(ep2_results, "all_to_one_expert", idle_rank=0)
    assert ep2_results[0]["all_to_one_expert"]["idle_expert_grads"] == [0.0, 0.0]
    assert ep2_results[1]["all_to_one_expert"]["idle_expert_grads"] == [0.0]


@pytest.mark.timeout(60)
def test_a_deadlocked_collective_fails_instead_of_hanging():
    with pytest.raises((RuntimeError, TimeoutError), match="rank 0|did not finish"):
        run_distributed(deadlock_worker, 2, timeout=40, collective_timeout=3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["empty_local_batch", "hierarchical_empty_rank"])
def test_empty_local_batch(ep2_results, name):
    _check(ep2_results, name)


@pytest.mark.timeout(240)
def test_communication_is_timed_when_asked(ep2_results):
    assert all(r["empty_local_batch"]["metrics"]["all_to_all_seconds"] > 0 for r in ep2_results)
    assert all(r["flat"]["metrics"]["all_to_all_seconds"] == 0 for r in ep2_results)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["flat", "hierarchical", "empty_and_idle"])
def test_ep4_world4_matches_single_process(ep4_results, name):
    _check(ep4_results, name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["flat", "hierarchical", "empty_and_idle"])
def test_ep2_dp2_world4_matches_single_process(ep2_dp2_results, name):
    _check(ep2_dp2_results, name)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", EP1_SCENARIO_NAMES)
def test_ep1_dp2_world2_matches_single_process(ep1_dp2_results, name):
    _check(ep1_dp2_results, name)
