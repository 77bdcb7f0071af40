"""The small real inputs every catalogue case starts from, built once per test session.

WikiText-2 text, three SentencePiece models trained on it (one with a padding id), a corpus
encoded with the first, and a run directory with a checkpoint written by one real training
step. Cases copy what they damage into a directory of their own, so the originals stay good
for the next case.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data"


@dataclass
class Workspace:
    root: Path

    @property
    def train_text(self) -> Path:
        return self.root / "text" / "train.txt"

    @property
    def valid_text(self) -> Path:
        return self.root / "text" / "valid.txt"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tok" / "sp.model"

    @property
    def other_tokenizer(self) -> Path:
        return self.root / "tok" / "other.model"

    @property
    def pad_tokenizer(self) -> Path:
        """With a padding id, as translation corpora need (``--pad-id 3``)."""
        return self.root / "tok" / "pad.model"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def run(self) -> Path:
        return self.root / "run"


def _head(src: Path, dst: Path, num_bytes: int) -> None:
    data = src.read_bytes()[:num_bytes]
    dst.write_bytes(data[: data.rfind(b"\n") + 1])


def build_workspace(root: Path) -> Workspace:
    from data_prep.cli import main as data_prep

    ws = Workspace(root)
    ws.train_text.parent.mkdir(parents=True)
    _head(SHARED / "wikitext-2" / "train.txt", ws.train_text, 150_000)
    _head(SHARED / "wikitext-2" / "valid.txt", ws.valid_text, 30_000)
    for model, size, extra in ((ws.tokenizer, "300", []), (ws.other_tokenizer, "200", []),
                               (ws.pad_tokenizer, "300", ["--pad-id", "3"])):
        prefix = str(model.with_suffix(""))
        assert data_prep(["tokenizer", "-i", str(ws.train_text), "--model-prefix", prefix,
                          "--vocab-size", size, "--num-threads", "1", *extra]) == 0
    for split, text in (("train", ws.train_text), ("valid", ws.valid_text)):
        assert data_prep(["encode", "-i", str(text), "-t", str(ws.tokenizer), "-o",
                          str(ws.corpus), "--split", split, "--no-progress"]) == 0
    _train_one_step(ws)
    return ws


def _train_one_step(ws: Workspace) -> None:
    """The one real trainer start of the catalogue: a checkpoint for the resume cases."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_moe.train", f"data.corpus={ws.corpus}",
         f"data.tokenizer={ws.tokenizer}", f"run.dir={ws.run}", "run.steps=1",
         "run.eval_batches=1", "run.progress=false", "tracking.wandb=false",
         "tracking.csv=false", f"deepspeed.config={REPO / 'ds_configs' / 'cpu_fp32.json'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ws.run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def copy_into(source: Path, target: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return target
