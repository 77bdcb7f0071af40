"""Expert parallelism through DeepSpeed's engine: ZeRO-1/2 steps and expert checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.deepspeed_workers import (
    built_in_place_worker,
    checkpoint_worker,
    oversized_expert_group_worker,
    single_process_step_worker,
    zero_step_worker,
)
from tests.parallel.harness import run_distributed


@pytest.mark.timeout(240)
def test_zero0_zero1_and_zero2_step_matches_single_process_step():
    """Plain SGD (scale-sensitive), and ZeRO-2 with clipping by the global gradient norm.

    Without ZeRO the engine's own all-reduce averages the gradients: two processes must keep
    it (``skip_allreduce_without_replicas`` leaves it on)."""
    runs = [(0, 0.0), (1, 0.0), (2, 0.0), (2, 0.5)]
    results = run_distributed(zero_step_worker, 2, runs, timeout=200)
    for rank, result in enumerate(results):
        for key in ("zero0", "zero1", "zero2", "zero2_clip"):
            assert result[f"{key}_moved"] > 1e-2, "the step must change the parameters"
            assert result[key] <= 1e-5, f"{key} rank {rank}: parameters differ by {result[key]:.3g}"


@pytest.mark.timeout(120)
def test_one_process_skips_the_all_reduce_and_steps_like_plain_pytorch():
    (result,) = run_distributed(single_process_step_worker, 1, timeout=100)
    assert result["allreduce"] is False
    assert result["moved"] > 1e-2, "the step must change the parameters"
    assert result["diff"] <= 1e-6, f"parameters differ by {result['diff']:.3g}"


@pytest.mark.timeout(240)
def test_checkpoint_saved_with_ep2_loads_into_ep2(tmp_path):
    results = run_distributed(checkpoint_worker, 2, str(tmp_path), timeout=200)
    for rank, result in enumerate(results):
        for tag in ("flat", "hier"):
            assert result[tag]["differs_before"] > 1e-3, "fresh model must differ before loading"
            assert result[tag]["after"] == 0.0, f"rank {rank} {tag}: outputs differ after load"
        assert result["ep1_after"] <= 1e-6, f"rank {rank}: EP=1 load of the EP=2 checkpoint"
    files = results[0]["files"]
    # DeepSpeed's per-expert files, with global expert ids, written by each owning rank
    for expert in range(4):
        assert f"layer_0_expert_{expert}_mp_rank_00_model_states.pt" in files, files


@pytest.mark.timeout(240)
def test_layer_built_shard_only_is_synchronised_by_the_engine():
    """``build_expert_parallel_moe`` allocates E/ep experts; the engine's broadcast makes the
    per-rank-seeded dense weights agree."""
    results = run_distributed(built_in_place_worker, 2, timeout=200)
    assert not torch.equal(results[0]["gate_before"], results[1]["gate_before"])
    for rank, result in enumerate(results):
        assert result["marked"]
        assert result["expert_shapes"] == [(2, 8, 16), (2, 16, 8)]
        for name, value in result["dense"].items():
            assert torch.equal(value, results[0]["dense"][name]), f"rank {rank}: {name}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", [0, 1])
def test_expert_tensors_above_deepspeeds_group_limit_step_with_the_scheduler(stage):
    """DeepSpeed splits expert groups at ``max_group_size`` and emits an empty group before a
    tensor larger than that; the engine dropped it after the scheduler had counted it, and the
    first step failed. Every expert tensor in its own group, none empty, the lr on schedule."""
    (result,) = run_distributed(oversized_expert_group_worker, 1, stage, timeout=100)
    assert result["empty"] == 0
    assert result["expert_groups"] == 3  # each stacked weight alone (512 > 100), the biases (96)
    assert result["lrs"] == [[0.01 * 2 / 4] * result["groups"], [0.01 * 3 / 4] * result["groups"]]
