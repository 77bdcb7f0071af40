"""The scaling sweep's tables and plots, from its run directories (used by sweep.py).

Every figure comes from a run's own files: ``summary.json`` (test and validation perplexity
over the whole split), ``config.yaml`` (the model), the CSV monitor's tokens/s, and
``expert_load.jsonl`` (tokens per expert at every logged step).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from sparse_moe.models import lm_preset, preset_budget  # noqa: E402
from sparse_moe.report import read_csv_metric  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WIKITEXT = ROOT / ".." / "shared" / "data" / "wikitext-2"

LOAD_WINDOW = 0.25  # CV(load) and max/mean over the last quarter of the logged steps

# Test perplexity of the paper's counterparts (1B-word benchmark, 10 epochs, ~8.4M ops/step;
# Table 7), and its MoE-256 balancing ablation (Table 6): (perplexity, CV(load), max/mean).
PAPER_PERPLEXITY = {"4xlstm-128": ("4xLSTM-512", 46.0), "4xlstm-32": ("4xLSTM-512", 46.0),
                    "lstm-512-128": ("LSTM-2048-512", 44.7), "moe-4": ("MoE-4", 45.0),
                    "moe-256": ("MoE-256", 35.7), "moe-256-h": ("MoE-256-h", 36.0)}
PAPER_TABLE_7 = ("4xLSTM-512 46.0, LSTM-2048-512 44.7, MoE-4 45.0, MoE-32 39.7, MoE-256 35.7, "
                 "MoE-256-h 36.0, MoE-1024-h 34.6, MoE-4096-h 34.1")
PAPER_ABLATION = {(0.0, 0.0): (39.8, 3.01, 17.8), (0.1, 0.1): (35.6, 0.05, 1.14)}


def markers(section: str) -> tuple[str, str]:
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


def is_dense(run: "Run") -> bool:
    return _experts(run) == "-"


@dataclass
class Run:
    name: str
    preset: str
    moe_overrides: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    ops_m: float = math.nan
    params_m: float = math.nan
    tokens_per_second: float = math.nan
    cv_load: float = math.nan
    max_over_mean: float = math.nan
    load_history: np.ndarray | None = None  # [logged steps, experts] share of assignments

    @property
    def weights(self) -> tuple[float, float]:
        return (float(self.moe_overrides.get("w_importance", 0.1)),
                float(self.moe_overrides.get("w_load", 0.1)))

    def metric(self, key: str) -> float:
        return float(self.summary.get(key, math.nan))


def load_run(name: str, run_dir: Path) -> Run | None:
    if not (run_dir / "summary.json").exists():
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    overrides = config["model"].get("overrides") or {}
    run = Run(name, config["model"]["preset"], dict(overrides.get("moe_overrides") or {}),
              json.loads((run_dir / "summary.json").read_text()))
    corpus = json.loads((Path(config["data"]["corpus"]) / "manifest.json").read_text())
    budget = preset_budget(run.preset, corpus["tokenizer"]["vocab_size"])
    run.ops_m, run.params_m = budget.ops_per_timestep / 1e6, budget.params / 1e6
    _, rates = read_csv_metric(run_dir, "train_tokens_per_second")
    run.tokens_per_second = statistics.median(rates[1:]) if len(rates) > 1 else math.nan
    _read_expert_load(run, run_dir / "expert_load.jsonl")
    return run


def _read_expert_load(run: Run, path: Path) -> None:
    """The first MoE layer's per-step counts: CV and max/mean late in training, and shares."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts = np.array([row["layers"][0] for row in rows if row["layers"]], dtype=np.float64)
    if not len(counts):
        return
    late = counts[int(len(counts) * (1 - LOAD_WINDOW)):]
    means = late.mean(axis=1)
    run.cv_load = float(np.mean(late.std(axis=1) / means))
    run.max_over_mean = float(np.mean(late.max(axis=1) / means))
    run.load_history = counts / counts.sum(axis=1, keepdims=True)


def split_words(split: str) -> int:
    """Words plus one end of line per non-blank line (the end-of-sentence tokens the model
    predicts), as the trainer's ``perplexity_per_word`` counts them."""
    text = (WIKITEXT / f"{split}.txt").read_text(encoding="utf-8")
    return len(text.split()) + sum(1 for line in text.splitlines() if line.strip())


