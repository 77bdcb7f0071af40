"""encode: shard contents equal SentencePiece's own encoding, read by an independent reader."""

from __future__ import annotations

import hashlib
import json
import unicodedata

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.encode import EncodeOptions
from data_prep.jobs import encode_corpus
from data_prep.sources import SourceSpec

from .helpers import SHARED, manifest, nonblank_lines
from .megatron_reference import read_split


def _encode(inputs, tokenizer, out, **kwargs):
    spec_keys = {"format", "field", "doc_mode", "encoding", "errors"}
    spec = SourceSpec([str(i) for i in inputs], **{k: v for k, v in kwargs.items() if k in spec_keys})
    options = EncodeOptions(tokenizer=str(tokenizer), output=str(out), progress=False,
                            **{k: v for k, v in kwargs.items() if k not in spec_keys})
    return encode_corpus(spec, options, command=["test"])


def test_shards_equal_sentencepiece_encoding(tmp_path, wt_file, spm_model, sp):
    out = tmp_path / "corpus"
    _encode([wt_file], spm_model, out, shard_bytes=20_000)
    lines = nonblank_lines(wt_file)
    expected = [ids + [sp.eos_id()] for ids in sp.encode(lines)]
    meta = manifest(out)
    parsed = read_split(out, meta, "train")
    assert parsed["codes"] == {8}                     # uint16 for a 1000-piece vocabulary
    assert parsed["documents"] == expected
    entry = meta["splits"]["train"]
    assert len(entry["shards"]) > 5
    assert entry["documents"] == len(lines)
    assert entry["tokens"] == sum(map(len, expected))
    assert meta["tokenizer"]["vocab_size"] == 1000
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(open(spm_model, "rb").read()).hexdigest()
    for shard in entry["shards"]:
        for ext in ("bin", "idx"):
            data = (out / f"{shard['name']}.{ext}").read_bytes()
            assert shard[f"{ext}_sha256"] == hashlib.sha256(data).hexdigest()
            assert shard[f"{ext}_bytes"] == len(data)
    # Documents never straddle shards; each shard but the last reaches the target size.
    sizes = [s["bin_bytes"] for s in entry["shards"]]
    assert all(size >= 20_000 for size in sizes[:-1])
    assert entry["command"] == ["test"] and entry["source"]["inputs"][0]["path"] == str(wt_file)


def test_decode_of_encode_round_trips(tmp_path, wt_file, spm_model, sp):
    out = tmp_path / "corpus"
    _encode([wt_file], spm_model, out, eos="none")
    docs = read_split(out, manifest(out), "train")["documents"]
    lines = nonblank_lines(wt_file)
    exact = 0
    for line, ids in zip(lines, docs, strict=True):
        assert sp.decode(ids) == sp.decode(sp.encode(line))
        if sp.unk_id() not in ids:
            assert sp.decode(ids) == unicodedata.normalize("NFKC", " ".join(line.split()))
            exact += 1
    assert exact > 500   # lines without unknown pieces decode to their normalized text


@pytest.mark.parametrize("engine", ["threads", "processes"])
def test_num_proc_1_and_2_write_identical_shards(tmp_path, wt_file, spm_model, engine):
    one, two = tmp_path / "one", tmp_path / "two"
    _encode([wt_file], spm_model, one, shard_bytes=30_000, num_proc=1, chunk_bytes=10_000)
    _encode([wt_file], spm_model, two, shard_bytes=30_000, num_proc=2, chunk_bytes=7_000,
            engine=engine)
    names = sorted(p.name for p in one.iterdir() if p.suffix in (".bin", ".idx"))
    assert names == sorted(p.name for p in two.iterdir() if p.suffix in (".bin", ".idx"))
    assert len(names) > 4
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert manifest(one)["splits"]["train"]["shards"] == manifest(two)["splits"]["train"]["shards"]


def test_other_formats_give_the_same_tokens(tmp_path, wt_file, spm_model, sp):
    lines = nonblank_lines(wt_file)[:400]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": line}) + "\n"
                             for i, line in enumerate(lines)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": lines}), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": lines}).save_to_disk(str(saved))
    expected = [ids + [sp.eos_id()] for ids in sp.encode(lines)]
    for name, source in (("jsonl", jsonl), ("parquet", parquet), ("saved", saved)):
        out = tmp_path / f"out-{name}"
        _encode([source], spm_model, out, field="body")
        assert read_split(out, manifest(out), "train")["documents"] == expected, name
        assert manifest(out)["splits"]["train"]["source"]["format"] == {
            "jsonl": "json", "parquet": "parquet", "saved": "saved"}[name]


def test_gzip_text_multi30k(tmp_path, spm_model, sp):
    import gzip

    source = SHARED / "multi30k" / "val.en.gz"
    out = tmp_path / "m30k"
    _encode([source], spm_model, out, eos="line")
    lines = [line for line in gzip.open(source, "rt", encoding="utf-8").read().split("\n")
             if line.strip()]
    assert len(lines) == 1014
    docs = read_split(out, manifest(out), "train")["documents"]
    assert docs == [ids + [sp.eos_id()] for ids in sp.encode(lines)]


def test_paragraph_documents(tmp_path, spm_model, sp):
    source = SHARED / "gutenberg" / "blake-poems.txt"
    out = tmp_path / "blake"
    _encode([source], spm_model, out, doc_mode="paragraph", eos="document")
    paragraphs, current = [], []
    for line in source.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            current.append(line.rstrip("\r"))
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    parsed = read_split(out, manifest(out), "train")
    expected = [[t for ids in sp.encode(p) for t in ids] + [sp.eos_id()] for p in paragraphs]
    assert parsed["documents"] == expected
    assert len(parsed["sequences"]) == sum(map(len, paragraphs))   # one sequence per line


def test_large_vocabulary_uses_int32(tmp_path):
    words = nonblank_lines(SHARED / "lm1b-heldout" / "news.en.heldout-00000-of-00050", 200)
    vocab_words = sorted({w for line in words for w in line.split()})
    vocab = ["<S>", "</S>", "<UNK>"] + vocab_words + [f"filler{i}" for i in range(70_000)]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    source = tmp_path / "in.txt"
    source.write_text("\n".join(words) + "\nnever-seen-word here\n")
    out = tmp_path / "out"
    _encode([source], vocab_file, out, eos="line")
    index = {w: i for i, w in enumerate(vocab)}
    parsed = read_split(out, manifest(out), "train")
    assert parsed["codes"] == {4}
    expected = [[index.get(w, 2) for w in line.split()] + [1]
                for line in words + ["never-seen-word here"]]
    assert parsed["documents"] == expected
    assert manifest(out)["dtype"] == "int32"


def test_rerun_of_a_finished_encode_is_a_no_op(tmp_path, wt_file, spm_model):
    out = tmp_path / "c"
    _encode([wt_file], spm_model, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary, _ = _encode([wt_file], spm_model, out, num_proc=2)
    assert summary.already_complete
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
