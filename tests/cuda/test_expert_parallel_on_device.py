"""The expert-parallel layer against the single-process layer, on the training device.

On a GPU the ranks talk over NCCL: uneven ``all_to_all_single`` splits, the counts exchange
and the statistics' all-reduce all take CUDA tensors there. The CPU case (gloo) runs the same
code everywhere; EP=2 needs two GPUs.
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import run_distributed
from tests.parallel.test_expert_parallel_equivalence import EP2_SCENARIOS, _check
from tests.parallel.workers import Scenario, equivalence_worker, flat_config, hier_config

ONE_RANK = [
    Scenario("flat", flat_config(expert_bias=True), [12]),
    Scenario("hierarchical", hier_config(), [11], seed=1),
    Scenario("strict_balanced_eval", flat_config(gating="strict_balanced"), [9], seed=8,
             training=False),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_one_rank_with_ep1_equals_the_layer(device):
    backend = "nccl" if device == "cuda" else "gloo"
    results = run_distributed(equivalence_worker, 1, 1, ONE_RANK, device, backend=backend,
                              timeout=120)
    for scenario in ONE_RANK:
        _check(results, scenario.name)


@pytest.mark.cuda
@pytest.mark.multi_gpu
def test_two_gpus_with_ep2_equal_the_layer():
    results = run_distributed(equivalence_worker, 2, 2, EP2_SCENARIOS, "cuda", backend="nccl",
                              timeout=180)
    for scenario in EP2_SCENARIOS:
        _check(results, scenario.name)