def per_word_perplexity(run: Run, split: str, split_tokens: int) -> float:
    """exp(total NLL / words): the subword model's likelihood of the whole text, per word."""
    cross_entropy = run.metric(f"{split}/cross_entropy")
    return math.exp(cross_entropy * split_tokens / split_words(split))


def write_report(configurations: list[tuple[str, list[str]]], runs_dir: Path, report: Path,
                 command: str, section: str = "results") -> None:
    runs = {name: load_run(name, runs_dir / name) for name, _ in configurations}
    missing = [name for name, run in runs.items() if run is None]
    done = {name: run for name, run in runs.items() if run is not None}
    if not done:
        raise SystemExit(f"no finished run in {runs_dir}")
    figures = report.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plots = [plot_perplexity_vs_parameters(done, figures, section),
             plot_ablation_loads(done, figures, section)]
    tables = render_tables(done, runs_dir, missing, command, [p for p in plots if p], report)
    begin, end = markers(section)
    text = report.read_text() if report.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{report}: expected the markers {begin} and {end}")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(f"{head}{begin}\n{tables}\n{end}{tail}")
    tmp.replace(report)
    print(tables)


def render_tables(runs: dict[str, Run], runs_dir: Path, missing: list[str], command: str,
                  plots: list[Path], report: Path) -> str:
    first = next(iter(runs.values()))
    config = yaml.safe_load((runs_dir / first.name / "config.yaml").read_text())
    manifest = json.loads((Path(config["data"]["corpus"]) / "manifest.json").read_text())
    splits = manifest["splits"]
    tokens = {s: _split_tokens(splits[s]) for s in ("train", "valid", "test")}
    data, run_cfg = config["data"], config["run"]
    seen = run_cfg["steps"] * data["micro_batch_size"] * data["seq_len"]
    invocation = " ".join(["python benchmarks/scaling/sweep.py", command]).strip()
    lines = [f"Generated by `{invocation}` (this section and the plots; the text around it "
             "is written by hand).",
             "",
             f"Data: WikiText-2, SentencePiece vocabulary {manifest['tokenizer']['vocab_size']}; train "
             f"{tokens['train']:,} tokens, valid {tokens['valid']:,}, test {tokens['test']:,}. "
             f"Every run: {run_cfg['steps']} steps of {data['micro_batch_size']} x "
             f"{data['seq_len']} tokens = {seen:,} training tokens "
             f"({seen / tokens['train']:.2f} epochs), the same batches in the same order; "
             f"{config['optimizer']['name']} at lr {config['optimizer']['lr']}, "
             f"warm-up {config['schedule']['warmup_steps']}, hold "
             f"{config['schedule']['hold_steps']}, then 1/sqrt(step). Perplexities are over "
             "the whole valid and test splits; per word: exp(total cross-entropy / (words + "
             "ends of non-blank lines)). CV(load) and max/mean load: the first "
             "MoE layer's tokens per expert in training batches, averaged over the last quarter "
             "of the logged steps. Tokens/s were logged while the sweep ran several runs at once "
             "on a shared machine: indicative only.", ""]
    if missing:
        lines += [f"Not finished (no summary.json): {', '.join(missing)}.", ""]
    lines += ["### Compute-matched models", "",
              "| model | experts | ops/timestep (M) | params excl. emb/softmax (M) | valid ppl | "
              "test ppl | test ppl per word | vs best dense | CV(load) | max/mean load | "
              "tokens/s in the sweep | paper, same model at full size (test ppl) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best_dense = min((r.metric("test/perplexity") for r in runs.values() if is_dense(r)),
                     default=math.nan)
    for name, run in runs.items():
        if run.moe_overrides:
            continue
        paper = PAPER_PERPLEXITY.get(name, ("-", None))
        lines.append(
            f"| {name} | {_experts(run)} | {run.ops_m:.3f} | {run.params_m:.2f} | "
            f"{run.metric('valid/perplexity'):.2f} | {run.metric('test/perplexity'):.2f} | "
            f"{per_word_perplexity(run, 'test', tokens['test']):.1f} | "
            f"{run.metric('test/perplexity') / best_dense - 1:+.1%} | {_fmt(run.cv_load)} | "
            f"{_fmt(run.max_over_mean)} | {run.tokens_per_second:.0f} | "
            f"{paper[0]}{f' ({paper[1]})' if paper[1] else ''} |")
    lines += ["", f"The paper's Table 7 (1B words, 10 epochs, ~8.4M ops/step): {PAPER_TABLE_7}."]
    ablation = sorted((r for r in runs.values() if r.preset.endswith("-moe-64")),
                      key=lambda r: r.weights)
    if len(ablation) < 2:
        lines.append("")
        lines += [f"![{p.stem}]({p.relative_to(report.parent)})" for p in plots]
        return "\n".join(lines)
    lines += ["", "### Balancing ablation (MoE-64)", "",
              "| w_importance | w_load | test ppl | CV(load) | max/mean load | "
              "paper, MoE-256 (ppl, CV, max/mean) |", "|---|---|---|---|---|---|"]
    for run in ablation:
        paper = PAPER_ABLATION.get(run.weights)
        paper_text = f"{paper[0]}, {paper[1]}, {paper[2]}" if paper else "-"
        lines.append(f"| {run.weights[0]} | {run.weights[1]} | "
                     f"{run.metric('test/perplexity'):.2f} | {_fmt(run.cv_load)} | "
                     f"{_fmt(run.max_over_mean)} | {paper_text} |")
    lines.append("")
    lines += [f"![{p.stem}]({p.relative_to(report.parent)})" for p in plots]
    return "\n".join(lines)


