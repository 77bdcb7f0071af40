"""Start-up builds each thing once: the checks before training (``preflight.check_run``) hand
what they built to the trainer, which does not build it again (a new run, and a resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.train.conftest import REPO

SCRIPT = Path(__file__).with_name("_count_startup.py")


def _start(wt_corpus, run_dir: Path, *extra: str) -> dict:
    args = [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", "run.steps=2", "model.preset=debug-moe", "run.progress=false",
            "run.eval_batches=1", "data.eval_splits=[valid]", "tracking.wandb=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CALLS ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[-1][len("CALLS "):])


def test_a_start_and_a_resume_build_the_task_and_the_deepspeed_config_once(wt_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert _start(wt_corpus, run_dir) == {"status": 0, "build_ds_config": 1, "make_task": 1}
    assert _start(wt_corpus, run_dir, "run.steps=3", "run.resume=true") == {
        "status": 0, "build_ds_config": 1, "make_task": 1}
