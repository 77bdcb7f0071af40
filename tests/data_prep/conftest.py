from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from .helpers import SHARED, write_lines


@pytest.fixture(scope="session")
def wt_lines() -> list[str]:
    """The first 3000 lines of WikiText-2 train, as they are in the file (blank lines kept)."""
    text = (SHARED / "wikitext-2" / "train.txt").read_text(encoding="utf-8")
    return text.split("\n")[:3000]


@pytest.fixture(scope="session")
def wt_file(tmp_path_factory, wt_lines) -> Path:
    return write_lines(tmp_path_factory.mktemp("wt") / "wt.txt", wt_lines)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, wt_file) -> str:
    prefix = tmp_path_factory.mktemp("tok") / "wt1k"
    spm.SentencePieceTrainer.train(input=str(wt_file), model_prefix=str(prefix), vocab_size=1000,
                                   character_coverage=1.0, minloglevel=2, num_threads=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def other_spm_model(tmp_path_factory, wt_file) -> str:
    prefix = tmp_path_factory.mktemp("tok2") / "wt600"
    spm.SentencePieceTrainer.train(input=str(wt_file), model_prefix=str(prefix), vocab_size=600,
                                   minloglevel=2, num_threads=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def sp(spm_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=spm_model)


@pytest.fixture(scope="session")
def pad_spm_model(tmp_path_factory, wt_file) -> str:
    """With a padding id (id 3), as translation corpora need."""
    prefix = tmp_path_factory.mktemp("tokpad") / "wt1kpad"
    spm.SentencePieceTrainer.train(input=str(wt_file), model_prefix=str(prefix), vocab_size=1000,
                                   character_coverage=1.0, minloglevel=2, num_threads=2, pad_id=3)
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def pad_sp(pad_spm_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=pad_spm_model)
