"""The checkpoint file names of ``train/checkpoint/files.py`` are DeepSpeed's own: its engine's
naming methods (private, so checked here against the pinned DeepSpeed). The input checks find
a real run's files under these names in ``tests/errors`` (the checkpoint cases)."""

from __future__ import annotations

from pathlib import Path

from deepspeed.runtime.engine import DeepSpeedEngine

from sparse_moe.train.checkpoint.files import (
    expert_file,
    expert_parallel_optimizer_file,
    model_states_file,
    zero_optimizer_file,
)


class _Engine:
    """What DeepSpeed's naming methods read from an engine (no model parallelism)."""

    checkpoint_mp_rank = 0

    def zero_optimization_partition_weights(self) -> bool:
        return False

    _get_zero_ckpt_prefix = DeepSpeedEngine._get_zero_ckpt_prefix


def test_the_names_are_deepspeeds(tmp_path):
    engine, tag = _Engine(), "step_00000004"
    assert Path(DeepSpeedEngine._get_ckpt_name(engine, str(tmp_path), tag)) == \
        model_states_file(tmp_path / tag)
    assert Path(DeepSpeedEngine._get_expert_ckpt_name(str(tmp_path), 1, 37, tag)) == \
        expert_file(tmp_path / tag, 1, 37)
    assert Path(DeepSpeedEngine._get_optimizer_ckpt_name(engine, str(tmp_path), tag, 3)) == \
        expert_parallel_optimizer_file(tmp_path / tag, 3)
    for bf16 in (False, True):
        assert Path(DeepSpeedEngine._get_rank_zero_ckpt_name(engine, str(tmp_path), tag, 0, 5,
                                                             bf16)) == \
            zero_optimizer_file(tmp_path / tag, 5, bf16)
