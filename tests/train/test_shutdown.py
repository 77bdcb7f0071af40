"""A finished run leaves no communication threads behind for Python's finalization.

A gloo worker thread still alive when the interpreter finalizes can be killed inside a C++
destructor (it needs the GIL to free a tensor), which aborts a run that succeeded with
SIGABRT, "terminate called without an active exception". The race is rare and depends on
load, so the tests check its precondition instead: once the command line's ``main`` returns,
no thread that Python did not start (gloo workers and loops, the c10d store) is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import REPO, _free_port
from tests.train.test_train_lm import _base

# Runs the command line in-process, then writes down the threads Python did not start.
RUN_AND_LIST_THREADS = """
import json, os, sys, threading
from sparse_moe.train.cli import main

# Not communication threads: jemalloc's background purger, which pyarrow starts when wandb
# imports it to log an image, runs until the process exits by design.
ALLOCATOR_THREADS = {"jemalloc_bg_thd"}

def native_threads():
    python = {t.native_id for t in threading.enumerate()}
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in tids if t not in python)
    return sorted(name for name in names if name not in ALLOCATOR_THREADS)

status = main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
with open(os.path.join(os.environ["THREAD_REPORTS"], f"rank{rank}.json"), "w") as out:
    json.dump({"rank": rank, "status": status, "native": native_threads()}, out)
sys.exit(status)
"""


def _run(overrides: list[str], nproc: int, tmp_path) -> list[dict]:
    script = tmp_path / "run_and_list_threads.py"
    script.write_text(RUN_AND_LIST_THREADS)
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(_free_port())])
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), THREAD_REPORTS=str(tmp_path))
    proc = subprocess.run(launcher + [str(script)] + overrides, capture_output=True, text=True,
                          timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]


@pytest.mark.timeout(300)
def test_one_process_run_ends_with_no_communication_threads(wt_corpus, tmp_path):
    reports = _run(_base(wt_corpus, tmp_path / "run", 3), 1, tmp_path)
    assert [(r["status"], r["native"]) for r in reports] == [(0, [])]


@pytest.mark.timeout(300)
def test_expert_parallel_run_ends_with_no_communication_threads(wt_corpus, tmp_path):
    """Two ranks, DeepSpeed's expert and expert-data-parallel groups, a checkpoint save."""
    reports = _run(_base(wt_corpus, tmp_path / "run", 3, "parallel.ep_size=2"), 2, tmp_path)
    assert sorted((r["rank"], r["status"], tuple(r["native"])) for r in reports) == \
        [("0", 0, ()), ("1", 0, ())]
