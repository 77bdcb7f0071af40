"""End-to-end training runs of the debug presets on WikiText-2 shards (CPU, gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.train.conftest import read_metric, run_training


def _base(wt_corpus, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=1", "run.eval_batches=4",
            "run.progress=false", "data.micro_batch_size=8", "data.seq_len=32",
            "optimizer.name=adam", "optimizer.lr=0.01", "schedule.warmup_steps=5", *extra]


@pytest.mark.timeout(300)
def test_one_process_trains_and_tracks(wt_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_training(_base(wt_corpus, run_dir, 40), wandb=True)
    losses = read_metric(run_dir, "train_cross_entropy")
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.8, f"cross-entropy went from {first:.3f} to {last:.3f}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["valid/perplexity"] < 500  # vocabulary is 500
    # Per word: the same likelihood over the words of the original text (plus a line end per
    # non-blank line, the end-of-sentence token the corpus appends).
    text = (Path(wt_corpus["root"]) / "valid.txt").read_text(encoding="utf-8")
    words = len(text.split()) + sum(1 for line in text.splitlines() if line.strip())
    manifest = json.loads((Path(wt_corpus["corpus"]) / "manifest.json").read_text())
    tokens = manifest["splits"]["valid"]["tokens"]
    expected = math.exp(summary["valid/cross_entropy"] * tokens / words)
    assert summary["valid/perplexity_per_word"] == pytest.approx(expected, rel=0.01)
    assert summary["valid/perplexity_per_word"] > summary["valid/perplexity"]
    # wandb ran offline, under the run id kept in the run directory.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, f"no offline wandb run for id {run_id} in {run_dir / 'wandb'}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert (run_dir / "config.yaml").exists() and (run_dir / "ds_config.json").exists()


@pytest.mark.timeout(300)
def test_two_processes_with_expert_parallelism_train(wt_corpus, tmp_path):
    run_dir = tmp_path / "ep2"
    run_training(_base(wt_corpus, run_dir, 30, "parallel.ep_size=2", "parallel.capacity_factor=1.0",
                       "parallel.time_communication=true"), nproc=2)
    dropped = read_metric(run_dir, "moe0_dropped_fraction")
    assert sorted(dropped) == list(range(1, 31))
    assert all(0.0 <= d < 1.0 for d in dropped.values()) and max(dropped.values()) > 0
    assert min(read_metric(run_dir, "moe0_all_to_all_seconds").values()) > 0
    losses = read_metric(run_dir, "train_cross_entropy")
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, f"cross-entropy went from {first:.3f} to {last:.3f}"
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 8 * 1 * 2  # micro x accumulation x data-parallel
    # The expert checkpoint files DeepSpeed writes per expert, with global ids 0..7.
    tag = run_dir / "checkpoints" / "step_00000030"
    experts = sorted(p.name for p in tag.glob("*expert_*"))
    assert len(experts) == 8, experts


@pytest.mark.timeout(300)
def test_resumed_run_reproduces_the_uninterrupted_losses(wt_corpus, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = ("deepspeed.gradient_accumulation_steps=2", "model.overrides={dropout: 0.1}")
    run_training(_base(wt_corpus, straight, 8, *extra))
    run_training(_base(wt_corpus, stopped, 4, *extra))
    run_training(_base(wt_corpus, stopped, 8, *extra, "run.resume=true"))
    want, got = read_metric(straight, "train_loss"), read_metric(stopped, "train_loss")
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]
    assert read_metric(stopped, "valid_perplexity")[8] == read_metric(straight, "valid_perplexity")[8]


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes started by a torchrun launcher."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


@pytest.mark.timeout(300)
def test_signal_to_one_rank_saves_at_a_step_boundary_and_resumes(wt_corpus, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.train.conftest import REPO, train_command

    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    steps = 40
    run_training(_base(wt_corpus, straight, steps, "parallel.ep_size=2"), nproc=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(train_command(2) + _base(wt_corpus, preempted, steps, "parallel.ep_size=2"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    loss_file = preempted / "metrics" / "train_loss.csv"
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if loss_file.exists() and len(loss_file.read_text().splitlines()) > 4:  # header + 4 steps
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    os.kill(_worker_pids(proc.pid)[1], signal.SIGUSR1)
    output, _ = proc.communicate(timeout=200)
    marker = json.loads((preempted / "preempted.json").read_text())
    saved = int((preempted / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert marker["step"] == saved, output[-3000:]
    assert 4 <= saved < steps
    assert max(read_metric(preempted, "train_loss")) == saved  # no rank went past the boundary
    run_training(_base(wt_corpus, preempted, steps, "parallel.ep_size=2", "run.resume=true"), nproc=2)
    want, got = read_metric(straight, "train_loss"), read_metric(preempted, "train_loss")
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]


LOAD_AND_SCORE = """
import json, sys
from sparse_moe.train.trained import load_trained
engine, task, tokenizer, device = load_trained(sys.argv[1], overrides=sys.argv[2:])
print(json.dumps(task.evaluate(engine, device, None)))
"""


@pytest.mark.timeout(300)
def test_checkpoint_of_an_expert_parallel_run_loads_into_one_process(wt_corpus, tmp_path):
    """The loaded weights reproduce the run's own validation perplexity; sampling works."""
    import subprocess
    import sys

    from tests.train.conftest import REPO

    run_dir = tmp_path / "ep2"
    # micro batch 8 on 2 ranks reads the same validation tokens as micro batch 16 on one
    run_training(_base(wt_corpus, run_dir, 6, "parallel.ep_size=2", "data.eval_splits=[valid]"),
                 nproc=2)
    logged = json.loads((run_dir / "summary.json").read_text())["valid/perplexity"]
    scored = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SCORE, str(run_dir), "data.micro_batch_size=16"],
        capture_output=True, text=True,
        cwd=REPO, timeout=200, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["valid/perplexity"] == pytest.approx(logged, rel=1e-5)
    sampled = subprocess.run([sys.executable, "-m", "sparse_moe.train.generate", str(run_dir),
                              "--prompt", "The", "--tokens", "10", "--seed", "1"],
                             capture_output=True, text=True, cwd=REPO, timeout=200)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    line = sampled.stdout.strip().splitlines()[-1]  # DeepSpeed prints its notices first
    assert line.startswith("The") and len(line) > 3


@pytest.mark.timeout(300)
def test_deepspeed_wall_clock_breakdown_times_every_phase(wt_corpus, tmp_path):
    """DeepSpeed's backward prologue runs (it starts the backward timers), so its breakdown works."""
    proc = run_training(_base(wt_corpus, tmp_path / "run", 2, "deepspeed.wall_clock_breakdown=true",
                              "data.eval_splits=[]"))
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "time (ms) | fwd:" in line]
    assert len(lines) == 2, (proc.stdout + proc.stderr)[-3000:]
    assert all("bwd_inner:" in line and "step:" in line for line in lines)
