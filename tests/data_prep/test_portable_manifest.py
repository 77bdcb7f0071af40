"""A corpus does not depend on where it lives: files inside it are recorded relative to it, a
moved corpus opens, inspects and resumes, and a damaged manifest gives the same message
wherever it is."""

from __future__ import annotations

import json
import shutil

import pytest

from data_prep.cli import main as cli_main
from sparse_moe.data.corpus import (
    CorpusError,
    json_problem,
    load_manifest,
    open_corpus,
    path_from_manifest,
    path_in_manifest,
)

from .helpers import manifest


def _encode(corpus, text, model, split="train", extra=()):
    return cli_main(["encode", "-i", str(text), "-t", str(model), "-o", str(corpus),
                     "--split", split, "--shard-size", "25K", "--no-progress", *extra])


def test_files_inside_the_corpus_are_recorded_relative_to_it(tmp_path, wt_file, spm_model,
                                                             capsys):
    corpus = tmp_path / "where" / "corpus"
    corpus.mkdir(parents=True)
    shutil.copy(spm_model, corpus / "sp.model")
    shutil.copy(wt_file, corpus / "train.txt")
    outside = tmp_path / "valid.txt"
    outside.write_text(wt_file.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    assert _encode(corpus, corpus / "train.txt", corpus / "sp.model") == 0
    assert _encode(corpus, outside, corpus / "sp.model", split="valid") == 0
    meta = manifest(corpus)
    assert meta["tokenizer"]["file"] == "sp.model"
    assert meta["splits"]["train"]["settings"]["source"]["inputs"][0]["path"] == "train.txt"
    assert meta["splits"]["valid"]["settings"]["source"]["inputs"][0]["path"] == str(outside)

    moved = tmp_path / "a" / "much" / "longer" / "mount" / "point" / "corpus"
    shutil.copytree(corpus, moved)
    opened = open_corpus(moved, tokenizer=moved / "sp.model")
    assert opened.split("train").num_documents == open_corpus(corpus).split("train").num_documents
    # The same command, from the new place, finds the split already done (same settings).
    before = (moved / "manifest.json").read_bytes()
    assert _encode(moved, moved / "train.txt", moved / "sp.model") == 0
    assert (moved / "manifest.json").read_bytes() == before
    # inspect decodes with the tokenizer the manifest names, found relative to the corpus.
    capsys.readouterr()
    assert cli_main(["inspect", str(moved), "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "tokenizer file not found" not in shown and "[0]" in shown


def test_path_helpers_round_trip(tmp_path):
    inside, outside = tmp_path / "c" / "tok" / "sp.model", tmp_path / "sp.model"
    assert path_in_manifest(inside, tmp_path / "c") == "tok/sp.model"
    assert path_from_manifest("tok/sp.model", tmp_path / "c") == inside
    assert path_in_manifest(outside, tmp_path / "c") == str(outside.resolve())
    assert path_from_manifest(str(outside), tmp_path / "c") == outside


@pytest.mark.parametrize("depth", [1, 7])
def test_truncated_manifest_message_is_the_same_wherever_the_corpus_lives(tmp_path, wt_file,
                                                                          spm_model, depth):
    """Absolute paths of different lengths before the cut: the message must not change."""
    corpus = tmp_path.joinpath(*["deeper"] * depth, "corpus")
    assert _encode(corpus, wt_file, spm_model) == 0
    path = corpus / "manifest.json"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusError) as raised:
        load_manifest(corpus)
    assert str(raised.value) == (
        f"{path}: expected a JSON manifest, found text that is not valid JSON (the text ends "
        "before its outermost object is closed: cut short?); restore it or re-run the encode")


def test_json_problem_locates_other_damage():
    text = '{\n  "format": "sparse-moe-corpus",\n  "version": 1,,\n}'
    with pytest.raises(json.JSONDecodeError) as raised:
        json.loads(text)
    assert json_problem(text, raised.value) == \
        "Expecting property name enclosed in double quotes at line 3 column 16"
    # A string holding brackets and an escaped quote is not mistaken for an open object.
    cut = '{"a": "x{[\\"", "b": ['
    with pytest.raises(json.JSONDecodeError) as raised:
        json.loads(cut)
    assert json_problem(cut, raised.value).startswith("the text ends before")
    with pytest.raises(json.JSONDecodeError) as raised:
        json.loads("  \n")
    assert json_problem("  \n", raised.value) == "the file is empty"
