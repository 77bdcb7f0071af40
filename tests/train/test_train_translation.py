"""The translation model trains on a Multi30k slice and is scored with sacrebleu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from tests.train.conftest import read_metric, run_training


def _base(m30, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.corpus={m30['corpus']}", f"data.tokenizer={m30['tokenizer']}",
            f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=1", "run.eval_batches=3",
            "run.progress=false", "model.preset=debug-translation", "data.max_tokens=400",
            "optimizer.name=adam", "optimizer.lr=0.01", "schedule.warmup_steps=10",
            "decode.beam_size=2", "decode.max_length=30", *extra]


@pytest.mark.timeout(300)
def test_translation_trains_and_reports_bleu(m30_corpus, tmp_path):
    run_dir = tmp_path / "tr"
    root = m30_corpus["root"]
    run_training(_base(m30_corpus, run_dir, 60,
                       f"data.references={{valid: {root}/valid.de, test: {root}/test.de}}"))
    losses = read_metric(run_dir, "train_cross_entropy")
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(56, 61)) / 5
    assert last < first - 1.0, f"cross-entropy went from {first:.3f} to {last:.3f}"
    summary = json.loads((run_dir / "summary.json").read_text())
    for split in ("valid", "test"):
        hyps = (run_dir / "translations" / f"{split}.hyp").read_text().splitlines()
        refs = (run_dir / "translations" / f"{split}.ref").read_text().splitlines()
        assert len(hyps) == len(refs) > 0 and any(hyps)
        # The references are the original German sentences, whatever the batching order.
        raw = set((Path(root) / f"{split}.de").read_text().splitlines())
        assert set(refs) <= raw
        assert summary[f"{split}/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


@pytest.mark.timeout(300)
def test_two_processes_with_expert_parallelism_decode_in_lockstep(m30_corpus, tmp_path):
    run_dir = tmp_path / "tr_ep2"
    run_training(_base(m30_corpus, run_dir, 10, "parallel.ep_size=2"), nproc=2, timeout=280)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test/bleu"] >= 0.0
    refs = (run_dir / "translations" / "test.ref").read_text().splitlines()
    assert len(refs) == len(set(refs)) or len(refs) > 3  # both ranks' shares were gathered


def test_reference_file_with_the_wrong_line_count_is_refused(m30_corpus, tmp_path):
    short = tmp_path / "short.de"
    short.write_text("one line\n")
    proc = run_training(_base(m30_corpus, tmp_path / "bad", 1, f"data.references={{test: {short}}}"),
                        check=False)
    assert proc.returncode == 2
    assert f"data.references.test: {short} has 1 lines, expected 120" in proc.stderr
