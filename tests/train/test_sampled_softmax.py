"""Training a word-level model with the sampled softmax lowers its exact (full-softmax) perplexity."""

from __future__ import annotations

import json

import pytest

from data_prep.cli import main as data_prep
from tests.train.conftest import SHARED, read_metric, run_training

HELDOUT = SHARED / "lm1b-heldout" / "news.en.heldout-00000-of-00050"


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory):
    """The 1B-word layout: the real held-out shard as the test split, training lines cut from it
    (a word vocabulary, most frequent first)."""
    root = tmp_path_factory.mktemp("lm1b")
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train = root / "training-monolingual.tokenized.shuffled"
    heldout.mkdir()
    train.mkdir()
    (heldout / HELDOUT.name).symlink_to(HELDOUT.resolve())
    lines = HELDOUT.read_text(encoding="utf-8").split("\n")
    (train / "news.en-00001-of-00100").write_text("\n".join(lines[:4000]) + "\n", encoding="utf-8")
    out = root / "corpus"
    assert data_prep(["lm1b", "--root", str(root), "-o", str(out), "--min-count", "2",
                      "--no-progress"]) == 0
    return out


@pytest.mark.timeout(300)
def test_sampled_softmax_with_expert_parallelism_lowers_the_full_softmax_perplexity(word_corpus,
                                                                                  tmp_path):
    vocab = len((word_corpus / "vocab.txt").read_text(encoding="utf-8").splitlines())
    run_dir = tmp_path / "run"
    run_training([f"data.corpus={word_corpus}", f"data.tokenizer={word_corpus / 'vocab.txt'}",
                  f"run.dir={run_dir}", "run.steps=60", "run.log_every=1", "run.eval_every=10",
                  "run.eval_batches=4", "run.progress=false", "data.micro_batch_size=8",
                  "data.seq_len=32", "data.eval_splits=[test]", "optimizer.name=adam",
                  "optimizer.lr=0.01", "schedule.warmup_steps=5", "model.preset=debug-moe",
                  "model.overrides.softmax.kind=sampled", "model.overrides.softmax.num_samples=256",
                  "model.activation_checkpointing=true", "parallel.ep_size=2"], nproc=2)
    config = json.loads((run_dir / "summary.json").read_text())
    perplexity = read_metric(run_dir, "test_perplexity")
    assert sorted(perplexity) == [10, 20, 30, 40, 50, 60]
    # Evaluation is the exact softmax: an untrained model is near uniform (perplexity ~ vocab).
    assert perplexity[10] < vocab and perplexity[60] < 0.7 * perplexity[10], perplexity
    assert config["test/perplexity"] == pytest.approx(perplexity[60])


@pytest.mark.timeout(300)
def test_a_resumed_sampled_run_draws_the_same_candidates(word_corpus, tmp_path):
    """The candidates come from the generator the trainer seeds per step: resuming from a
    checkpoint reproduces the uninterrupted losses bit for bit."""
    def overrides(run_dir, steps, *extra):
        return [f"data.corpus={word_corpus}", f"data.tokenizer={word_corpus / 'vocab.txt'}",
                f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=1",
                "run.eval_batches=2", "run.progress=false", "data.micro_batch_size=4",
                "data.seq_len=16", "data.eval_splits=[test]", "tracking.wandb=false",
                "model.preset=debug-moe", "model.overrides.softmax.kind=sampled",
                "model.overrides.softmax.num_samples=64", "schedule.warmup_steps=2", *extra]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training(overrides(straight, 8))
    run_training(overrides(stopped, 4))
    run_training(overrides(stopped, 8, "run.resume=true"))
    want, got = read_metric(straight, "train_loss"), read_metric(stopped, "train_loss")
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]
