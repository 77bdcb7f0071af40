"""A real local Slurm for the job-script tests, the shared corpus, and job helpers.

The cluster is installed with apt-get if needed (Debian packages), started once for the
job-script tests under a temporary directory, and stopped by PID after them. Test sessions on
the same machine take turns through a lock file, because the fake nodes' names are host-wide.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparse_moe.parallel.startup import use_environment_extension_dir
from tests.slurm.cluster import ClusterError, LocalSlurm, ensure_installed
from tests.train.conftest import REPO, read_metric, wt_corpus  # noqa: F401 (a fixture)

LOCK_FILE = Path("/tmp/sparse-moe-local-slurm.lock")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module", autouse=True)
def private_torch_extensions(tmp_path_factory):
    """DeepSpeed JIT-builds its CPU shared-memory op into torch's extension cache at start-up.

    The default cache is shared by every process on the machine, and a process killed while it
    holds the cache's lock leaves other processes waiting forever. The jobs and the direct runs
    here use a private copy of the environment's cache (built ops included, so nothing is
    rebuilt: every start builds with the environment's ninja, ``parallel/startup.py``).
    """
    saved = os.environ.get("TORCH_EXTENSIONS_DIR")
    use_environment_extension_dir()  # the build every start outside these tests uses
    default = Path(os.environ["TORCH_EXTENSIONS_DIR"]) if "TORCH_EXTENSIONS_DIR" in os.environ \
        else Path.home() / ".cache" / "torch_extensions"
    private = tmp_path_factory.mktemp("torch_extensions")
    if default.is_dir():
        shutil.copytree(default, private, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("lock"))
    os.environ["TORCH_EXTENSIONS_DIR"] = str(private)
    yield private
    if saved is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = saved


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> LocalSlurm:
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ensure_installed()
        except ClusterError as err:
            pytest.fail(f"no Slurm for the job-script tests: {err}", pytrace=False)
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, gpus=4)
        try:
            cluster.start()
        except ClusterError as err:
            cluster.stop()
            pytest.fail(f"the local Slurm did not start: {err}", pytrace=False)
        try:
            yield cluster
        finally:
            cluster.stop()


def train_overrides(corpus: dict[str, str], steps: int, *extra: str) -> list[str]:
    """The debug-preset run every launch test uses (on top of configs/demo.yaml)."""
    return [f"data.corpus={corpus['corpus']}", f"data.tokenizer={corpus['tokenizer']}",
            "model.preset=debug-moe", f"run.steps={steps}", "run.log_every=1",
            "run.eval_batches=2", "run.eval_every=0", "run.progress=false",
            "data.micro_batch_size=8", "data.seq_len=32", "optimizer.name=adam",
            "optimizer.lr=0.01", "schedule.warmup_steps=5", "parallel.ep_size=2", *extra]


@dataclass
class Job:
    job_id: str
    log_dir: Path
    cluster: LocalSlurm

    def info(self) -> dict[str, str]:
        text = self.cluster.command("scontrol", "show", "job", "-o", self.job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, timeout: float = 240) -> dict[str, str]:
        """Polls until the job has finished for good (a requeued job is still going)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info.get("JobState") in FINISHED:
                return info
            time.sleep(0.5)
        self.cluster.command("scancel", self.job_id, check=False)
        raise AssertionError(f"job {self.job_id} did not finish within {timeout} s "
                             f"({self.info().get('JobState')}); log:\n{self.text()[-4000:]}")

    def text(self) -> str:
        """The job's log (logs/%x-%j.out in the templates; ``log_dir`` here)."""
        logs = sorted(self.log_dir.glob(f"*-{self.job_id}.out"))
        return logs[0].read_text(errors="replace") if logs else "(no log)"


def submit(cluster: LocalSlurm, script: str, log_dir: Path, *sbatch_args: str,
           **variables: str) -> Job:
    """``sbatch`` a template from the repository with its parameters as environment variables.

    The log goes to ``log_dir`` (instead of the template's logs/%x-%j.out) in append mode.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(cluster.env, OMP_NUM_THREADS="1", **variables)
    cmd = ["sbatch", "--parsable", "--time=15", f"--output={log_dir}/%x-%j.out", *sbatch_args,
           f"slurm/{script}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stderr}"
    return Job(proc.stdout.strip().split(";")[0], log_dir, cluster)
