"""The translation study's table and plot, from its run directories (used by sweep.py
``--task translation``).

Every figure comes from a run's own files: ``summary.json`` (BLEU and perplexity over the whole
valid and test splits, sacrebleu on detokenized output), ``config.yaml`` (the model), the CSV
monitor's tokens/s and ``expert_load.jsonl`` (tokens per expert of the first MoE layer, the
encoder's).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from report import LOAD_WINDOW, markers  # noqa: E402  (benchmarks/scaling/report.py)

from sparse_moe.models import count_budget  # noqa: E402
from sparse_moe.models.budget import meta_model  # noqa: E402
from sparse_moe.models.translation import MoETranslationModel  # noqa: E402
from sparse_moe.report import read_csv_metric  # noqa: E402
from sparse_moe.train.tasks import base_model_config  # noqa: E402

# The paper's translation results (Tables 2 and 3, newstest2014 BLEU): GNMT against the MoE
# models, on WMT'14 (36M and 5M sentence pairs), 85M ops per time step for GNMT.
PAPER = ("WMT'14 En-Fr: GNMT 39.22, GNMT+RL 39.92, MoE-2048 40.35 (40.56 after longer training); "
         "WMT'14 En-De: GNMT 24.91, GNMT+RL 24.66, MoE-2048 26.03")


@dataclass
class TranslationRun:
    name: str
    preset: str
    summary: dict
    ops_m: float
    params_m: float
    tokens_per_second: float = math.nan
    cv_load: float = math.nan

    def metric(self, key: str) -> float:
        return float(self.summary.get(key, math.nan))


def load_run(name: str, run_dir: Path) -> TranslationRun | None:
    if not (run_dir / "summary.json").exists():
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    preset = config["model"]["preset"]
    corpus = json.loads((Path(config["data"]["corpus"]) / "manifest.json").read_text())
    model = base_model_config(preset, corpus["tokenizer"]["vocab_size"])  # a name or a YAML
    budget = count_budget(meta_model(MoETranslationModel, model), extra_ops=model.d_model ** 2)
    run = TranslationRun(name, preset, json.loads((run_dir / "summary.json").read_text()),
                         budget.ops_per_timestep / 1e6, budget.params / 1e6)
    _, rates = read_csv_metric(run_dir, "train_tokens_per_second")
    run.tokens_per_second = statistics.median(rates[1:]) if len(rates) > 1 else math.nan
    run.cv_load = _cv_load(run_dir / "expert_load.jsonl")
    return run


def _cv_load(path: Path) -> float:
    """CV of the first MoE layer's tokens per expert, over the last quarter of the steps."""
    if not path.exists():
        return math.nan
    rows = [json.loads(line)["layers"] for line in path.read_text().splitlines() if line.strip()]
    counts = [row[0] for row in rows if row and len(row[0]) > 1]
    if not counts:
        return math.nan
    late = counts[int(len(counts) * (1 - LOAD_WINDOW)):]
    return statistics.mean(statistics.pstdev(c) / statistics.mean(c) for c in late)


def write_report(configurations: list[tuple[str, list[str]]], runs_dir: Path, report: Path,
                 command: str, section: str = "translation") -> None:
    runs = {name: load_run(name, runs_dir / name) for name, _ in configurations}
    done = {name: run for name, run in runs.items() if run is not None}
    missing = [name for name, run in runs.items() if run is None]
    if not done:
        raise SystemExit(f"no finished run in {runs_dir}")
    figures = report.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plot = plot_bleu_vs_parameters(done, figures / f"{section}-bleu-vs-parameters.png")
    table = render(done, missing, command, plot.relative_to(report.parent))
    begin, end = markers(section)
    text = report.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{report}: expected the markers {begin} and {end}")
    head, rest = text.split(begin, 1)
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}")
    tmp.replace(report)
    print(table)


def render(runs: dict[str, TranslationRun], missing: list[str], command: str,
           plot: Path) -> str:
    lines = [f"Command: `python benchmarks/scaling/sweep.py {command}`", "",
             "| configuration | ops/step (M) | parameters (M) | test BLEU | valid BLEU | "
             "test perplexity | CV(load) | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs.values():
        lines.append(f"| {run.name} | {run.ops_m:.2f} | {run.params_m:.2f} | "
                     f"{run.metric('test/bleu'):.2f} | {run.metric('valid/bleu'):.2f} | "
                     f"{run.metric('test/perplexity'):.2f} | {_fmt(run.cv_load)} | "
                     f"{_fmt(run.tokens_per_second, 0)} |")
    lines += ["", "Ops per time step: the LSTM and MoE layers and the attention's query "
              "projection (softmax and embedding excluded, as for the language model); "
              "parameters likewise exclude the embedding and softmax.",
              f"The paper, for comparison (a different data set and scale): {PAPER}.",
              "", f"![BLEU against parameters]({plot})"]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(lines)


def plot_bleu_vs_parameters(runs: dict[str, TranslationRun], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run in runs.values():
        ax.scatter(run.params_m, run.metric("test/bleu"))
        ax.annotate(run.name, (run.params_m, run.metric("test/bleu")), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("parameters without embedding and softmax (M)")
    ax.set_ylabel("test_2016_flickr BLEU")
    ax.set_title("Multi30k En-De, equal ops per time step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