def _split_tokens(split: dict) -> int:
    return int(split["tokens"])


def _experts(run: Run) -> str:
    moe = next((layer["moe"] for layer in lm_preset(run.preset).to_dict()["layers"]
                if layer["kind"] == "moe"), None)
    if moe is None:
        return "-"
    groups = moe.get("num_groups", 0)
    return f"{moe['num_experts']} ({groups}x{moe['num_experts'] // groups})" if groups else \
        str(moe["num_experts"])


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def plot_perplexity_vs_parameters(runs: dict[str, Run], out: Path, section: str) -> Path | None:
    """Test perplexity against parameters at fixed ops per time step (the paper's Figure 2)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    flat = [r for r in runs.values() if not is_dense(r) and not r.preset.endswith("-h")
            and not r.moe_overrides]
    hier = [r for r in runs.values() if r.preset.endswith("-h")]
    ops = statistics.median(r.ops_m for r in runs.values())
    for group, style, label in ((flat, "o-", "flat MoE (k=4)"),
                                (hier, "s--", "hierarchical MoE (2x2)")):
        group = sorted(group, key=lambda r: r.params_m)
        if group:
            ax.plot([r.params_m for r in group], [r.metric("test/perplexity") for r in group],
                    style, label=label)
            for r in group:
                ax.annotate(r.name, (r.params_m, r.metric("test/perplexity")), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    for r in runs.values():
        if is_dense(r):
            ax.plot([r.params_m], [r.metric("test/perplexity")], "^", label=r.name)
    ax.set(xscale="log", xlabel="parameters excluding embedding and softmax (M)",
           ylabel="test perplexity (per token)",
           title=f"WikiText-2 at ~{ops:.2g}M ops per time step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{section}_perplexity_vs_parameters.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ablation_loads(runs: dict[str, Run], out: Path, section: str) -> Path | None:
    """Each expert's share of the assignments over training, per balancing setting."""
    ablation = sorted((r for r in runs.values()
                       if r.preset.endswith("-moe-64") and r.load_history is not None),
                      key=lambda r: r.weights)
    if len(ablation) < 2:
        return None
    fig, axes = plt.subplots(1, len(ablation), figsize=(3.2 * len(ablation), 3.6),
                             squeeze=False)
    vmax = max(float(r.load_history.max()) for r in ablation)
    for ax, run in zip(axes[0], ablation):
        image = ax.imshow(run.load_history.T, aspect="auto", origin="lower", cmap="viridis",
                          vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=f"w_imp={run.weights[0]}, w_load={run.weights[1]}\nCV {run.cv_load:.2f}",
               xlabel="logged step", ylabel="expert")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of assignments")
    path = out / f"{section}_ablation_expert_load.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit("run benchmarks/scaling/sweep.py --report-only")
