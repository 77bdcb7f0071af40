"""MoE-32-shaped training on the training device: activation checkpointing changes no bit,
and a bf16 ZeRO-1 run saves and resumes exactly.

The CPU cases run everywhere (on a GPU machine too: the training runs the tests start see no
GPU unless asked, ``tests/gpus.py``); the ``cuda`` cases are the same runs on a GPU with
deterministic kernels (``run.deterministic``), without which atomic additions sum in a
different order each run.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sparse_moe.models import build_model
from sparse_moe.models.presets import lm_preset
from tests.train.conftest import read_metric, run_training

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@contextmanager
def deterministic_kernels():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _gradients(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
               checkpointing: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(checkpointing)
    torch.manual_seed(7)  # dropout and gating noise: the same draws for both passes
    out = model(tokens, targets=targets)
    (out.token_nll.float().mean() + out.aux_loss).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_checkpointing_changes_no_gradient(device, dtype):
    """MoE-32's layers (its LSTMs at 512 units, 32 experts of 1024 hidden units) with a small
    vocabulary: the gradients with every layer recomputed equal those without, bit for bit."""
    torch.manual_seed(0)
    config = lm_preset("moe-32", vocab_size=512)
    model = build_model(config).to(device, dtype).train()
    tokens = torch.randint(0, 512, (4, 24), device=device)
    targets = torch.randint(0, 512, (4, 24), device=device)
    with deterministic_kernels():
        plain = _gradients(model, tokens, targets, checkpointing=False)
        recomputed = _gradients(model, tokens, targets, checkpointing=True)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name, grad in plain.items():
        assert torch.equal(grad, recomputed[name]), f"{name}: gradients differ"


def _overrides(wt_corpus, run_dir: Path, steps: int) -> list[str]:
    return [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", f"run.steps={steps}", "model.preset=moe-32",
            "deepspeed.config=ds_configs/zero1_bf16.json", "run.deterministic=true",
            "data.micro_batch_size=4", "data.seq_len=16", "run.log_every=1",
            "run.eval_batches=2", "data.eval_splits=[valid]", "run.progress=false",
            "tracking.wandb=false", "optimizer.lr=0.01", "schedule.warmup_steps=2"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", DEVICES)
def test_moe32_in_bf16_with_zero1_resumes_exactly(wt_corpus, tmp_path, device):
    gpus = device == "cuda"
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training(_overrides(wt_corpus, straight, 4), gpus=gpus, timeout=400)
    run_training(_overrides(wt_corpus, stopped, 2), gpus=gpus, timeout=400)
    run_training(_overrides(wt_corpus, stopped, 4) + ["run.resume=true"], gpus=gpus, timeout=400)
    want, got = read_metric(straight, "train_loss"), read_metric(stopped, "train_loss")
    assert sorted(want) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]
    assert read_metric(stopped, "valid_perplexity")[4] == read_metric(straight, "valid_perplexity")[4]
    summary = json.loads((stopped / "summary.json").read_text())
    assert ("peak_device_memory_mib" in summary) == (device == "cuda"), sorted(summary)
