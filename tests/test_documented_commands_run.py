"""The commands of README.md, docs/training.md and docs/launch.md, run as written at toy size.

Each document's ``bash`` blocks are run in order as one script, in a folder laid out like a
user's checkout (``configs/``, ``ds_configs/``, ``.venv``), with raw text in ``corpus/`` and a
user's ``my_run.yaml``. Only sizes are changed (:data:`TOY`): the vocabulary, the steps, the
processes, and the paper's presets for the debug ones of the same kind. What cannot run on this
machine is left out, each for the reason in :data:`NOT_HERE`; ``tests/test_documented_commands.py``
still checks those commands against their programs' parsers, and ``tests/slurm/`` submits the
templates that ``slurm/README.md`` shows to a real Slurm.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_documented_commands import bash_commands

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"

# (pattern, replacement): the same commands at toy size.
TOY = [
    (r"--vocab-size \d+", "--vocab-size 300"),
    (r"run\.steps=\d+", "run.steps=2"),
    (r"--nproc-per-node \d+", "--nproc-per-node 2"),
    (r"--num_gpus \d+", "--num_gpus 2"),
    (r"parallel\.ep_size=\d+(?= .*sparse_moe\.train|.*run\.|.*deepspeed\.)", "parallel.ep_size=2"),
    (r"model\.preset=moe-[\w-]+(?=.*run\.dir)", "model.preset=debug-moe"),
    (r"model\.preset=4xlstm-512", "model.preset=debug-4xlstm"),
]
# (pattern, why it cannot run here)
NOT_HERE = [
    (r"^make test\b", "this suite itself"),
    (r"^make demo\b", "3 minutes of training on 2 processes; its steps (a tokenizer, shards, "
                      "training, the report) run at toy size above and in tests/train"),
    (r"^make install|^git clone", "the environment this suite runs in"),
    (r"--format hub", "downloads WikiText-103 (no internet here)"),
    (r"sparse-moe-data lm1b", "the 1B-word benchmark's download (its reader: tests/data_prep)"),
    (r"\bsbatch\b|^scancel\b|^n=\$\(grep", "Slurm: the templates run in tests/slurm"),
    (r"^wandb sync\b", "uploads to W&B (the offline files are read in tests/train)"),
]
DOCS = ["README.md", "docs/training.md", "docs/launch.md"]

USER_CONFIG = """\
# the user's run: their corpus and tokenizer (made by README's step 1), a model and a run dir
run:
  dir: runs/my-run
  steps: 2
  eval_batches: 2
  progress: false
data:
  corpus: corpora/mine
  tokenizer: tok/sp8k.model
  micro_batch_size: 8
  seq_len: 32
model:
  preset: debug-moe
tracking:
  wandb: false
"""


def runnable(command: str) -> bool:
    return not any(re.search(pattern, command) for pattern, _ in NOT_HERE)


def at_toy_size(command: str) -> str:
    for pattern, replacement in TOY:
        command = re.sub(pattern, replacement, command)
    return command


def script(doc: str) -> str:
    """The document's runnable commands, at toy size, as one bash script."""
    lines = [at_toy_size(c) for c in bash_commands(REPO / doc) if runnable(c)]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def _head(src: Path, dst: Path, num_bytes: int) -> None:
    data = src.read_bytes()[:num_bytes]
    dst.write_bytes(data[: data.rfind(b"\n") + 1])


def _checkout(root: Path) -> None:
    """A user's checkout: the repository's configs beside their own, raw text in corpus/."""
    (root / "configs").mkdir()
    for config in (REPO / "configs").iterdir():
        (root / "configs" / config.name).symlink_to(config)
    for name in ("ds_configs", "slurm"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "my_run.yaml").write_text(USER_CONFIG)
    (root / "configs" / "my_run.yaml").write_text(USER_CONFIG)
    (root / "corpus").mkdir()
    for split, size in (("train", 300_000), ("valid", 40_000), ("test", 40_000)):
        _head(SHARED / "wikitext-2" / f"{split}.txt", root / "corpus" / f"{split}.txt", size)


def test_toy_sizes_and_left_out_commands_are_what_they_say():
    assert at_toy_size("torchrun --nproc-per-node 8 -m sparse_moe.train --config c.yaml "
                       "parallel.ep_size=8 run.steps=20000") == (
        "torchrun --nproc-per-node 2 -m sparse_moe.train --config c.yaml parallel.ep_size=2 "
        "run.steps=2")
    # the planner keeps its sizes: it builds nothing
    plan = "sparse-moe-plan --config c.yaml model.preset=moe-4096-h parallel.ep_size=16 --world 16"
    assert at_toy_size(plan) == plan
    assert not runnable("sbatch --nodes=2 slurm/train_torchrun.sbatch")
    assert runnable("sparse-moe-data encode -i corpus/train.txt -t tok/sp8k.model -o corpora/mine")


@pytest.mark.timeout(600)
def test_documented_commands_run_as_written_at_toy_size(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    _checkout(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true",
               PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for doc in DOCS:
        if doc == "docs/training.md":  # its corpus is README's, under the name it uses
            (root / "corpora" / "wt2").symlink_to(root / "corpora" / "mine")
        proc = subprocess.run(["bash", "-x", "-c", script(doc)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (f"{doc}: a command failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert (root / "runs" / "report").is_dir()
