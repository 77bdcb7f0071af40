"""``python -m sparse_moe.demo`` (``make demo``): the whole pipeline on a fresh machine.

1. writes a seeded synthetic multi-domain corpus (no download),
2. trains a SentencePiece tokenizer and encodes the splits into checksummed shards,
3. trains the MoE-LSTM (demo-moe: d=64, 16 experts, k=2) on 2 CPU processes with expert
   parallelism 2, then the dense model with the same multiply-adds per time step
   (demo-dense), on the same tokens with the same schedule,
4. evaluates both and writes the plots, and prints the perplexities side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from sparse_moe.demo.synthetic import (
    SyntheticCorpusConfig,
    domain_labels,
    write_synthetic_corpus,
)

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_data(out: Path, vocab_size: int) -> tuple[Path, Path]:
    from data_prep.cli import main as data_prep

    texts = write_synthetic_corpus(out / "text", SyntheticCorpusConfig())
    prefix = out / "tokenizer" / f"sp{vocab_size}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    if data_prep(["tokenizer", "-i", str(texts["train"]), "--model-prefix", str(prefix),
                  "--vocab-size", str(vocab_size), "--num-threads", "2"]) != 0:
        raise SystemExit("demo: tokenizer training failed")
    for split, path in texts.items():
        if data_prep(["encode", "-i", str(path), "-t", f"{prefix}.model", "-o", str(corpus),
                      "--split", split, "--overwrite", "--no-progress"]) != 0:
            raise SystemExit(f"demo: encoding {split} failed")
    return corpus, Path(f"{prefix}.model")


def train(name: str, preset: str, ep_size: int, corpus: Path, tokenizer: Path, out: Path,
          nproc: int, extra: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own directory: start clean
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "sparse_moe.train",
               "--config", str(REPO / "configs" / "demo.yaml"), f"data.corpus={corpus}",
               f"data.tokenizer={tokenizer}", f"run.dir={run_dir}", f"model.preset={preset}",
               f"parallel.ep_size={ep_size}", f"tracking.name=demo-{name}", "tracking.group=demo",
               f"tracking.tags=[demo, {preset}]", "tracking.tensorboard=true", *extra]
    print(f"\n== training {name} ({preset}, {nproc} processes, ep_size={ep_size})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    subprocess.run(command, check=True, env=env, cwd=REPO)
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-moe-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. run.steps=100")
    args = parser.parse_args(argv)
    started = time.time()
    print(f"== synthetic multi-domain corpus, tokenizer and shards in {args.out}", flush=True)
    corpus, tokenizer = prepare_data(args.out, args.vocab_size)
    moe = train("moe", "demo-moe", args.nproc, corpus, tokenizer, args.out, args.nproc,
                args.overrides)
    dense = train("dense", "demo-dense", 1, corpus, tokenizer, args.out, args.nproc,
                  args.overrides)
    from sparse_moe.report import make_report

    valid = args.out / "text" / "valid.txt"
    plots = make_report([args.out / "moe", args.out / "dense"], args.out / "report",
                        routing_text=valid, routing_labels=domain_labels(valid))
    print_comparison(moe, dense, plots, time.time() - started)
    print("dashboards (docs/training.md, \"Tracking\"):")
    print(f"  wandb sync {args.out}/moe/wandb/offline-run-* {args.out}/dense/wandb/offline-run-*")
    print(f"  tensorboard --logdir {args.out}")
    routing = args.out / "report" / "routing_moe.md"
    if routing.is_file():
        print("\nwhere each domain's tokens go (first MoE layer, validation split):\n")
        print(routing.read_text(encoding="utf-8").split("\n\n", 2)[-1])
    return 0


def print_comparison(moe: dict, dense: dict, plots: list[Path], seconds: float) -> None:
    print("\n| model | experts | valid perplexity | test perplexity |")
    print("|---|---|---|---|")
    for name, experts, summary in (("MoE-LSTM (demo-moe)", "16, k=2", moe),
                                   ("dense, same ops (demo-dense)", "-", dense)):
        print(f"| {name} | {experts} | {summary.get('valid/perplexity', float('nan')):.2f} | "
              f"{summary.get('test/perplexity', float('nan')):.2f} |")
    ratio = moe.get("test/perplexity", float("nan")) / dense.get("test/perplexity", float("nan"))
    print(f"\nMoE / dense test perplexity: {ratio:.3f}   (total {seconds / 60:.1f} min)")
    print("plots and tables:")
    for path in plots:
        print(f"  {path}")


if __name__ == "__main__":
    sys.exit(main())
