"""Training throughput of the MoE-LSTM against compute-matched dense models, in one run.

Every contender is a real ``sparse-moe-train`` run (DeepSpeed engine, the paper's factored
Adam, one process) on the same WikiText-2 shards with the same batches, in its own process;
peak memory is that process's own high-water mark (VmHWM, from its summary.json).
Throughput is the median of the logged tokens/s after the first log window (start-up and
allocator warm-up excluded).

    python benchmarks/train_lm.py                        # paper-size presets (d=512)
    python benchmarks/train_lm.py --quick                # debug presets, seconds
    python benchmarks/train_lm.py --moe moe-256 --dense moe-1-wide 4xlstm-512

Contenders: the MoE preset, the same MoE with activation checkpointing, and each dense
preset (MoE-1-Wide does the same multiply-adds per time step as MoE-k with k experts of
the same size; 4xLSTM-512 is the paper's ops-matched LSTM stack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from wikitext import build_corpus  # noqa: E402  (benchmarks/wikitext.py)


def contender_overrides(preset: str, args, corpus: Path, tokenizer: Path, run_dir: Path,
                        checkpointing: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``sparse-moe-train`` overrides of one contender (also what the planner reads)."""
    return [f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"run.dir={run_dir}",
            f"run.steps={args.steps}", f"run.log_every={args.log_every}", "run.progress=false",
            "run.keep_last=1", "data.eval_splits=[]", f"data.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}", f"model.preset={preset}",
            f"model.activation_checkpointing={str(checkpointing).lower()}",
            "optimizer.name=factored_adam", "optimizer.lr=1e-3", "schedule.warmup_steps=10",
            "tracking.wandb=false", *extra]


def run_contender(name: str, preset: str, args, corpus: Path, tokenizer: Path, work: Path,
                  checkpointing: bool = False, extra: tuple[str, ...] = ()) -> dict:
    run_dir = work / name
    command = [sys.executable, "-m", "sparse_moe.train",
               *contender_overrides(preset, args, corpus, tokenizer, run_dir, checkpointing, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    started = time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"status {proc.returncode}"}
    rows = (run_dir / "metrics" / "train_tokens_per_second.csv").read_text().splitlines()
    rates = [float(r.split(",")[1]) for r in rows if r and not r.startswith("step,")]
    steady = rates[1:] or rates
    summary = json.loads((run_dir / "summary.json").read_text())  # the trainer's own VmHWM
    return {"tokens_per_second": statistics.median(steady),
            "peak_rss_mib": summary["peak_host_memory_mib"], "wall_seconds": time.time() - started,
            "peak_device_mib": summary.get("peak_device_memory_mib"),
            "peak_device_reserved_mib": summary.get("peak_device_reserved_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--moe", default="moe-32")
    parser.add_argument("--dense", nargs="+", default=["moe-1-wide", "4xlstm-512"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--train-bytes", type=int, default=3_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.moe, args.dense, args.vocab_size = "debug-moe", ["debug-dense", "debug-4xlstm"], 1000
        args.steps, args.log_every, args.train_bytes = 30, 10, 1_000_000
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        work = Path(tmp)
        corpus, tokenizer = build_corpus(work, args.vocab_size, args.train_bytes)
        contenders = [(args.moe, args.moe, False), (f"{args.moe} +ckpt", args.moe, True)]
        contenders += [(d, d, False) for d in args.dense]
        results = []
        for name, preset, ckpt in contenders:
            result = run_contender(name.replace(" +", "_"), preset, args, corpus, tokenizer, work,
                                   ckpt)
            print(f"  measured {name}: {result}", file=sys.stderr, flush=True)
            results.append((name, preset, ckpt, result))
    print_table(args, results)
    if args.json:
        args.json.write_text(json.dumps([{"name": n, **r} for n, _, _, r in results], indent=1))


def print_table(args, results) -> None:
    from sparse_moe.models import preset_budget

    print(f"\nTraining throughput: batch {args.batch} x {args.seq_len} tokens, vocabulary "
          f"{args.vocab_size}, {args.steps} steps, one process, threads={os.cpu_count()}\n")
    print("| model | ops/timestep (M) | params excl. emb/softmax (M) | activation ckpt | "
          f"tokens/s | vs {args.moe} | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    base = results[0][3].get("tokens_per_second")
    for name, preset, ckpt, r in results:
        budget = preset_budget(preset)
        ops = f"{budget.ops_per_timestep / 1e6:.2f}"
        params = f"{budget.params / 1e6:.1f}"
        if "error" in r:
            print(f"| {name} | {ops} | {params} | {ckpt} | error: {r['error']} | | |")
            continue
        ratio = r["tokens_per_second"] / base if base else float("nan")
        print(f"| {name} | {ops} | {params} | {'on' if ckpt else 'off'} | "
              f"{r['tokens_per_second']:.0f} | {ratio:.2f}x | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
