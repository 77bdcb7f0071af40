"""Plots and tables from run directories (``sparse-moe-report``).

    sparse-moe-report runs/moe runs/dense --out runs/report

writes ``learning_curves.png`` (training cross-entropy of every run, validation perplexity
points), ``expert_load_<run>_moe<i>.png`` (each expert's share of the tokens over training,
as a heatmap) and, for language-model runs with a checkpoint, ``specialisation_<run>.md``
(which experts the most frequent tokens go to, the counterpart of the paper's Table 9) and,
given ``--routing-text`` and ``--routing-labels``, ``routing_<run>.md`` and ``.png``: which
experts each group of lines goes to (``report_routing.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


class ReportError(ValueError):
    """A run directory or one of its files that a report cannot be made from."""


def read_csv_metric(run_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one metric written by DeepSpeed's CSV monitor (last value per step).

    The trainer keeps one header and each step once (``train/tracking.py``); files written by
    older runs may hold a header per process start, which are skipped.
    """
    path = run_dir / "metrics" / f"{name}.csv"
    if not path.exists():
        return np.array([]), np.array([])
    values: dict[int, float] = {}
    for number, row in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not row or row.startswith("step,"):
            continue
        try:
            step, value = row.split(",")
            values[int(step)] = float(value)
        except ValueError:
            raise ReportError(f"{path}:{number}: expected 'step,value' (an integer and a "
                              f"number), found {row[:80]!r}") from None
    steps = np.array(sorted(values))
    return steps, np.array([values[s] for s in steps])


def plot_learning_curves(run_dirs: list[Path], out: Path) -> Path:
    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        steps, ce = read_csv_metric(run_dir, "train_cross_entropy")
        if len(steps):
            train_ax.plot(steps, ce, label=run_dir.name)
        steps, ppl = read_csv_metric(run_dir, "valid_perplexity")
        if len(steps):
            valid_ax.plot(steps, ppl, marker="o", label=run_dir.name)
    train_ax.set(xlabel="step", ylabel="training cross-entropy (nats/token)", title="training")
    valid_ax.set(xlabel="step", ylabel="perplexity", title="validation", yscale="log")
    for ax in (train_ax, valid_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_expert_load(run_dir: Path) -> tuple[list[int], list[np.ndarray]]:
    """Steps and, per MoE layer, a [steps, experts] array of token counts."""
    path = run_dir / "expert_load.jsonl"
    if not path.exists():
        return [], []
    by_step: dict[int, list[list[float]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                by_step[int(record["step"])] = record["layers"]
            except (ValueError, KeyError, TypeError):
                raise ReportError(f"{path}:{number}: expected a JSON object with 'step' and "
                                  f"'layers', found {line[:80]!r}") from None
    steps = sorted(by_step)
    if not steps:
        return [], []
    layers = [np.array([by_step[s][i] for s in steps]) for i in range(len(by_step[steps[0]]))]
    return steps, layers


def plot_expert_load(run_dir: Path, out: Path) -> list[Path]:
    steps, layers = read_expert_load(run_dir)
    paths = []
    for i, counts in enumerate(layers):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(8, 4))
        image = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0], steps[-1], -0.5, counts.shape[1] - 0.5))
        fig.colorbar(image, ax=ax, label="share of assignments")
        cv = counts.std(axis=1) / np.maximum(counts.mean(axis=1), 1e-9)
        ax.set(xlabel="step", ylabel="expert",
               title=f"{run_dir.name}: MoE layer {i} load (final CV {cv[-1]:.2f})")
        fig.tight_layout()
        path = out / f"expert_load_{run_dir.name}_moe{i}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def make_report(run_dirs: list[Path], out: Path, routing_text: Path | None = None,
                routing_labels: Path | None = None) -> list[Path]:
    missing = [str(d) for d in run_dirs if not (d / "metrics").is_dir()]
    if missing:
        raise ReportError(f"{', '.join(missing)}: expected run directories written by "
                          "sparse-moe-train (with a metrics/ folder), found none there")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: expected a directory for the report, found a file")
    for flag, path in (("--routing-text", routing_text), ("--routing-labels", routing_labels)):
        if path is not None and not path.is_file():
            raise ReportError(f"{flag} {path}: expected a text file, found nothing there")
    if routing_text is not None and routing_labels is not None:
        from sparse_moe.report_routing import RoutingInputError, read_labelled_lines

        try:
            read_labelled_lines(routing_text, routing_labels)
        except RoutingInputError as err:
            raise ReportError(str(err)) from None
    for run_dir in run_dirs:  # read everything first: a bad file must not leave a half report
        for name in ("train_cross_entropy", "valid_perplexity"):
            read_csv_metric(run_dir, name)
        read_expert_load(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_learning_curves(run_dirs, out)]
    for run_dir in run_dirs:
        paths.extend(plot_expert_load(run_dir, out))
        if (run_dir / "checkpoints" / "latest").is_file():
            paths.extend(routing_report(run_dir, out, routing_text, routing_labels))
    return paths


def routing_report(run_dir: Path, out: Path, text: Path | None, labels: Path | None
                   ) -> list[Path]:
    from sparse_moe.report_routing import RoutingInputError, write_routing_report

    try:
        return write_routing_report(run_dir, out, text, labels)
    except RoutingInputError as err:
        raise ReportError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-moe-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <first run>/report)")
    parser.add_argument("--routing-text", type=Path, default=None,
                        help="lines to route through each run's first MoE layer")
    parser.add_argument("--routing-labels", type=Path, default=None,
                        help="one group label per line of --routing-text")
    args = parser.parse_args(argv)
    if (args.routing_text is None) != (args.routing_labels is None):
        parser.error("--routing-text and --routing-labels go together")
    try:
        paths = make_report(args.runs, args.out or args.runs[0] / "report", args.routing_text,
                            args.routing_labels)
    except ReportError as err:
        print(f"sparse-moe-report: {err}", file=sys.stderr)
        return 2
    finally:
        from sparse_moe.train.distributed import shut_down_distributed

        shut_down_distributed()  # the routing tables loaded checkpoints into an engine
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
