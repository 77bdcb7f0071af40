"""A WikiText-2 training corpus for the throughput benchmarks (imported by the scripts here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def build_corpus(work: Path, vocab_size: int, train_bytes: int) -> tuple[Path, Path]:
    """The first ``train_bytes`` of WikiText-2's train.txt, with a tokenizer trained on them."""
    text = (SHARED / "wikitext-2" / "train.txt").read_bytes()[:train_bytes]
    train = work / "train.txt"
    train.write_bytes(text[: text.rfind(b"\n") + 1])
    prefix, corpus = work / f"sp{vocab_size}", work / "corpus"
    # As subprocesses: benchmarks/data_prep.py would shadow the data_prep package here.
    for command in (["tokenizer", "-i", str(train), "--model-prefix", str(prefix),
                     "--vocab-size", str(vocab_size), "--num-threads", "2"],
                    ["encode", "-i", str(train), "-t", f"{prefix}.model", "-o", str(corpus),
                     "--split", "train", "--no-progress"]):
        subprocess.run([sys.executable, "-m", "data_prep", *command], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return corpus, Path(f"{prefix}.model")
