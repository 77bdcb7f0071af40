"""The paper's central result at small scale: more experts at a fixed compute per time step.

One command prepares WikiText-2 (a SentencePiece vocabulary and checksummed shards), trains
every configuration of ``sweep.txt`` on top of ``base.yaml`` (each a real ``sparse-moe-train``
run, resumed if it was interrupted, skipped if it finished), and writes the report's tables
and plots into ``docs/results.md`` (between its ``results:begin``/``results:end`` markers) and
``docs/results/``:

    python benchmarks/scaling/sweep.py                      # everything, 2 runs at a time
    python benchmarks/scaling/sweep.py --only moe-4 moe-16  # some configurations
    python benchmarks/scaling/sweep.py --prepare-only       # the corpus, for a Slurm array
    python benchmarks/scaling/sweep.py --report-only --runs runs/moe-sweep-1234
    python benchmarks/scaling/sweep.py --sweep benchmarks/scaling/sweep_tiny.txt \\
      --base benchmarks/scaling/base_tiny.yaml --vocab-size 1000 --work runs/scaling-tiny \\
      --section capacity-limited            # the second, capacity-limited sweep

The same configurations run as a Slurm job array (one run per task) with

    python benchmarks/scaling/sweep.py --prepare-only --work runs/scaling
    SWEEP_FILE=benchmarks/scaling/sweep.txt CONFIG=benchmarks/scaling/base.yaml \\
      OVERRIDES="data.corpus=runs/scaling/corpus data.tokenizer=runs/scaling/sp8000.model" \\
      sbatch --array=0-11 slurm/sweep.sbatch

followed by ``--report-only --runs <the array's SWEEP_DIR>``.

The translation study (Multi30k English-German, BLEU; docs/results.md "Translation"):

    python benchmarks/scaling/sweep.py --task translation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WIKITEXT = ROOT / ".." / "shared" / "data" / "wikitext-2"
SPLITS = ("train", "valid", "test")


def read_sweep(path: Path) -> list[tuple[str, list[str]]]:
    """``(name, overrides)`` per configuration line (the format of slurm/sweep.sbatch)."""
    configurations = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, *overrides = line.split()
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise SystemExit(f"{path}:{number}: expected section.field=value overrides after "
                             f"the name, found {bad}")
        configurations.append((name, overrides))
    return configurations


def prepare_corpus(work: Path, vocab_size: int) -> tuple[Path, Path]:
    """The SentencePiece model and the encoded splits (each step skipped when done)."""
    work.mkdir(parents=True, exist_ok=True)
    prefix = work / f"sp{vocab_size}"
    tokenizer = Path(f"{prefix}.model")
    corpus = work / "corpus"
    if not tokenizer.exists():
        data_prep(["tokenizer", "-i", str(WIKITEXT / "train.txt"), "--model-prefix", str(prefix),
                   "--vocab-size", str(vocab_size), "--num-threads", "2"])
    manifest = corpus / "manifest.json"
    done = json.loads(manifest.read_text())["splits"] if manifest.exists() else {}
    for split in SPLITS:
        if split not in done:
            data_prep(["encode", "-i", str(WIKITEXT / f"{split}.txt"), "-t", str(tokenizer),
                       "-o", str(corpus), "--split", split, "--no-progress"])
    return corpus, tokenizer


MULTI30K = ROOT / ".." / "shared" / "data" / "multi30k"
# split -> Multi30k's file name; the test split is test_2016_flickr, the common benchmark.
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


def prepare_translation_corpus(work: Path, vocab_size: int) -> tuple[Path, Path, list[str]]:
    """Multi30k English-German: one shared SentencePiece vocabulary with a padding id, the
    three splits as a parallel corpus, and the data.references overrides (the original German
    sentences, which BLEU is scored against)."""
    import gzip

    work.mkdir(parents=True, exist_ok=True)
    texts = work / "text"
    texts.mkdir(exist_ok=True)
    for name in MULTI30K_SPLITS.values():
        for lang in ("en", "de"):
            path = texts / f"{name}.{lang}"
            if not path.exists():
                with gzip.open(MULTI30K / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                    tmp = path.with_suffix(path.suffix + ".tmp")
                    tmp.write_text(f.read(), encoding="utf-8")
                    tmp.replace(path)
    prefix = work / f"sp{vocab_size}"
    tokenizer = Path(f"{prefix}.model")
    if not tokenizer.exists():
        data_prep(["tokenizer", "-i", str(texts / "train.en"), str(texts / "train.de"),
                   "--model-prefix", str(prefix), "--vocab-size", str(vocab_size),
                   "--pad-id", "3", "--num-threads", "2"])
    corpus = work / "corpus"
    manifest = corpus / "manifest.json"
    done = json.loads(manifest.read_text()).get("parallel", {}) if manifest.exists() else {}
    for split, name in MULTI30K_SPLITS.items():
        if split not in done:
            data_prep(["encode-parallel", "--source", str(texts / f"{name}.en"), "--target",
                       str(texts / f"{name}.de"), "--src-lang", "en", "--tgt-lang", "de", "-t",
                       str(tokenizer), "-o", str(corpus), "--split", split, "--no-progress"])
    references = ", ".join(f"{split}: {texts / f'{name}.de'}"
                           for split, name in MULTI30K_SPLITS.items() if split != "train")
    return corpus, tokenizer, [f"data.references={{{references}}}"]


def data_prep(arguments: list[str]) -> None:
    # A subprocess: benchmarks/data_prep.py would shadow the data_prep package here.
    subprocess.run([sys.executable, "-m", "data_prep", *arguments], cwd=ROOT, check=True)


def train(name: str, overrides: list[str], args, corpus: Path, tokenizer: Path,
          extra: list[str] = ()) -> str:
    """One configuration's training run, resumed when an earlier attempt was interrupted."""
    run_dir = args.runs / name
    if (run_dir / "summary.json").exists():
        return f"{name}: done earlier"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sparse_moe.train", "--config", str(args.base), *overrides,
               f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"run.dir={run_dir}",
               "run.resume=true", *extra, *args.overrides]
    # One thread per run: small per-expert matrix products lose more to OpenMP threads
    # fighting over two cores than they gain (measured: 3.2 s/step against 0.44 s).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT / "src"))
    started = time.time()
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
    minutes = (time.time() - started) / 60
    if status != 0:
        return f"{name}: FAILED with status {status} after {minutes:.1f} min (see {run_dir}/train.log)"
    return f"{name}: trained in {minutes:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scaling",
                        help="tokenizer, corpus and (unless --runs) the run directories")
    parser.add_argument("--runs", type=Path, help="run directories (default: WORK/runs)")
    parser.add_argument("--sweep", type=Path, default=HERE / "sweep.txt")
    parser.add_argument("--base", type=Path, default=HERE / "base.yaml")
    parser.add_argument("--only", nargs="+", help="configuration names to train")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--section", default="results",
                        help="the report's <!-- SECTION:begin/end --> markers to write between")
    parser.add_argument("--task", choices=("lm", "translation"), default="lm",
                        help="translation: Multi30k En-De, BLEU (sweep_translation.txt, "
                             "base_translation.yaml, the report's translation section)")
    parser.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = parser.parse_args()
    if args.task == "translation":
        _translation_defaults(args, parser)
    args.runs = args.runs or args.work / "runs"
    configurations = read_sweep(args.sweep)
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in configurations})
        if unknown:
            raise SystemExit(f"--only: {unknown} not in {args.sweep}")
    if not args.report_only:
        if args.task == "translation":
            corpus, tokenizer, extra = prepare_translation_corpus(args.work, args.vocab_size)
        else:
            (corpus, tokenizer), extra = prepare_corpus(args.work, args.vocab_size), []
        if args.prepare_only:
            print(f"corpus: {corpus}\ntokenizer: {tokenizer}")
            return
        chosen = [(n, o) for n, o in configurations if not args.only or n in args.only]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for message in pool.map(lambda c: train(*c, args, corpus, tokenizer, extra), chosen):
                print(message, flush=True)
    if args.task == "translation":
        from translation_report import write_report  # benchmarks/scaling/translation_report.py
    else:
        from report import write_report  # benchmarks/scaling/report.py

    write_report(configurations, args.runs, args.report, command=" ".join(sys.argv[1:]),
                 section=args.section)


def _translation_defaults(args, parser) -> None:
    """The translation study's files, unless given."""
    for name, value in (("sweep", HERE / "sweep_translation.txt"),
                        ("base", HERE / "base_translation.yaml"),
                        ("work", ROOT / "runs" / "translation"), ("section", "translation")):
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
