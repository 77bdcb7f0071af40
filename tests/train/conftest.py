"""A small WikiText-2 corpus built with the real data-prep command line, shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as data_prep
from tests.gpus import gpu_environment

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data"


def _head(src: Path, dst: Path, num_bytes: int) -> Path:
    data = src.read_bytes()[:num_bytes]
    dst.write_bytes(data[: data.rfind(b"\n") + 1])
    return dst


@pytest.fixture(scope="session")
def wt_corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wt2")
    texts = {split: _head(SHARED / "wikitext-2" / f"{split}.txt", root / f"{split}.txt", size)
             for split, size in (("train", 400_000), ("valid", 60_000), ("test", 60_000))}
    prefix = root / "sp500"
    assert data_prep(["tokenizer", "-i", str(texts["train"]), "--model-prefix", str(prefix),
                      "--vocab-size", "500", "--num-threads", "2"]) == 0
    for split, path in texts.items():
        assert data_prep(["encode", "-i", str(path), "-t", f"{prefix}.model", "-o",
                          str(root / "corpus"), "--split", split, "--no-progress"]) == 0
    return {"corpus": str(root / "corpus"), "tokenizer": f"{prefix}.model", "root": str(root)}


def train_command(nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "sparse_moe.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", "sparse_moe.train"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(overrides: list[str], nproc: int = 1, timeout: int = 240,
                 check: bool = True, gpus: bool = False,
                 wandb: bool = False) -> subprocess.CompletedProcess:
    """A training run in a child process: on the CPU, or with ``gpus`` on the suite's GPUs.

    W&B (on by default for users) is off unless ``wandb``: starting its service costs each run
    about 3 s, and only the tests that read its files need it (a ``tracking.wandb=...`` in
    ``overrides`` wins).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if gpus:
        env = gpu_environment(env)
    if not wandb and not any(o.startswith("tracking.wandb=") for o in overrides):
        overrides = [*overrides, "tracking.wandb=false"]
    proc = subprocess.run(train_command(nproc) + overrides, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_metric(run_dir: Path, name: str) -> dict[int, float]:
    """step -> value from DeepSpeed's CSV monitor file for ``name`` (e.g. train_loss).

    The trainer keeps one header and each step once (``train/tracking.py``); the last value
    logged for a step wins here too, as for files written before it did.
    """
    rows = (Path(run_dir) / "metrics" / f"{name}.csv").read_text().splitlines()
    pairs = (row.split(",") for row in rows if row and not row.startswith("step,"))
    return {int(step): float(value) for step, value in pairs}


@pytest.fixture(scope="session")
def m30_corpus(tmp_path_factory) -> dict[str, str]:
    """Multi30k English-German slices encoded as a parallel corpus with a padding id."""
    import gzip

    root = tmp_path_factory.mktemp("m30")
    sizes = {"train": ("train", 2000), "valid": ("val", 120), "test": ("test_2016_flickr", 120)}
    files = {}
    for split, (name, count) in sizes.items():
        for lang in ("en", "de"):
            with gzip.open(SHARED / "multi30k" / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f).rstrip("\n") for _ in range(count)]
            path = root / f"{split}.{lang}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files[split, lang] = path
    prefix = root / "sp"
    assert data_prep(["tokenizer", "-i", str(files["train", "en"]), str(files["train", "de"]),
                      "--model-prefix", str(prefix), "--vocab-size", "800", "--pad-id", "3"]) == 0
    for split in sizes:
        assert data_prep(["encode-parallel", "--source", str(files[split, "en"]), "--target",
                          str(files[split, "de"]), "--src-lang", "en", "--tgt-lang", "de", "-t",
                          f"{prefix}.model", "-o", str(root / "corpus"), "--split", split,
                          "--no-progress"]) == 0
    return {"corpus": str(root / "corpus"), "tokenizer": f"{prefix}.model", "root": str(root)}
