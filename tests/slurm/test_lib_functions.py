"""The shell functions of slurm/lib.sh that need no Slurm: ports, threads, run directories, and
where a TERM goes (the workers a launcher started, never the launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bash(script: str, **env: str) -> str:
    done = subprocess.run(["bash", "-c", f'source slurm/lib.sh; {script}'], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_port_is_below_the_ephemeral_range_and_changes_on_requeue():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    seen = set()
    for job in (1, 987654, 4242424, 99999999):
        ports = [int(_bash("smoe_port", SLURM_JOB_ID=str(job), SLURM_RESTART_COUNT=str(r)))
                 for r in range(3)]
        assert all(15000 <= p < 25000 and not low <= p <= high for p in ports), ports
        assert len(set(ports)) == 3  # a requeued start does not reuse the previous port
        seen |= set(ports)
    assert len(seen) == 12


def test_threads_per_rank_share_the_tasks_cpus():
    assert _bash("smoe_threads_per_rank 8", SLURM_CPUS_PER_TASK="32") == "4"
    assert _bash("smoe_threads_per_rank 1", SLURM_CPUS_PER_TASK="6") == "6"
    assert _bash("smoe_threads_per_rank 8", SLURM_CPUS_PER_TASK="4") == "1"  # at least one
    assert _bash("smoe_threads_per_rank 4") == "1"  # no --cpus-per-task


def test_default_run_directory_is_on_scratch_or_run_root():
    job = {"SLURM_JOB_NAME": "moe", "SLURM_JOB_ID": "77", "REPO_DIR": "/repo"}
    assert _bash("smoe_default_run_dir", **job) == "/repo/runs/moe-77"
    assert _bash("smoe_default_run_dir", SCRATCH="/scratch/me", **job) == "/scratch/me/moe-77"
    assert _bash("smoe_default_run_dir", SCRATCH="/s", RUN_ROOT="/big", **job) == "/big/moe-77"


def test_save_cadence_is_on_by_default_and_overridable():
    args = _bash('smoe_train_args; printf "%s\\n" "${SMOE_TRAIN_ARGS[@]}"', CONFIG="c.yaml",
                 RUN_DIR="/r", RESUME="0", OVERRIDES="run.steps=5").splitlines()
    assert args == ["--config", "c.yaml", "run.dir=/r", "run.save_every_minutes=30",
                    "run.steps=5"]
    args = _bash('smoe_train_args; printf "%s\\n" "${SMOE_TRAIN_ARGS[@]}"', CONFIG="c.yaml",
                 RUN_DIR="/r", RESUME="0", SAVE_EVERY_MINUTES="5").splitlines()
    assert "run.save_every_minutes=5" in args


LAUNCHER = r"""
import os, signal, subprocess, sys, time
# A stand-in launcher: records a TERM it gets, starts one worker with LOCAL_RANK (as torchrun
# and DeepSpeed's launcher do), and waits for it.
log = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *a: open(log, "a").write("launcher TERM\n"))
worker = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
log = sys.argv[1]
def done(*a):
    open(log, "a").write("worker TERM\\n"); sys.exit(75)
signal.signal(signal.SIGTERM, done)
open(log, "a").write("worker ready\\n")
time.sleep(60)
''', log], env=dict(os.environ, LOCAL_RANK="0"))
while worker.poll() is None:
    time.sleep(0.05)
open(log, "a").write(f"launcher saw {worker.returncode}\n")
"""


def test_term_goes_to_the_workers_and_the_launcher_waits_for_them(tmp_path):
    log = tmp_path / "signals.log"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = (f'RUN_DIR={run_dir}; smoe_run {sys.executable} -c "$LAUNCHER" {log}; '
              'echo "status $?"')
    proc = subprocess.Popen(["bash", "-c", f'source slurm/lib.sh; {script}'], cwd=REPO,
                            env={"PATH": os.environ["PATH"], "LAUNCHER": LAUNCHER},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "worker ready" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the worker never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # what Slurm sends the batch shell
    output, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert lines == ["worker ready", "worker TERM", "launcher saw 75"], (lines, output)
    assert "received SIGTERM" in output and "finished with status 0" in output


SRUN_STAND_IN = r"""
import signal, sys, time
# Records the signals it gets, as srun would forward them (srun aborts its step on a TERM).
log = sys.argv[1]
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: open(log, "a").write(f"{signal.Signals(s).name}\n"))
open(log, "a").write("ready\n")
while "SIGUSR1" not in open(log).read():
    time.sleep(0.05)
"""


def test_term_reaches_srun_as_usr1(tmp_path):
    log = tmp_path / "signals.log"
    proc = subprocess.Popen(["bash", "-c", f'source slurm/lib.sh; RUN_DIR={tmp_path}; '
                             f'SMOE_RESEND_SECONDS=1 smoe_run {sys.executable} -c "$SRUN" {log}'],
                            cwd=REPO, env={"PATH": os.environ["PATH"], "SRUN": SRUN_STAND_IN},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "ready" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the stand-in never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert lines[:2] == ["ready", "SIGUSR1"] and "SIGTERM" not in lines, (lines, output)
    assert "received SIGTERM: forwarding it to the training processes as SIGUSR1" in output


def test_the_trainer_derives_the_same_port_as_the_job_scripts():
    """``srun python -m sparse_moe.train`` without a template picks the port the templates do."""
    from sparse_moe.train.distributed import slurm_port

    for job, restart in ((1, 0), (987654, 2), (99999999, 1)):
        env = {"SLURM_JOB_ID": str(job), "SLURM_RESTART_COUNT": str(restart)}
        assert slurm_port(env) == int(_bash("smoe_port", **env))
