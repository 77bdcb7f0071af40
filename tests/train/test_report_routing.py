"""The report's routing tables, from a real trained run's checkpoint.

References: the token counts of the labelled lines, from SentencePiece directly (every token
of the routed stream goes to k experts), and the synthetic corpus's own record of each line's
domain.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from sparse_moe.demo.synthetic import SyntheticCorpusConfig, domain_labels, write_synthetic_corpus
from tests.train.conftest import REPO, run_training


@pytest.mark.timeout(300)
def test_routing_tables_count_every_token_of_each_group(wt_corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_training([f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
                  f"run.dir={run_dir}", "run.steps=20", "run.eval_batches=2", "run.progress=false",
                  "data.micro_batch_size=8", "data.seq_len=32", "tracking.wandb=false"])
    lines = [line for line in (Path(wt_corpus["root"]) / "valid.txt").read_text(
        encoding="utf-8").splitlines() if line.strip()][:300]
    labels = ["headings" if line.lstrip().startswith("=") else "prose" for line in lines]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "sparse_moe.report", str(run_dir), "--out",
                           str(out), "--routing-text", str(tmp_path / "lines.txt"),
                           "--routing-labels", str(tmp_path / "labels.txt")],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sp = spm.SentencePieceProcessor(model_file=wt_corpus["tokenizer"])
    stream = sum(len(ids) + 1 for ids in sp.encode(lines))  # each line, then end of sentence
    routed = stream // 32 * 32
    table = (out / "routing_run.md").read_text(encoding="utf-8")
    counts = {row.split("|")[1].strip(): float(row.split("|")[2]) for row in table.splitlines()
              if row.startswith("| headings") or row.startswith("| prose")}
    assert set(counts) == {"headings", "prose"}
    assert sum(counts.values()) == 2 * routed  # debug-moe routes every token to k=2 experts
    assert (out / "routing_run.png").stat().st_size > 1000
    tokens = (out / "specialisation_run.md").read_text(encoding="utf-8").splitlines()
    assert tokens[0].startswith("# Expert specialisation: run") and len(tokens) > 10


def test_mismatched_labels_are_refused_before_anything_is_written(tmp_path):
    from sparse_moe.report import main

    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("x\n")
    assert main([str(run), "--out", str(tmp_path / "out"), "--routing-text",
                 str(tmp_path / "a.txt"), "--routing-labels", str(tmp_path / "b.txt")]) == 2
    assert not (tmp_path / "out").exists()


def test_the_synthetic_corpus_records_each_lines_domain(tmp_path):
    config = SyntheticCorpusConfig(train_sentences=60, eval_sentences=40)
    paths = write_synthetic_corpus(tmp_path, config)
    for split, path in paths.items():
        lines = path.read_text().splitlines()
        labels = domain_labels(path).read_text().splitlines()
        assert len(labels) == len(lines) == (60 if split == "train" else 40)
        assert set(labels) <= {f"domain {c}" for c in "ABCDEF"} and len(set(labels)) > 2
