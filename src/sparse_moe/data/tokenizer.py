"""Tokenizers a corpus can be encoded with: a SentencePiece model or a word-level vocabulary.

Both are identified by the sha256 of their file, so a corpus can prove which tokenizer wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

from .indexed import sha256_file

WORD_SPECIALS = ("<S>", "</S>", "<UNK>")


class Tokenizer(Protocol):
    kind: str
    path: Path
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    unk_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def identity(self) -> dict: ...


class _Identity:
    def identity(self) -> dict:
        """What a manifest records to tie a corpus to this exact tokenizer."""
        return {"kind": self.kind, "file": str(self.path), "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_id": self.bos_id,
                "pad_id": self.pad_id, "unk_id": self.unk_id}


class SentencePieceTokenizer(_Identity):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = Path(path).resolve()
        self.sha256 = sha256_file(self.path)
        self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = self.processor.eos_id()
        self.bos_id = self.processor.bos_id()
        self.pad_id = self.processor.pad_id()
        self.unk_id = self.processor.unk_id()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class WordTokenizer(_Identity):
    """Whitespace-split words looked up in a vocabulary file (one word per line, optional count).

    This is the word-level vocabulary that the 1B-word benchmark's perplexities are quoted in.
    """

    kind = "word"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self.sha256 = sha256_file(self.path)
        words = [line.split("\t")[0] for line in
                 self.path.read_text(encoding="utf-8").splitlines() if line]
        self.words = words
        self.ids = {word: i for i, word in enumerate(words)}
        missing = [s for s in WORD_SPECIALS if s not in self.ids]
        if missing:
            raise ValueError(f"{self.path}: word vocabulary lacks the special entries {missing}")
        self.vocab_size = len(words)
        self.bos_id, self.eos_id, self.unk_id = (self.ids[s] for s in WORD_SPECIALS)
        self.pad_id = -1

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        get, unk = self.ids.get, self.unk_id
        return [[get(word, unk) for word in text.split()] for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | WordTokenizer:
    """A SentencePiece ``.model`` file, or a word vocabulary (any other file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return WordTokenizer(path)
