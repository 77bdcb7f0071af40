"""Where a trained language model's first MoE layer sends tokens: the report's routing tables.

Loads a run's checkpoint into one process (``sparse_moe.train.trained.load_trained``), runs
evaluation batches through it and counts (token, expert) assignments of the first MoE layer:

- by **token** (``specialisation_<run>.md``): the most routed tokens and their three most used
  experts, the counterpart of the paper's Table 9;
- by **group of lines** (``routing_<run>.md`` and a heatmap ``routing_<run>.png``), when the
  report is given a text file and one label per line (``--routing-text``,
  ``--routing-labels``): the share of each group's assignments that goes to each expert. The
  demo passes its synthetic corpus's domains, which is what the demo is there to show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

TOP_TOKENS = 24


class RoutingInputError(ValueError):
    """Routing text and labels that do not fit together."""


@dataclass
class RoutingCounts:
    by_token: torch.Tensor  # [V, E] assignments of each token id to each expert
    by_group: torch.Tensor | None  # [L, E] assignments of each group's tokens (with labels)
    groups: list[str]  # the labels, in the order of by_group's rows


def read_labelled_lines(text: Path, labels: Path) -> tuple[list[str], list[str]]:
    """The lines of ``text`` and the label of each, from ``labels`` (one per line)."""
    lines = text.read_text(encoding="utf-8").splitlines()
    marks = labels.read_text(encoding="utf-8").splitlines()
    if len(lines) != len(marks):
        raise RoutingInputError(f"--routing-labels {labels}: expected one label per line of "
                                f"{text} ({len(lines)} lines), found {len(marks)} labels")
    return lines, marks


def labelled_rows(tokenizer: Any, lines: list[str], labels: list[str], seq_len: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``[rows, seq_len]`` token ids and the label index of each token, as the corpus encoder
    writes a stream (each line's tokens, then end of sentence), cut into rows."""
    names = sorted(set(labels))
    ids, marks = [], []
    for tokens, label in zip(tokenizer.encode_batch(lines), labels):
        ids += [*tokens, tokenizer.eos_id]
        marks += [names.index(label)] * (len(tokens) + 1)
    usable = len(ids) // seq_len * seq_len
    stream = torch.tensor(ids[:usable]).view(-1, seq_len)
    groups = torch.tensor(marks[:usable]).view(-1, seq_len)
    for start in range(0, stream.shape[0], 32):
        yield stream[start:start + 32], groups[start:start + 32]


@torch.no_grad()
def count_routing(engine: Any, rows: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
                  vocab_size: int, num_groups: int, device: torch.device) -> RoutingCounts | None:
    """Assignments of the first MoE layer by token and, for labelled rows, by group."""
    by_token = by_group = None
    for tokens, groups in rows:
        outputs = engine(tokens.to(device)).moe_outputs
        if not outputs or outputs[0].routing is None:
            return None
        routing = outputs[0].routing
        experts = routing.expert_idx.cpu()
        if by_token is None:
            num_experts = outputs[0].counts.numel()
            by_token = torch.zeros(vocab_size, num_experts, dtype=torch.float64)
            by_group = torch.zeros(max(num_groups, 1), num_experts, dtype=torch.float64)
        ones = torch.ones(experts.numel(), dtype=torch.float64)
        positions = routing.token_idx.cpu()
        by_token.index_put_((tokens.reshape(-1)[positions], experts), ones, accumulate=True)
        if groups is not None:
            by_group.index_put_((groups.reshape(-1)[positions], experts), ones, accumulate=True)
    if by_token is None:
        return None
    return RoutingCounts(by_token, by_group if num_groups else None, [])


def specialisation_rows(table: torch.Tensor, top_tokens: int, tokenizer: Any
                        ) -> list[dict[str, Any]]:
    """The ``top_tokens`` most routed token ids with their three most used experts."""
    per_token = table.sum(dim=1)
    rows = []
    for token in per_token.argsort(descending=True)[:top_tokens].tolist():
        total = float(per_token[token])
        if total == 0:
            break
        shares = table[token] / total
        experts = shares.argsort(descending=True)[:3].tolist()
        rows.append({"token": token_text(tokenizer, token), "id": token, "assignments": total,
                     "experts": [[e, round(float(shares[e]), 3)] for e in experts]})
    return rows


