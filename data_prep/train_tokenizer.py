"""Training a SentencePiece model from any input the encoder reads."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from sparse_moe.data.indexed import sha256_file

from .sources import DataPrepError, ReadStats, SourceSpec, iter_documents

MODEL_TYPES = ("unigram", "bpe", "word", "char")


@dataclass
class TokenizerOptions:
    model_prefix: str
    vocab_size: int = 8000
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    byte_fallback: bool = False
    input_sentence_size: int = 0   # 0: every sentence; else a random sample of this many
    shuffle_input_sentence: bool = True
    num_threads: int = 2
    seed: int = 0
    max_sentence_length: int = 16384
    pad_id: int = -1

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise DataPrepError(f"model_type: expected one of {MODEL_TYPES}, found "
                                f"{self.model_type!r}")
        if self.vocab_size < 4:
            raise DataPrepError(f"vocab_size: expected at least 4, found {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise DataPrepError(f"character_coverage: expected a number in (0, 1], found "
                                f"{self.character_coverage}")


def train_tokenizer(spec: SourceSpec, options: TokenizerOptions) -> dict:
    """Trains the model; writes ``<prefix>.model``, ``<prefix>.vocab`` and ``<prefix>.json``.

    The model is produced in memory and written under a temporary name, then renamed, so an
    interrupted training never leaves a model file that looks finished.
    """
    import sentencepiece as spm

    stats = ReadStats()
    sentences = (segment for doc in iter_documents(spec, stats) for segment in doc)
    spm.set_random_generator_seed(options.seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=options.vocab_size,
        model_type=options.model_type, character_coverage=options.character_coverage,
        byte_fallback=options.byte_fallback, input_sentence_size=options.input_sentence_size,
        shuffle_input_sentence=options.shuffle_input_sentence, num_threads=options.num_threads,
        max_sentence_length=options.max_sentence_length, pad_id=options.pad_id,
        minloglevel=2)
    prefix = Path(options.model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = prefix.with_name(prefix.name + ".model")
    _atomic_write(model_path, model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
                    for i in range(processor.get_piece_size()))
    _atomic_write(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
    record = {"model": str(model_path.resolve()), "sha256": sha256_file(model_path),
              "vocab_size": processor.get_piece_size(), "options": asdict(options),
              "input": spec.describe(), "read": stats.as_dict()}
    _atomic_write(prefix.with_name(prefix.name + ".json"),
                  (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return record


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
