"""Faults injected into real 2-rank gloo training runs, each compared with a run that had none.

Every run is the debug-moe preset on a WikiText-2 slice with two experts per rank
(``parallel.ep_size=2``), launched by ``torchrun`` (or, for the dead-rank test, as two plain
processes); ``kill -9`` of the launcher and both workers at once stands for a machine failure.
The reference is the same configuration run once without interruption: resumed runs must
reproduce its logged losses and its final parameters exactly.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import REPO, _free_port, read_metric, train_command

STEPS = 16
SAVE_EVERY = 4
FAULT = "SPARSE_MOE_TRAIN_FAULT_"


def _overrides(wt_corpus, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=1", "run.eval_batches=2",
            f"run.save_every={SAVE_EVERY}", "run.keep_last=2", "run.progress=false",
            "data.micro_batch_size=4", "data.seq_len=16", "data.eval_splits=[valid]",
            "optimizer.name=adam", "optimizer.lr=0.01", "schedule.warmup_steps=3",
            "parallel.ep_size=2", "tracking.wandb=false", *extra]


def _env(**faults: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update({FAULT + name.upper(): value for name, value in faults.items()})
    return env


def _start(overrides: list[str], nproc: int = 2, **faults: str) -> subprocess.Popen:
    """torchrun and its workers in a new process group (the unit a kill -9 takes down)."""
    return subprocess.Popen(train_command(nproc) + overrides, cwd=REPO, env=_env(**faults),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(overrides: list[str], **faults: str) -> tuple[int, str]:
    proc = _start(overrides, **faults)
    output, _ = proc.communicate(timeout=240)
    return proc.returncode, output


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes started by a torchrun launcher."""
    ranks = {}
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except FileNotFoundError:  # the launcher has exited
        return {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every worker at once (torchrun starts each in its own session)."""
    for pid in [*_worker_pids(proc.pid).values(), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


def _wait(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{(proc.communicate()[0] or '')[-3000:]}")
        if time.time() > deadline:
            _kill_group(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _logged_steps(run_dir: Path) -> int:
    """The last step in the loss file (0 before the first)."""
    try:
        return max(read_metric(run_dir, "train_loss"), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return 0


def _latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def _step_of(tag: str | None) -> int:
    return int(tag.split("_")[1]) if tag else 0


def _save_in_progress(run_dir: Path, since: float, above: int = 0) -> str | None:
    """A checkpoint directory newer than ``latest`` and step ``above``, with a file written
    after ``since``."""
    base = max(_step_of(_latest(run_dir)), above)
    for path in sorted((run_dir / "checkpoints").glob("step_*")):
        try:
            if _step_of(path.name) > base and any(f.stat().st_mtime > since for f in path.iterdir()):
                return path.name
        except FileNotFoundError:  # removed meanwhile (a leftover of an earlier kill)
            continue
    return None


def _loss_rows(run_dir: Path) -> int:
    path = run_dir / "metrics" / "train_loss.csv"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _parameters(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Dense and expert parameters of a DeepSpeed checkpoint directory, by file and name."""
    params = {}
    for file in sorted(tag_dir.glob("*model_states.pt")):
        state = torch.load(file, map_location="cpu", weights_only=False)
        tensors = state["module"] if "module" in state else state
        params.update({f"{file.name}:{k}": v for k, v in tensors.items()})
    return params


def _assert_same_parameters(got_dir: Path, want_dir: Path) -> None:
    got, want = _parameters(got_dir), _parameters(want_dir)
    assert sorted(got) == sorted(want) and len(got) > 10
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _assert_reproduces(run_dir: Path, reference: Path) -> None:
    want, got = read_metric(reference, "train_loss"), read_metric(run_dir, "train_loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]
    assert _latest(run_dir) == f"step_{STEPS:08d}"
    _assert_same_parameters(run_dir / "checkpoints" / _latest(run_dir),
                            reference / "checkpoints" / _latest(reference))


@pytest.fixture(scope="module")
def reference(wt_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    status, output = _run(_overrides(wt_corpus, run_dir))
    assert status == 0, output[-3000:]
    return run_dir


def _rng(request) -> random.Random:
    """A random source whose seed is in the test's output (pytest shows it on failure)."""
    seed = int(os.environ.get("SPARSE_MOE_FAULT_TEST_SEED", time.time_ns() % 2**32))
    print(f"{request.node.name}: seed {seed} (set SPARSE_MOE_FAULT_TEST_SEED to repeat)")
    return random.Random(seed)


@pytest.mark.timeout(400)
def test_kill_9_at_any_moment_leaves_a_checkpoint_that_resumes_exactly(wt_corpus, tmp_path,
                                                                        reference, request):
    """kill -9 of the whole job inside the first save, inside a later save (with a committed
    checkpoint to fall back to) and at a random moment."""
    rng = _rng(request)
    run_dir = tmp_path / "killed"
    overrides = _overrides(wt_corpus, run_dir, "run.resume=true")
    inside_saves, saving = 0, None
    for attempt in range(3):
        started, rows = time.time(), _loss_rows(run_dir)
        proc = _start(overrides, save_delay="0.15")  # each checkpoint file takes 0.15 s longer
        if attempt < 2:
            above = _step_of(saving)  # the second kill waits for a later save than the first
            _wait(lambda started=started, above=above: _save_in_progress(run_dir, started, above),
                  proc, "a save to begin")
            saving = _save_in_progress(run_dir, started, above)
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            _wait(lambda rows=rows: _loss_rows(run_dir) > rows, proc, "a step")
            time.sleep(rng.uniform(0.0, 1.5))
            saving = None
        _kill_group(proc)
        if saving is not None and _latest(run_dir) != saving:
            inside_saves += 1
            print(f"kill {attempt + 1} landed inside the save of {saving}")
        latest = _latest(run_dir)
        if latest is not None:  # the pointer is whole and names a directory with every file
            assert (run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt").is_file()
    assert inside_saves >= 1, "no kill landed inside a checkpoint save"
    status, output = _run(overrides)
    assert status == 0, output[-3000:]
    _assert_reproduces(run_dir, reference)


@pytest.mark.timeout(400)
def test_metric_files_hold_one_header_and_each_step_once_after_a_kill(wt_corpus, tmp_path,
                                                                      reference):
    """kill -9 two steps after a checkpoint, resume: the steps the killed run logged past the
    checkpoint are logged again by the resumed run, and every file reads as one run's."""
    run_dir = tmp_path / "killed"
    # The dashboards too: W&B (offline) and TensorBoard, each step once after the resume.
    overrides = _overrides(wt_corpus, run_dir, "run.resume=true", "tracking.wandb=true",
                           "tracking.tensorboard=true", f"run.eval_every={SAVE_EVERY}")
    proc = _start(overrides)
    _wait(lambda: _latest(run_dir) == f"step_{SAVE_EVERY:08d}"
          and _logged_steps(run_dir) >= SAVE_EVERY + 2, proc, "two steps past a checkpoint")
    _kill_group(proc)
    repeated = _logged_steps(run_dir)
    assert repeated > SAVE_EVERY and _latest(run_dir) == f"step_{SAVE_EVERY:08d}"
    status, output = _run(overrides)
    assert status == 0, output[-3000:]
    _assert_dashboards_hold_each_step_once(run_dir)
    files = sorted((run_dir / "metrics").glob("*.csv"))
    assert len(files) > 10
    for path in files:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
        assert rows[0][0] == "step" and all(row[0] != "step" for row in rows[1:]), path.name
        steps = [int(row[0]) for row in rows[1:]]  # what pandas.read_csv would parse
        assert steps == sorted(set(steps)), f"{path.name}: steps {steps}"
    losses = read_metric(run_dir, "train_loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    want = read_metric(reference, "train_loss")
    assert [losses[s] for s in sorted(losses)] == [want[s] for s in sorted(want)]
    loads = [json.loads(line)["step"] for line in
             (run_dir / "expert_load.jsonl").read_text().splitlines()]
    assert loads == list(range(1, STEPS + 1))


def _assert_dashboards_hold_each_step_once(run_dir: Path) -> None:
    """The W&B run left for ``wandb sync`` and TensorBoard's reader hold every step from 1 to
    the end once, with the values of the CSV files (those of the resumed run where a step was
    run twice); the killed attempt's W&B directory is kept aside."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_files import offline_run_files, read_offline_run

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = offline_run_files(run_dir)
    assert len(files) == 1 and files[0].parent.name.endswith(run_id), files
    assert len(list((run_dir / "wandb" / "superseded").glob(f"offline-run-*-{run_id}"))) == 1
    run = read_offline_run(files[0])
    losses = read_metric(run_dir, "train_loss")
    assert run.steps_of("train/loss") == list(range(1, STEPS + 1))
    assert run.values("train/loss") == losses
    evaluated = read_metric(run_dir, "valid_perplexity")
    assert sorted(evaluated) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert run.values("valid/perplexity") == evaluated
    assert run.steps_of("moe/expert_load") == sorted(evaluated)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s, float(np.float32(losses[s]))) for s in range(1, STEPS + 1)]
    assert [e.step for e in events.Images("moe/expert_load")] == sorted(evaluated)


@pytest.mark.timeout(400)
def test_preemption_signal_to_a_random_rank_at_a_random_step(wt_corpus, tmp_path, reference,
                                                             request):
    """SIGUSR1 and SIGTERM, each to a randomly chosen rank after a random number of steps."""
    rng = _rng(request)
    run_dir = tmp_path / "preempted"
    overrides = _overrides(wt_corpus, run_dir, "run.resume=true")
    signals = [signal.SIGUSR1, signal.SIGTERM]
    rng.shuffle(signals)
    saved = 0
    for sig in signals:
        proc = _start(overrides)
        target = saved + rng.randint(1, 4)
        _wait(lambda target=target: _logged_steps(run_dir) >= target, proc, f"step {target}")
        rank = rng.randint(0, 1)
        os.kill(_worker_pids(proc.pid)[rank], sig)
        output, _ = proc.communicate(timeout=120)
        marker = json.loads((run_dir / "preempted.json").read_text())
        saved = _step_of(_latest(run_dir))
        context = f"{sig.name} to rank {rank} at step {target}:\n{output[-3000:]}"
        assert marker["step"] == saved and target <= saved < STEPS, context
        assert "exiting with status 75" in output, context
        assert _logged_steps(run_dir) == saved, context  # no rank went past the boundary
    status, output = _run(overrides)
    assert status == 0, output[-3000:]
    assert not (run_dir / "preempted.json").exists()
    _assert_reproduces(run_dir, reference)
    # Resumed once more, the finished run must not rewrite its committed checkpoint in place:
    # with the directory read-only, any write would fail the run.
    _make_read_only(run_dir / "checkpoints", True)
    try:
        status, output = _run(overrides)
    finally:
        _make_read_only(run_dir / "checkpoints", False)
    assert status == 0, output[-3000:]


@pytest.mark.timeout(300)
def test_a_dead_rank_ends_the_survivor_with_a_message(wt_corpus, tmp_path):
    """Two plain processes (rank 0 serves the store); kill -9 of rank 1 in the middle of steps."""
    run_dir = tmp_path / "dead"
    port = str(_free_port())
    overrides = _overrides(wt_corpus, run_dir, "run.collective_timeout_minutes=0.5",
                           "run.save_every=0", steps=100000)
    procs, logs = [], [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    for rank in (0, 1):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen(train_command(1) + overrides, cwd=REPO, env=env,
                                          stdout=log, stderr=log, start_new_session=True))
    try:
        _wait(lambda: _logged_steps(run_dir) >= 3, procs[0], "step 3")
        procs[1].kill()
        killed_at = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = logs[0].read_text()
    print(f"the survivor exited {waited:.1f} s after rank 1 was killed")
    assert procs[0].returncode not in (0, None)
    assert waited < 30 + 10 + 20, f"the survivor took {waited:.0f} s"  # timeout + roll call + slack
    message = next(line for line in stderr.splitlines() if line.startswith("sparse-moe-train: error"))
    # Killed at a random moment, rank 1 is missed by the next collective rank 0 enters: one of
    # a step's, or the agreement on preemption and checkpoints that ends every step.
    assert re.search(r"rank 0 of 2: a collective failed during (step \d+ \(forward|the "
                     r"preemption and checkpoint agreement after step \d+)", message), message
    assert "rank(s) [1] did not answer" in message, message
    assert "after 0.5 min (run.collective_timeout_minutes)" in message, message


def _states(tag_dir: Path) -> dict[str, object]:
    """Module, optimizer and scheduler state of every file in a checkpoint directory."""
    states = {}
    for file in sorted(tag_dir.glob("*.pt")):
        state = torch.load(file, map_location="cpu", weights_only=False)
        for key in ("module", "optimizer", "lr_scheduler"):
            if key in state:
                states[f"{file.name}:{key}"] = state[key]
        if "optimizer_state_dict" in state:  # ZeRO: fp32 master partitions and Adam's state
            zero = state["optimizer_state_dict"]
            states[f"{file.name}:master"] = zero["single_partition_of_fp32_groups"]
            states[f"{file.name}:base"] = zero["base_optimizer_state"]
        elif "module" not in state:  # an expert's parameters
            states[file.name] = state
    return states


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.timeout(300)
def test_nan_on_one_rank_skips_the_step_and_a_run_of_them_stops(wt_corpus, tmp_path):
    run_dir = tmp_path / "nan"
    base = ["run.save_every=1", "run.keep_last=10", "run.max_nonfinite_steps=2",
            "deepspeed.gradient_accumulation_steps=2"]
    # Step 3's loss is NaN on rank 1 only: both ranks skip the update.
    status, output = _run(_overrides(wt_corpus, run_dir, *base, steps=3), ranks="1", nan_steps="3")
    assert status == 0, output[-3000:]
    checkpoints = run_dir / "checkpoints"
    before, after = _states(checkpoints / "step_00000002"), _states(checkpoints / "step_00000003")
    assert _equal(after, before), "the skipped step changed parameters, optimizer or schedule"
    assert not _equal(_states(checkpoints / "step_00000001"), before)  # taken steps do change them
    engine = torch.load(checkpoints / "step_00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert (engine["global_steps"], engine["skipped_steps"]) == (3, 1)  # DeepSpeed's counters
    assert read_metric(run_dir, "train_skipped_steps") == {1: 0.0, 2: 0.0, 3: 1.0}
    assert str(read_metric(run_dir, "train_loss")[3]) == "nan"
    # Resumed: steps 5 and 6 are NaN, the limit is 2: the run stops, step 4's checkpoint stays.
    status, output = _run(_overrides(wt_corpus, run_dir, *base, "run.resume=true", steps=10),
                          ranks="1", nan_steps="5,6")
    assert status != 0
    assert ("steps 5 to 6: 2 steps in a row had a non-finite loss or gradient "
            "(run.max_nonfinite_steps=2)") in output, output[-3000:]
    assert f"{checkpoints / 'step_00000004'}, was saved before them" in output
    assert _latest(run_dir) == "step_00000004"
    assert not (checkpoints / "step_00000005").exists() and not (checkpoints / "step_00000006").exists()
    assert not _equal(_states(checkpoints / "step_00000004"), after)  # step 4 was taken


@pytest.mark.timeout(300)
def test_nan_under_zero1_bf16_is_skipped_by_deepspeed_itself(wt_corpus, tmp_path):
    """ZeRO's optimizer checks the gradient norm; the trainer's guard stands aside."""
    run_dir = tmp_path / "nan_bf16"
    status, output = _run(_overrides(wt_corpus, run_dir, "run.save_every=1", "run.keep_last=10",
                                     "deepspeed.config=ds_configs/zero1_bf16.json", steps=3),
                          ranks="1", nan_steps="3")
    assert status == 0, output[-3000:]
    checkpoints = run_dir / "checkpoints"
    before = _states(checkpoints / "step_00000002")
    assert any(name.endswith(":master") for name in before)  # it is a ZeRO checkpoint
    assert _equal(_states(checkpoints / "step_00000003"), before)
    assert not _equal(_states(checkpoints / "step_00000001"), before)
    assert read_metric(run_dir, "train_skipped_steps") == {1: 0.0, 2: 0.0, 3: 1.0}


def _make_read_only(path: Path, read_only: bool) -> None:
    """chmod for users; for root, whom modes do not stop, the immutable attribute."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i" if read_only else "-i", str(path)], check=True)
    else:
        subprocess.run(["chmod", "-R", "a-w" if read_only else "u+w", str(path)], check=True)


@pytest.mark.timeout(400)
def test_full_disk_and_read_only_directory_fail_clearly_and_lose_nothing(wt_corpus, tmp_path,
                                                                         reference):
    """ENOSPC is injected (an unprivileged test cannot fill a real file system); read-only is real."""
    run_dir = tmp_path / "disk"
    checkpoints = run_dir / "checkpoints"
    overrides = _overrides(wt_corpus, run_dir, "run.resume=true")
    # The second save (step 8) fails on rank 1 after half a file.
    status, output = _run(overrides, ranks="1", enospc_save="2")
    assert status != 0
    assert (f"saving checkpoint {checkpoints / 'step_00000008'} failed: rank 1: writing "
            f"{checkpoints / 'step_00000008'}") in output, output[-3000:]
    assert "[Errno 28] No space left on device" in output
    assert f"{checkpoints / 'latest'} still names step_00000004" in output
    assert _latest(run_dir) == "step_00000004"
    _make_read_only(checkpoints, True)
    try:
        status, output = _run(overrides)
    finally:
        _make_read_only(checkpoints, False)
    assert status != 0
    assert f"saving checkpoint {checkpoints / 'step_00000008'} failed: rank " in output, output[-3000:]
    assert ("Permission denied" in output) or ("Operation not permitted" in output)
    assert _latest(run_dir) == "step_00000004"
    status, output = _run(overrides)
    assert status == 0, output[-3000:]
    _assert_reproduces(run_dir, reference)