def token_text(tokenizer: Any, token: int) -> str:
    """The vocabulary entry itself (a SentencePiece piece such as '▁the', or a word)."""
    if tokenizer is None:
        return str(token)
    processor = getattr(tokenizer, "processor", None)
    if processor is not None:
        return processor.id_to_piece(token)
    return tokenizer.decode([token])


def token_table(run_name: str, split: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"# Expert specialisation: {run_name}, MoE layer 0, split {split}", "",
             "| token | assignments | top experts (share) |", "|---|---|---|"]
    for row in rows:
        experts = ", ".join(f"{e} ({share:.0%})" for e, share in row["experts"])
        token = row["token"].replace("|", "\\|") or "(empty)"
        lines.append(f"| `{token}` | {row['assignments']:.0f} | {experts} |")
    return "\n".join(lines) + "\n"


def group_table(run_name: str, groups: list[str], by_group: torch.Tensor) -> str:
    """Each group's three most used experts and how concentrated its routing is."""
    share = (by_group / by_group.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    experts = by_group.shape[1]
    lines = [f"# Routing by group: {run_name}, MoE layer 0", "",
             f"Share of each group's assignments per expert ({experts} experts; an even spread "
             f"would give each {1 / experts:.1%}). Concentration: the share held by the "
             "group's top quarter of experts.", "",
             "| group | assignments | top experts (share) | concentration |", "|---|---|---|---|"]
    for i, name in enumerate(groups):
        order = np.argsort(-share[i])
        top = ", ".join(f"{e} ({share[i, e]:.0%})" for e in order[:3])
        quarter = share[i, order[:max(1, experts // 4)]].sum()
        lines.append(f"| {name} | {by_group[i].sum():.0f} | {top} | {quarter:.0%} |")
    return "\n".join(lines) + "\n"


def plot_group_heatmap(run_name: str, groups: list[str], by_group: torch.Tensor,
                       path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (by_group / by_group.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    fig, ax = plt.subplots(figsize=(max(6, share.shape[1] * 0.4), 1.2 + 0.45 * len(groups)))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of the group's assignments")
    ax.set(xlabel="expert", yticks=range(len(groups)), yticklabels=groups,
           title=f"{run_name}: MoE layer 0, where each group's tokens go")
    ax.set_xticks(range(share.shape[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_routing_report(run_dir: Path, out: Path, text: Path | None = None,
                         labels: Path | None = None, max_batches: int = 50) -> list[Path]:
    """The routing tables of a language-model run (nothing for other runs)."""
    from sparse_moe.train.tasks import LanguageModelTask
    from sparse_moe.train.trained import load_trained

    grouped = read_labelled_lines(text, labels) if text and labels else None
    engine, task, tokenizer, device = load_trained(run_dir)
    if not isinstance(task, LanguageModelTask):
        return []
    split = next((s for s in task.config.data.eval_splits if s in task.corpus.split_names),
                 task.config.data.train_split)
    batches = ((tokens, None) for _, tokens in zip(range(max_batches),
                                                   task.specialisation_batches(split)))
    counts = count_routing(engine, batches, task.corpus.vocab_size, 0, device)
    if counts is None:
        return []  # no MoE layer
    paths = [out / f"specialisation_{run_dir.name}.md"]
    rows = specialisation_rows(counts.by_token, TOP_TOKENS, tokenizer)
    paths[0].write_text(token_table(run_dir.name, split, rows), encoding="utf-8")
    if grouped is not None:
        lines, marks = grouped
        names = sorted(set(marks))
        rows_iter = labelled_rows(tokenizer, lines, marks, task.config.data.seq_len)
        by = count_routing(engine, rows_iter, task.corpus.vocab_size, len(names), device)
        table = out / f"routing_{run_dir.name}.md"
        table.write_text(group_table(run_dir.name, names, by.by_group), encoding="utf-8")
        paths += [table, plot_group_heatmap(run_dir.name, names, by.by_group,
                                            out / f"routing_{run_dir.name}.png")]
    return paths
