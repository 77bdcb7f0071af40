"""End-to-end ``data_prep encode`` against SentencePiece encoding alone, in the same run.

Corpus: WikiText-2's training text repeated ``--repeat`` times (20: about 60M tokens with the
8k vocabulary trained here). Rows:

  (a) a plain single-process loop of ``sp.encode(line)`` over the lines (the baseline);
  (b) SentencePiece's own batched encode with 2 threads over 1 MB chunks: the practical ceiling
      on a 2-core machine, since it does nothing but encode;
  encode num_proc=N: the full command (reading, encoding, writing, checksumming, verifying
      shards, manifest), run as a subprocess; its peak resident memory is reported too, and
      for the x1 corpus as well, to show that memory does not grow with the corpus.

    flock /tmp/bench.lock .venv/bin/python benchmarks/data_prep.py [--repeat 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "wikitext-2" / "train.txt"


def make_corpus(directory: Path, repeat: int) -> Path:
    text = DATA.read_bytes()
    path = directory / f"wikitext2-train-x{repeat}.txt"
    with open(path, "wb") as handle:
        for _ in range(repeat):
            handle.write(text)
    return path


def train_tokenizer(directory: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    prefix = directory / f"wt2-{vocab_size}"
    spm.SentencePieceTrainer.train(input=str(DATA), model_prefix=str(prefix),
                                   vocab_size=vocab_size, num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


def nonblank_lines(path: Path, chunk_bytes: int = 1 << 20):
    """The documents ``encode --doc-per line`` sees: non-blank lines, read as a stream."""
    with open(path, encoding="utf-8") as handle:
        while chunk := handle.readlines(chunk_bytes):
            yield [line.rstrip("\n") for line in chunk if line.strip()]


def plain_loop(model: Path, corpus: Path) -> tuple[int, float, float]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for lines in nonblank_lines(corpus):
        for line in lines:
            tokens += len(sp.encode(line)) + 1  # + the end-of-sentence token encode appends
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def batched(model: Path, corpus: Path, threads: int) -> tuple[int, float, float]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for lines in nonblank_lines(corpus):
        tokens += sum(map(len, sp.encode(lines, num_threads=threads))) + len(lines)
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def run_encode(model: Path, corpus: Path, out: Path, num_proc: int
               ) -> tuple[int, float, float, int]:
    """Tokens, wall time, CPU time (with the workers) and peak RSS (KiB) of the command.

    With the default thread engine the command is one process, so its peak is the whole peak.
    """
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "data_prep", "encode", "-i", str(corpus), "-t", str(model),
               "-o", str(out), "--eos", "line", "--shard-size", "64M", "--num-proc",
               str(num_proc), "--no-progress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"encode failed: {process.stderr.read().decode()}")
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    cpu = usage.ru_utime + usage.ru_stime
    # The command reports its own peak (VmHWM); ru_maxrss would include this process's memory,
    # which a child inherits over fork and exec.
    peak = re.search(r"peak memory (\d+) MiB", process.stdout.read().decode())
    return manifest["splits"]["train"]["tokens"], seconds, cpu, int(peak.group(1)) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--quick", action="store_true", help="repeat 2, for a smoke run")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    repeat = 2 if args.quick else args.repeat
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = train_tokenizer(work, args.vocab_size)
    small, large = make_corpus(work, 1), make_corpus(work, repeat)
    print(f"corpus: {large} ({large.stat().st_size / 2**20:.0f} MiB), tokenizer {model.name}, "
          f"{os.cpu_count()} CPUs")
    rows = []
    tokens, seconds, cpu = plain_loop(model, large)
    baseline = tokens / seconds
    rows.append(("(a) plain sp.encode loop, 1 process", tokens, seconds, cpu, None))
    tokens, seconds, cpu = batched(model, large, 2)
    ceiling = tokens / seconds
    rows.append(("(b) sp batched encode, 2 threads", tokens, seconds, cpu, None))
    for num_proc in (1, 2):
        rows.append((f"encode --num-proc {num_proc} (end to end)",
                     *run_encode(model, large, work / f"out-{num_proc}", num_proc)))
    small_rss = run_encode(model, small, work / "out-x1", 2)[3]
    load = os.getloadavg()[0]
    print(f"\nload average (1 min) after the runs: {load:.1f}\n")
    print("| run | tokens | seconds | M tokens/s | vs (a) | vs (b) | CPU s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tokens, seconds, cpu, rss in rows:
        rate = tokens / seconds
        print(f"| {name} | {tokens:,} | {seconds:.2f} | {rate / 1e6:.2f} | {rate / baseline:.2f}x "
              f"| {rate / ceiling:.2f}x | {cpu:.1f} | {rss / 1024:.0f} |" if rss else
              f"| {name} | {tokens:,} | {seconds:.2f} | {rate / 1e6:.2f} | {rate / baseline:.2f}x "
              f"| {rate / ceiling:.2f}x | {cpu:.1f} | |")
    print(f"\npeak RSS of encode --num-proc 2: x1 corpus "
          f"{small_rss / 1024:.0f} MiB, x{repeat} corpus {rows[-1][4] / 1024:.0f} MiB")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
