"""FactoredAdam keeps factored moments under the GPU ds_configs (ZeRO-1/2, bf16, fp16), steps as
on whole parameters, and resumes exactly (2 CPU processes, gloo)."""

from __future__ import annotations

import pytest

from tests.parallel.factored_zero_workers import factored_zero_worker
from tests.parallel.harness import run_distributed


def _cpu_has_fp16() -> bool:
    """DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (AVX512-FP16
    or AMX-FP16); elsewhere it refuses an fp16 config before building anything."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


NO_FP16 = pytest.mark.skipif(not _cpu_has_fp16(), reason="this CPU has no fp16 kernels "
                             "(AVX512-FP16/AMX-FP16), so DeepSpeed's CPU accelerator refuses fp16")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("ds_config,ep_size,wrapper", [
    ("zero1_bf16.json", 1, "BF16_Optimizer"),  # experts split over both ranks' partitions
    ("zero2_bf16.json", 2, "DeepSpeedZeroOptimizer"),  # each rank its own experts
    pytest.param("zero1_fp16.json", 1, "DeepSpeedZeroOptimizer", marks=NO_FP16),
    ("bf16_no_zero", 1, "FP16_UnfusedOptimizer"),  # fp32 copies in the parameters' shapes
])
def test_expert_moments_stay_factored_step_like_fp32_and_resume_exactly(ds_config, ep_size, wrapper,
                                                                       tmp_path):
    results = run_distributed(factored_zero_worker, 2, ds_config, ep_size, str(tmp_path / "ckpt"),
                              timeout=360)
    for rank, result in enumerate(results):
        assert result["wrapper"] == wrapper
        assert result["partitions"] == (0 if wrapper == "FP16_UnfusedOptimizer" else 2)  # dense, experts
        # Bytes: the expert matrices' rows + columns (all of the group's, on every rank), not
        # one number per element. debug-moe's experts are 32 x 64 and 64 x 32 matrices.
        assert result["expert_state_numbers"] == result["expected_state_numbers"]
        assert result["expert_state_numbers"] * 10 < result["expert_elements_here"], result
        # The update equals FactoredAdam's on the fp32 masters in their shapes.
        assert result["worst_relative"] < 1e-5, (rank, result["worst_relative"])
        assert result["resumed"] == result["continued"], (rank, result)
        assert result["same_masters"]
        assert "exp_avg_sq" not in result["state_keys_after_resume"] or \
            wrapper == "FP16_UnfusedOptimizer"
