"""Tokenizers a corpus can be encoded with: a SentencePiece model or a word-level vocabulary.

Both are identified by the sha256 of their file, so a corpus can prove which tokenizer wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

from .indexed import sha256_file

WORD_SPECIALS = ("<S>", "</S>", "<UNK>")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or not the kind its name says."""


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
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as error:  # SentencePiece's parse failure
            size = self.path.stat().st_size
            raise TokenizerError(
                f"{self.path}: expected a SentencePiece model (a serialized ModelProto), found "
                f"{size} bytes that SentencePiece cannot load ({' '.join(str(error).split())})"
            ) from None
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
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise TokenizerError(
                f"{self.path}: expected a word vocabulary in UTF-8 (one word per line) or a "
                f"SentencePiece .model file, found byte {error.object[error.start:error.start + 1]!r} "
                f"at offset {error.start} that is not UTF-8") from None
        words = [line.split("\t")[0] for line in text.splitlines() if line]
        self.words = words
        self.ids = {word: i for i, word in enumerate(words)}
        missing = [s for s in WORD_SPECIALS if s not in self.ids]
        if missing:
            raise TokenizerError(f"{self.path}: expected a word vocabulary with the special "
                                 f"entries {list(WORD_SPECIALS)}, found {len(words)} entries "
                                 f"without {missing}")
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
        found = "a directory" if path.is_dir() else "nothing"
        raise TokenizerError(f"tokenizer file {path} does not exist (expected a SentencePiece "
                             f".model file or a word vocabulary, found {found})")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return WordTokenizer(path)
