"""Long-run load: memory and throughput of a training run over thousands of steps.

A real ``sparse-moe-train`` run (torchrun, two gloo ranks, expert parallelism, periodic
checkpoints with pruning) on WikiText-2 shards. While it runs, this script samples every
rank's resident memory (VmRSS) and the last logged step once a second; the trainer logs
tokens/s per log window. The run is cut into equal step windows and each is compared with the
first: a leak shows as RSS growing window after window, a slowdown (growing logs, pruning,
allocator fragmentation) as a falling tokens/s ratio.

    flock /tmp/bench.lock python benchmarks/long_run.py                  # 3000 steps
    flock /tmp/bench.lock python benchmarks/long_run.py --steps 300 --windows 3   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from wikitext import build_corpus  # noqa: E402  (benchmarks/wikitext.py)


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers (from their RANK variable)."""
    ranks = {}
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in map(int, children):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = pid
    except (FileNotFoundError, ProcessLookupError):
        pass
    return ranks


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def last_step(csv: Path) -> int:
    try:
        rows = csv.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for row in reversed(rows):
        head = row.split(",")[0]
        if head.isdigit():
            return int(head)
    return 0


class Sampler(threading.Thread):
    """Once a second: (last logged step, RSS of each worker in MiB)."""

    def __init__(self, launcher: int, run_dir: Path, nproc: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.launcher, self.nproc, self.interval = launcher, nproc, interval
        self.loss_csv = run_dir / "metrics" / "train_loss.csv"
        self.samples: list[tuple[int, list[float]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            pids = worker_pids(self.launcher)
            rss = [rss_mib(pids[r]) for r in sorted(pids)]
            if len(rss) == self.nproc and None not in rss:  # every rank, none exiting
                self.samples.append((last_step(self.loss_csv), rss))


def read_rates(run_dir: Path) -> dict[int, float]:
    rows = (run_dir / "metrics" / "train_tokens_per_second.csv").read_text().splitlines()
    return {int(s): float(v) for s, v in (r.split(",") for r in rows if r and r[0].isdigit())}


def windows(args, rates: dict[int, float], samples: list[tuple[int, list[float]]]) -> list[dict]:
    size = args.steps // args.windows
    out = []
    for w in range(args.windows):
        lo, hi = w * size + 1, (w + 1) * size
        window_rates = [r for s, r in rates.items() if lo <= s <= hi]
        window_rss = [rss for s, rss in samples if lo <= s <= hi]
        out.append({"steps": f"{lo}-{hi}",
                    "tokens_per_second": statistics.median(window_rates) if window_rates else None,
                    "rss": [max(r[i] for r in window_rss) for i in range(len(window_rss[0]))]
                    if window_rss else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="debug-moe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--train-bytes", type=int, default=2_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="long_run_") as tmp:
        work = Path(tmp)
        corpus, tokenizer = build_corpus(work, args.vocab_size, args.train_bytes)
        run_dir = work / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(args.nproc), "-m", "sparse_moe.train", f"data.corpus={corpus}",
                   f"data.tokenizer={tokenizer}", f"run.dir={run_dir}", f"run.steps={args.steps}",
                   f"run.log_every={args.log_every}", f"run.save_every={args.save_every}",
                   "run.keep_last=2", "run.progress=false", "data.eval_splits=[]",
                   f"data.micro_batch_size={args.batch}", f"data.seq_len={args.seq_len}",
                   f"model.preset={args.preset}", f"parallel.ep_size={args.nproc}",
                   "optimizer.name=factored_adam", "optimizer.lr=1e-3",
                   "schedule.warmup_steps=100", "tracking.wandb=false"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        load_before = os.getloadavg()[0]
        started = time.time()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        sampler = Sampler(proc.pid, run_dir, args.nproc)
        sampler.start()
        _, stderr = proc.communicate()
        sampler.stopped.set()
        if proc.returncode != 0:
            sys.exit(f"training failed ({proc.returncode}):\n{stderr[-3000:]}")
        wall = time.time() - started
        load = (load_before, os.getloadavg()[0])
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        rows = windows(args, read_rates(run_dir), sampler.samples)
    print_table(args, rows, wall, checkpoints, load)


def print_table(args, rows: list[dict], wall: float, checkpoints: list[str],
                load: tuple[float, float]) -> None:
    print(f"\nLong run: {args.preset}, {args.nproc} ranks (gloo, ep_size={args.nproc}), batch "
          f"{args.batch} x {args.seq_len} per rank, {args.steps} steps, checkpoint every "
          f"{args.save_every} (keep 2; left: {', '.join(checkpoints)}), {wall:.0f} s wall, "
          f"{os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} at the start and "
          f"{load[1]:.1f} at the end\n")
    ranks = len(rows[0]["rss"] or [])
    rss_heads = " | ".join(f"RSS rank {r} (MiB)" for r in range(ranks))
    print(f"| steps | tokens/s (median) | vs first | {rss_heads} | RSS vs first |")
    print("|---|---|---|" + "---|" * ranks + "---|")
    first = rows[0]
    for row in rows:
        rate = row["tokens_per_second"]
        ratio = rate / first["tokens_per_second"] if rate and first["tokens_per_second"] else None
        rss = row["rss"] or []
        rss_ratio = (max(rss) / max(first["rss"])) if rss and first["rss"] else None
        cells = " | ".join(f"{v:.0f}" for v in rss)
        print(f"| {row['steps']} | {rate or float('nan'):.0f} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {cells} | "
              f"{'' if rss_ratio is None else f'{rss_ratio:.3f}x'} |")


if __name__ == "__main__":
    main()
