"""Bad input gets a clear error naming the file and the problem; nothing is lost."""

from __future__ import annotations

import json

import pytest

from data_prep.cli import main as cli_main
from data_prep.encode import EncodeOptions
from data_prep.jobs import encode_corpus, encode_parallel
from data_prep.sources import DataPrepError, SourceSpec
from sparse_moe.data import CorpusError, open_corpus, verify_corpus

from .helpers import SHARED, manifest, nonblank_lines
from .megatron_reference import read_split

CAESAR = SHARED / "gutenberg" / "shakespeare-caesar.txt"     # Latin-1
MOBY = SHARED / "gutenberg" / "melville-moby_dick.txt"        # CRLF line ends


def _encode(inputs, tokenizer, out, spec_kwargs=None, **kwargs):
    spec = SourceSpec([str(i) for i in inputs], **(spec_kwargs or {}))
    return encode_corpus(spec, EncodeOptions(tokenizer=str(tokenizer), output=str(out),
                                             progress=False, **kwargs), command=["test"])


def _latin1_bad_lines() -> int:
    count = 0
    for raw in CAESAR.read_bytes().split(b"\n"):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            count += 1
    return count


def test_missing_and_empty_files(tmp_path, spm_model):
    with pytest.raises(DataPrepError, match=r"nope\.txt does not exist"):
        _encode([tmp_path / "nope.txt"], spm_model, tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataPrepError, match=r"empty\.txt is empty: expected text to encode, found 0 bytes"):
        _encode([empty], spm_model, tmp_path / "out")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataPrepError, match=r"blank\.txt holds no text"):
        _encode([blank], spm_model, tmp_path / "out2")


def test_non_utf8_policies(tmp_path, spm_model, sp):
    bad = _latin1_bad_lines()
    assert bad > 0
    with pytest.raises(DataPrepError, match=r"shakespeare-caesar\.txt:\d+: expected utf-8 text, "
                                            r"found byte .* not valid utf-8"):
        _encode([CAESAR], spm_model, tmp_path / "strict")
    _, replaced = _encode([CAESAR], spm_model, tmp_path / "replace", {"errors": "replace"})
    read = replaced["splits"]["train"]["read"]
    assert read["replaced_lines"] == bad and read["undecodable_lines"] == bad
    _, skipped = _encode([CAESAR], spm_model, tmp_path / "skip", {"errors": "skip"})
    assert skipped["splits"]["train"]["read"]["skipped_lines"] == bad
    assert skipped["splits"]["train"]["documents"] == replaced["splits"]["train"]["documents"] - bad
    # Decoding it as what it is loses nothing and matches SentencePiece on the same text.
    out = tmp_path / "latin1"
    _, latin = _encode([CAESAR], spm_model, out, {"encoding": "latin-1"})
    lines = nonblank_lines(CAESAR, encoding="latin-1")
    assert read_split(out, latin, "train")["documents"] == [
        ids + [sp.eos_id()] for ids in sp.encode(lines)]


def test_crlf_line_ends_are_removed_and_counted(tmp_path, spm_model, sp):
    raw = MOBY.read_bytes().split(b"\n")[:3000]
    source = tmp_path / "moby.txt"
    source.write_bytes(b"\n".join(raw) + b"\n")
    out = tmp_path / "out"
    _, meta = _encode([source], spm_model, out, {"errors": "error"})
    assert meta["splits"]["train"]["read"]["crlf_lines"] == sum(r.endswith(b"\r") for r in raw)
    lines = [r.decode("utf-8").rstrip("\r") for r in raw if r.strip()]
    assert read_split(out, meta, "train")["documents"] == [
        ids + [sp.eos_id()] for ids in sp.encode(lines)]


def test_damaged_shards_are_named(tmp_path, wt_file, spm_model, capsys):
    out = tmp_path / "c"
    _encode([wt_file], spm_model, out, shard_bytes=30_000)
    assert all(not p for p in verify_corpus(out).values())
    truncated = out / "train_00001.bin"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    altered = out / "train_00002.bin"
    data = bytearray(altered.read_bytes())
    data[100] ^= 0xFF
    altered.write_bytes(bytes(data))
    report = verify_corpus(out)
    assert "size" in report["train/train_00001"][0] and "train_00001.bin" in report["train/train_00001"][0]
    assert "sha256" in report["train/train_00002"][0] and "train_00002.bin" in report["train/train_00002"][0]
    assert not report["train/train_00000"]
    assert cli_main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAIL train/train_00001" in printed and "OK   train/train_00000" in printed
    with pytest.raises(CorpusError, match="train_00001"):
        open_corpus(out, verify=True)
    with pytest.raises(ValueError, match=r"train_00001\.bin: expected \d+ bytes "
                                         r"\(as its index describes\), found \d+"):
        open_corpus(out).split("train")


def test_manifest_from_another_tokenizer_is_refused(tmp_path, wt_file, spm_model, other_spm_model):
    out = tmp_path / "c"
    _encode([wt_file], spm_model, out)
    open_corpus(out, tokenizer=spm_model)
    with pytest.raises(CorpusError, match=r"encoded with tokenizer .*wt1k\.model.*expected that "
                                          r"tokenizer, but was given .*wt600\.model"):
        open_corpus(out, tokenizer=other_spm_model)


def test_output_holding_another_corpus_is_refused_unless_told(tmp_path, wt_file, spm_model,
                                                              other_spm_model):
    out = tmp_path / "c"
    _encode([wt_file], spm_model, out)
    with pytest.raises(DataPrepError, match=r"already holds a corpus encoded with tokenizer"):
        _encode([wt_file], other_spm_model, out)
    with pytest.raises(DataPrepError, match=r"split 'train' was written with other settings .*eos"):
        _encode([wt_file], spm_model, out, eos="none")
    assert open_corpus(out, tokenizer=spm_model).split("train").num_documents > 0   # untouched
    _encode([wt_file], other_spm_model, out, overwrite=True)
    assert manifest(out)["tokenizer"]["vocab_size"] == 600
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "data_00000.bin").write_bytes(b"x")
    with pytest.raises(DataPrepError, match=r"holds shard files .* but no manifest\.json"):
        _encode([wt_file], spm_model, stray)


def test_missing_field_and_misaligned_parallel(tmp_path, spm_model):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"body": "a b c"}) + "\n")
    with pytest.raises(DataPrepError, match=r"no field .text.; expected it in every row, "
                                            r"found the fields .*body"):
        _encode([jsonl], spm_model, tmp_path / "j")
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text("one\ntwo\nthree\n")
    tgt.write_text("eins\nzwei\n")
    out = tmp_path / "par"
    options = EncodeOptions(tokenizer=spm_model, output=str(out), progress=False)
    with pytest.raises(DataPrepError, match=r"misaligned: .*a\.en has 3 lines, .*a\.de has 2"):
        encode_parallel(options, SourceSpec(["-"]), str(src), str(tgt))
    assert not out.exists() or not list(out.iterdir())
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("hello\tbonjour\nno tab here\n")
    with pytest.raises(DataPrepError, match=r"pairs\.tsv:2: expected 'source<TAB>target'"):
        encode_parallel(options, SourceSpec(["-"]), tsv=str(tsv))


def test_cli_reports_errors_without_a_traceback(tmp_path, spm_model, capsys):
    code = cli_main(["encode", "-i", str(tmp_path / "missing.txt"), "-t", spm_model, "-o",
                     str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
