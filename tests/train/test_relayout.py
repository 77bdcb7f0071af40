"""Resuming a checkpoint on another layout (world size, expert-parallel size, micro-batch).

References: the uninterrupted run at the saved layout (the resumed run's logged losses must
agree with it: the same data, the same keyed gating noise, another reduction order), and the
state DeepSpeed itself loads at the saved layout (the state at the new layout, gathered, must
equal it bit for bit: parameters, fp32 masters and optimizer moments).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.train.conftest import REPO, _free_port, read_metric, run_training

SAVED_STEPS, STEPS = 4, 10
REGIMES = {"fp32": [], "zero1": ["deepspeed.zero_stage=1"]}


def _overrides(wt_corpus, run_dir: Path, preset: str, regime: str, ep: int, micro: int,
               *extra: str) -> list[str]:
    return [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", f"model.preset={preset}", f"parallel.ep_size={ep}",
            f"data.micro_batch_size={micro}", "data.seq_len=16", "run.log_every=1",
            "run.eval_batches=1", "data.eval_splits=[valid]", "run.progress=false",
            "tracking.wandb=false", "optimizer.lr=0.01", "schedule.warmup_steps=2",
            *REGIMES[regime], *extra]


@pytest.fixture(scope="module")
def saved_runs(wt_corpus, tmp_path_factory):
    """Per (preset, regime): an uninterrupted 2-process EP=2 run of STEPS steps, and the same
    run stopped after SAVED_STEPS (its checkpoint is what the tests resume)."""
    runs = {}
    for preset in ("debug-moe", "debug-moe-h"):
        for regime in REGIMES:
            root = tmp_path_factory.mktemp(f"{preset}-{regime}")
            run_training(_overrides(wt_corpus, root / "straight", preset, regime, 2, 4,
                                    f"run.steps={STEPS}"), nproc=2)
            run_training(_overrides(wt_corpus, root / "saved", preset, regime, 2, 4,
                                    f"run.steps={SAVED_STEPS}"), nproc=2)
            runs[preset, regime] = root
    return runs


def _copy(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    return target


@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", ["debug-moe", "debug-moe-h"])
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("nproc,ep,micro", [(4, 4, 2), (1, 1, 8)])
def test_resumed_on_another_layout_follows_the_uninterrupted_run(wt_corpus, saved_runs, tmp_path,
                                                                  preset, regime, nproc, ep,
                                                                  micro):
    root = saved_runs[preset, regime]
    run_dir = _copy(root / "saved", tmp_path / "resumed")
    proc = run_training(_overrides(wt_corpus, run_dir, preset, regime, ep, micro,
                                   f"run.steps={STEPS}", "run.resume=true"), nproc=nproc)
    assert "re-split from 2 processes at ep_size=2" in proc.stdout
    want, got = read_metric(root / "straight", "train_loss"), read_metric(run_dir, "train_loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


@pytest.mark.timeout(300)
def test_another_accumulation_resumes_on_another_trajectory(wt_corpus, saved_runs, tmp_path):
    """1 process, micro-batch 4, accumulation 2: the same global batch, but each micro-step's
    balancing losses see 4 sequences instead of 8, so the trajectory is a different one."""
    root = saved_runs["debug-moe", "fp32"]
    run_dir = _copy(root / "saved", tmp_path / "resumed")
    run_training(_overrides(wt_corpus, run_dir, "debug-moe", "fp32", 1, 4,
                            "deepspeed.gradient_accumulation_steps=2", f"run.steps={STEPS}",
                            "run.resume=true"), nproc=1)
    got = read_metric(run_dir, "train_loss")
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1]


def _resumed_state(wt_corpus, run_dir: Path, preset: str, regime: str, nproc: int, ep: int,
                   micro: int, out: Path) -> dict[str, dict]:
    """Every parameter's state at a layout, gathered: experts in global order."""
    import os
    import sys

    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), str(REPO / "tests/train/resumed_state.py"),
               str(out), *_overrides(wt_corpus, run_dir, preset, regime, ep, micro,
                                     f"run.steps={SAVED_STEPS}")]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(nproc)]
    gathered: dict[str, dict] = {}
    for rank in sorted(ranks, key=lambda r: 0):
        for name, entry in rank["params"].items():
            have = gathered.setdefault(name, {"pieces": {}, "dense": entry})
            if entry["block"] is not None:
                have["pieces"][entry["block"][0]] = entry
    full = {}
    for name, have in gathered.items():
        if not have["pieces"]:
            full[name] = {"param": have["dense"]["param"], **have["dense"]["state"]}
            continue
        pieces = [have["pieces"][first] for first in sorted(have["pieces"])]
        full[name] = {"param": torch.cat([p["param"] for p in pieces])}
        for key in pieces[0]["state"]:
            full[name][key] = torch.cat([p["state"][key] for p in pieces])
    return full, ranks[0]["counters"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_state_at_the_new_layout_equals_the_saved_state_bit_for_bit(wt_corpus, saved_runs,
                                                                     tmp_path, regime):
    root = saved_runs["debug-moe-h", regime]
    reference, counters = _resumed_state(wt_corpus, _copy(root / "saved", tmp_path / "ref"),
                                         "debug-moe-h", regime, 2, 2, 4, tmp_path / "at2")
    for nproc, ep, micro in ((4, 4, 2), (1, 1, 8)):
        state, moved = _resumed_state(wt_corpus, _copy(root / "saved", tmp_path / f"w{nproc}"),
                                      "debug-moe-h", regime, nproc, ep, micro,
                                      tmp_path / f"at{nproc}")
        assert state.keys() == reference.keys()
        for name, want in reference.items():
            assert state[name].keys() == want.keys(), name
            for key, value in want.items():
                assert torch.equal(state[name][key], value), f"ep {ep}: {name} {key}"
        assert moved["step"] == counters["step"] == SAVED_STEPS
        assert moved["global_steps"] == counters["global_steps"]
        assert moved["lr"][0] == counters["lr"][0]
        assert moved["data"]["consumed"] == counters["data"]["consumed"]


@pytest.mark.timeout(400)
def test_a_resume_on_a_new_layout_killed_at_any_moment_leaves_the_checkpoint_as_it_was(
        wt_corpus, saved_runs, tmp_path, request):
    """The re-split happens in memory: nothing under checkpoints/ is written until the resumed
    run saves. kill -9 while it loads or trains, and the checkpoint still resumes exactly."""
    import hashlib
    import os
    import random
    import signal
    import sys
    import time

    seed = int(os.environ.get("SPARSE_MOE_FAULT_TEST_SEED", time.time_ns() % 2**32))
    print(f"{request.node.name}: seed {seed}")
    rng = random.Random(seed)
    root = saved_runs["debug-moe-h", "zero1"]
    run_dir = _copy(root / "saved", tmp_path / "resumed")

    def digests() -> dict[str, str]:
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()}

    before = digests()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "--master-port", str(_free_port()), "-m", "sparse_moe.train",
               *_overrides(wt_corpus, run_dir, "debug-moe-h", "zero1", 4, 2,
                           "run.steps=100000", "run.resume=true")]  # never reaches a save
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(rng.uniform(2.0, 8.0))  # start-up, the re-split, or the first steps
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split() \
        if proc.poll() is None else []
    for pid in [*map(int, children), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert digests() == before
    run_training(_overrides(wt_corpus, run_dir, "debug-moe-h", "zero1", 2, 4,
                            f"run.steps={STEPS}", "run.resume=true"), nproc=2)
    want, got = read_metric(root / "straight", "train_loss"), read_metric(run_dir, "train_loss")
    assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
