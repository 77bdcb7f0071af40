"""docs/translation.md's path, end to end on a Multi30k slice: tokenizer (with --pad-id), the
parallel corpus, a few training steps, then ``sparse-moe-translate`` on a file; its BLEU
(sacrebleu) equals the trainer's for the same sentences and decoding. And its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import REPO, run_training


def _translate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_moe.train.translate", *args],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def trained(m30_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mt") / "run"
    root = m30_corpus["root"]
    run_training([f"data.corpus={m30_corpus['corpus']}", f"data.tokenizer={m30_corpus['tokenizer']}",
                  f"run.dir={run_dir}", "run.steps=40", "run.log_every=10", "run.eval_batches=0",
                  "run.progress=false", "model.preset=debug-translation", "data.max_tokens=400",
                  "optimizer.name=adam", "optimizer.lr=0.01", "schedule.warmup_steps=10",
                  "decode.beam_size=3", "decode.max_length=30", "decode.length_penalty=0.6",
                  "tracking.translation_samples=5", "data.eval_splits=[test]",
                  f"data.references={{test: {root}/test.de}}"], wandb=True)
    return run_dir, Path(root)


def test_dashboard_shows_bleu_and_sample_translations(trained):
    """The W&B run file holds the BLEU and a table of the first translations, as written."""
    from tests.wandb_files import offline_run_files, read_offline_run

    run_dir, _ = trained
    run = read_offline_run(offline_run_files(run_dir)[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.values("test/bleu") == {40: pytest.approx(summary["test/bleu"])}
    table = run.values("test/translations")[40]
    assert table["_type"] == "table-file" and table["nrows"] == 5
    files = offline_run_files(run_dir)[0].parent / "files"
    data = json.loads((files / table["path"]).read_text())
    refs = (run_dir / "translations" / "test.ref").read_text(encoding="utf-8").splitlines()[:5]
    hyps = (run_dir / "translations" / "test.hyp").read_text(encoding="utf-8").splitlines()[:5]
    assert data["columns"] == ["reference", "hypothesis"]
    assert data["data"] == [[r, h] for r, h in zip(refs, hyps)]


@pytest.mark.timeout(400)
def test_translating_a_file_gives_the_trainers_bleu(trained, tmp_path):
    run_dir, root = trained
    out = tmp_path / "test.hyp"
    proc = _translate(str(run_dir), "-i", str(root / "test.en"), "-o", str(out),
                      "--references", str(root / "test.de"), "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hypotheses = out.read_text(encoding="utf-8").splitlines()
    sources = (root / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == len(sources) and any(hypotheses)
    summary = json.loads((run_dir / "summary.json").read_text())
    bleu = float(proc.stdout.split("BLEU ")[1].split()[0])
    assert bleu == pytest.approx(summary["test/bleu"], abs=0.005)  # printed with 2 decimals
    # The same translations as the trainer's evaluation wrote, sentence for sentence.
    trainer = dict(zip((run_dir / "translations" / "test.ref").read_text().splitlines(),
                       (run_dir / "translations" / "test.hyp").read_text().splitlines()))
    references = (root / "test.de").read_text(encoding="utf-8").splitlines()
    assert [trainer[r] for r in references if r in trainer] == \
        [h for h, r in zip(hypotheses, references) if r in trainer]


def test_sources_are_encoded_as_encode_parallel_encoded_them(m30_corpus):
    from sparse_moe.data import load_tokenizer, open_corpus
    from sparse_moe.train.translate import encode_sources, read_lines

    tokenizer = load_tokenizer(m30_corpus["tokenizer"])
    corpus = open_corpus(m30_corpus["corpus"], tokenizer=tokenizer)
    lines = read_lines(Path(m30_corpus["root"]) / "test.en")
    encoded = [list(map(int, doc)) for doc in corpus.split("test.en").documents()]
    assert encode_sources(lines, tokenizer, tokenizer.eos_id) == encoded


@pytest.mark.timeout(300)
def test_bad_inputs_get_clear_errors_and_write_nothing(trained, m30_corpus, tmp_path):
    run_dir, root = trained
    out = tmp_path / "out.txt"
    missing = _translate(str(tmp_path / "no-run"), "-i", str(root / "test.en"), "-o", str(out))
    assert missing.returncode == 2 and "no-run" in missing.stderr and "expected a run" in missing.stderr
    latin1 = tmp_path / "latin1.en"
    latin1.write_bytes(b"a dog runs .\nthe caf\xe9 is open .\n")
    bad_text = _translate(str(run_dir), "-i", str(latin1), "-o", str(out))
    assert bad_text.returncode == 2
    assert "latin1.en: line 2 is not UTF-8" in bad_text.stderr, bad_text.stderr
    from data_prep.cli import main as data_prep

    other = tmp_path / "other"
    assert data_prep(["tokenizer", "-i", str(root / "train.en"), "--model-prefix", str(other),
                      "--vocab-size", "500", "--pad-id", "3"]) == 0
    wrong = _translate(str(run_dir), "-i", str(root / "test.en"), "-o", str(out),
                       "--tokenizer", f"{other}.model")
    assert wrong.returncode == 2 and "other.model" in wrong.stderr, wrong.stderr
    assert not out.exists()


@pytest.mark.timeout(300)
def test_an_export_translates_like_its_run(trained, m30_corpus, tmp_path):
    run_dir, root = trained
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "sparse_moe.train.export", str(run_dir), "--out",
                           str(export)], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_run, from_export = tmp_path / "run.hyp", tmp_path / "export.hyp"
    assert _translate(str(run_dir), "-i", str(root / "valid.en"), "-o", str(from_run)).returncode == 0
    proc = _translate(str(export), "-i", str(root / "valid.en"), "-o", str(from_export),
                      "--corpus", m30_corpus["corpus"], "--beam-size", "3", "--length-penalty", "0.6",
                      "--max-length", "30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert from_export.read_text(encoding="utf-8") == from_run.read_text(encoding="utf-8")


def test_bad_sizes_and_a_missing_output_folder_fail_before_loading(tmp_path, capsys):
    from sparse_moe.train.translate import main

    source = tmp_path / "src.en"
    source.write_text("a dog runs .\n", encoding="utf-8")
    for option, message in ((["--beam-size", "0"], "--beam-size: expected a positive integer"),
                            (["--batch-size", "-2"], "--batch-size: expected a positive integer")):
        assert main([str(tmp_path), "-i", str(source), "-o", str(tmp_path / "o"), *option]) == 2
        assert message in capsys.readouterr().err
    assert main([str(tmp_path), "-i", str(source), "-o", str(tmp_path / "no" / "o")]) == 2
    assert "expected an existing folder for the output" in capsys.readouterr().err
