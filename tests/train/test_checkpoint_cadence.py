"""Checkpoints by wall time (``run.save_every_minutes``) and TF32 on GPUs."""

from __future__ import annotations

import pytest

from tests.train.conftest import read_metric, run_training


@pytest.mark.timeout(300)
def test_time_based_cadence_saves_when_the_minutes_have_passed(wt_corpus, tmp_path):
    """Two processes; a cadence shorter than a step saves after every step, and the final
    checkpoint is not written twice."""
    run_dir = tmp_path / "run"
    steps = 3
    proc = run_training([f"data.corpus={wt_corpus['corpus']}",
                         f"data.tokenizer={wt_corpus['tokenizer']}", f"run.dir={run_dir}",
                         f"run.steps={steps}", "run.log_every=1", "run.eval_batches=1",
                         "run.progress=false", "data.micro_batch_size=4", "data.seq_len=16",
                         "data.eval_splits=[valid]", "run.keep_last=100",
                         "run.save_every_minutes=0.00001", "parallel.ep_size=2",
                         "tracking.wandb=false"], nproc=2)
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert tags == [f"step_{s:08d}" for s in range(1, steps + 1)], proc.stdout[-2000:]
    assert sorted(read_metric(run_dir, "train_loss")) == list(range(1, steps + 1))
    assert "deepspeed.config=auto: cpu_fp32.json (no GPU: fp32 without ZeRO)" in proc.stdout


def test_minutes_must_be_a_non_negative_number():
    from sparse_moe.config_io import ConfigError
    from sparse_moe.train.config import load_train_config

    with pytest.raises(ConfigError, match=r"save_every_minutes: expected a number of minutes "
                                          r">= 0 \(0: off\), found -1"):
        load_train_config(None, ["data.corpus=c", "run.save_every_minutes=-1"])


def test_tf32_switches_both_backends_on():
    import torch

    from sparse_moe.train.runtime import allow_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
