"""``sparse-moe-export``: one consolidated model from a run's DeepSpeed checkpoint.

References: the same checkpoint loaded by DeepSpeed's own loader into one process (the
export must hold exactly its parameters), the plain model's parameter names and count, and a
round trip through a run at another layout (``run.init_from`` at ``ep_size=4`` with a zero
learning rate, exported again: bit-identical).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_moe.models import build_model
from sparse_moe.train.checkpoint.export import export_model_config, plain_name
from tests.train.conftest import REPO, run_training


def _train(wt_corpus, run_dir: Path, nproc: int, ep: int, *extra: str) -> None:
    run_training([f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
                  f"run.dir={run_dir}", "model.preset=debug-moe-h", f"parallel.ep_size={ep}",
                  "run.eval_batches=1", "run.progress=false", "tracking.wandb=false",
                  "data.micro_batch_size=4", "data.seq_len=16", *extra], nproc=nproc)


def _export(run_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_moe.train.export", str(run_dir),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(400)
def test_export_holds_the_checkpoint_and_round_trips_through_another_layout(wt_corpus,
                                                                            tmp_path):
    _train(wt_corpus, tmp_path / "ep2", 2, 2, "run.steps=3")
    first = tmp_path / "export"
    proc = _export(tmp_path / "ep2", first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = load_file(str(first / "model.safetensors"))  # safetensors alone
    config = export_model_config(first)
    plain = build_model(config).state_dict()
    assert tensors.keys() == plain.keys()
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in plain.values())
    assert tensors["layers.1.moe.experts.weights.0"].shape[0] == 16  # every expert
    assert (first / Path(wt_corpus["tokenizer"]).name).is_file()

    # DeepSpeed's own loader, one process: the same parameters, bit for bit.
    check = ("import sys, torch\n"
             "from sparse_moe.train.trained import load_trained\n"
             "engine, *_ = load_trained(sys.argv[1])\n"
             "torch.save({n: p.detach() for n, p in engine.module.named_parameters()}, sys.argv[2])\n")
    loaded = tmp_path / "loaded.pt"
    proc = subprocess.run([sys.executable, "-c", check, str(tmp_path / "ep2"), str(loaded)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, value in torch.load(loaded).items():
        assert torch.equal(tensors[plain_name(name)], value), name

    # Start a run at ep_size=4 from the export; with lr 0 its checkpoint exports the same.
    _train(wt_corpus, tmp_path / "ep4", 4, 4, "run.steps=1", "optimizer.lr=0",
           f"run.init_from={first}", f"model.preset={first / 'config.json'}")
    second = tmp_path / "again"
    assert _export(tmp_path / "ep4", second).returncode == 0
    again = load_file(str(second / "model.safetensors"))
    assert again.keys() == tensors.keys()
    different = [k for k in tensors if not torch.equal(tensors[k], again[k])]
    assert not different, different

    proc = subprocess.run([sys.executable, "-m", "sparse_moe.train.generate", str(first),
                           "--prompt", "The", "--tokens", "5", "--seed", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("The")  # after DeepSpeed's log


def test_exporting_a_run_without_a_checkpoint_fails_and_writes_nothing(wt_corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  corpus: {wt_corpus['corpus']}\n"
                                     f"  tokenizer: {wt_corpus['tokenizer']}\n")
    proc = _export(run, tmp_path / "out")
    assert proc.returncode == 2
    assert f"{run / 'checkpoints'}: expected a checkpoint, found none" in proc.stderr
    assert not (tmp_path / "out").exists()
