"""encode-parallel, lm1b and tokenizer training, each against an independent reference."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter

import sentencepiece as spm

from data_prep.cli import main as cli_main

from .helpers import SHARED, manifest
from .megatron_reference import read_split

HELDOUT = SHARED / "lm1b-heldout" / "news.en.heldout-00000-of-00050"


def _gz_lines(path, count):
    return gzip.open(path, "rt", encoding="utf-8").read().split("\n")[:count]


def test_parallel_files_give_aligned_shards(tmp_path, pad_spm_model, pad_sp):
    spm_model, sp = pad_spm_model, pad_sp
    en, de = _gz_lines(SHARED / "multi30k" / "train.en.gz", 1500), \
        _gz_lines(SHARED / "multi30k" / "train.de.gz", 1500)
    (tmp_path / "a.en").write_text("\n".join(en) + "\n")
    (tmp_path / "a.de").write_text("\n".join(de) + "\n")
    out = tmp_path / "m30k"
    assert cli_main(["encode-parallel", "--source", str(tmp_path / "a.en"), "--target",
                     str(tmp_path / "a.de"), "--src-lang", "en", "--tgt-lang", "de", "-t", spm_model,
                     "-o", str(out), "--shard-size", "20K", "--eos", "line", "--no-progress"]) == 0
    meta = manifest(out)
    assert meta["parallel"]["train"] == {"source": "train.en", "target": "train.de"}
    src, tgt = read_split(out, meta, "train.en"), read_split(out, meta, "train.de")
    pairs = [(e, d) for e, d in zip(en, de) if e.strip() and d.strip()]
    assert src["documents"] == [ids + [sp.eos_id()] for ids in sp.encode([p[0] for p in pairs])]
    assert tgt["documents"] == [ids + [sp.eos_id()] for ids in sp.encode([p[1] for p in pairs])]
    src_shards, tgt_shards = meta["splits"]["train.en"]["shards"], meta["splits"]["train.de"]["shards"]
    assert len(src_shards) > 2
    assert [s["documents"] for s in src_shards] == [s["documents"] for s in tgt_shards]


def test_tsv_pairs(tmp_path, pad_spm_model, pad_sp):
    spm_model, sp = pad_spm_model, pad_sp
    lines = gzip.open(SHARED / "tatoeba-en-fr" / "en-fr.tsv.gz", "rt", encoding="utf-8"
                      ).read().split("\n")[:2000]
    (tmp_path / "p.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "tat"
    assert cli_main(["encode-parallel", "--tsv", str(tmp_path / "p.tsv"), "--src-lang", "en",
                     "--tgt-lang", "fr", "-t", spm_model, "-o", str(out), "--no-progress"]) == 0
    meta = manifest(out)
    pairs = [line.split("\t") for line in lines if line]
    assert read_split(out, meta, "train.fr")["documents"] == [
        ids + [sp.eos_id()] for ids in sp.encode([p[1] for p in pairs])]


def _lm1b_layout(root):
    """The 1B-word download layout: held-out shard 00000 real; training files cut from it."""
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train = root / "training-monolingual.tokenized.shuffled"
    heldout.mkdir(parents=True)
    train.mkdir()
    (heldout / HELDOUT.name).symlink_to(HELDOUT.resolve())
    lines = HELDOUT.read_text(encoding="utf-8").split("\n")
    (train / "news.en-00001-of-00100").write_text("\n".join(lines[:3000]) + "\n")
    (train / "news.en-00002-of-00100").write_text("\n".join(lines[3000:6000]) + "\n")
    return lines[:6000]


def test_lm1b_word_level_with_standard_split(tmp_path):
    train_lines = _lm1b_layout(tmp_path / "lm1b")
    out = tmp_path / "out"
    assert cli_main(["lm1b", "--root", str(tmp_path / "lm1b"), "-o", str(out), "--min-count", "2",
                     "--no-progress"]) == 0
    meta = manifest(out)
    assert sorted(meta["splits"]) == ["test", "train"]
    counts = Counter(w for line in train_lines for w in line.split())
    kept = {w for w, c in counts.items() if c >= 2}
    vocab = [line.split("\t")[0] for line in (out / "vocab.txt").read_text().splitlines()]
    assert vocab[:3] == ["<S>", "</S>", "<UNK>"] and set(vocab[3:]) == kept
    index = {w: i for i, w in enumerate(vocab)}
    test_docs = read_split(out, meta, "test")["documents"]
    sentences = [line for line in HELDOUT.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(test_docs) == 6075                                      # the paper's test set
    assert sum(map(len, test_docs)) == 153_583 + 6075                  # words + one </S> each
    assert test_docs == [[index.get(w, 2) for w in s.split()] + [1] for s in sentences]
    assert meta["tokenizer"]["kind"] == "word" and meta["dtype"] == "uint16"


def test_tokenizer_command_trains_a_sentencepiece_model(tmp_path):
    rows = [{"text": line} for line in
            (SHARED / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split("\n")[:1500]
            if line.strip()]
    source = tmp_path / "valid.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "tok" / "bpe"
    assert cli_main(["tokenizer", "-i", str(source), "--model-prefix", str(prefix), "--vocab-size",
                     "700", "--model-type", "bpe", "--byte-fallback", "--input-sentence-size",
                     "1000", "--num-threads", "2"]) == 0
    record = json.loads((tmp_path / "tok" / "bpe.json").read_text())
    model = tmp_path / "tok" / "bpe.model"
    assert record["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["options"]["model_type"] == "bpe" and record["options"]["byte_fallback"]
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert processor.get_piece_size() == 700 == record["vocab_size"]
    assert processor.piece_to_id("<0x41>") != processor.unk_id()     # byte fallback pieces
    text = "a completely unseen word: Zyxwv ☃"
    assert processor.decode(processor.encode(text)) == text           # bytes round-trip


def test_inspect_decodes_samples(tmp_path, wt_file, spm_model, sp, capsys):
    out = tmp_path / "c"
    assert cli_main(["encode", "-i", str(wt_file), "-t", spm_model, "-o", str(out),
                     "--no-progress"]) == 0
    assert cli_main(["inspect", str(out), "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    first = next(line for line in wt_file.read_text().split("\n") if line.strip())
    assert "split train:" in printed and "complete" in printed
    assert repr(sp.decode(sp.encode(first)))[:40] in printed
