"""Training a SentencePiece model from any input the encoder reads."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sparse_moe.atomic import atomic_write
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
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=options.vocab_size,
            model_type=options.model_type, character_coverage=options.character_coverage,
            byte_fallback=options.byte_fallback, input_sentence_size=options.input_sentence_size,
            shuffle_input_sentence=options.shuffle_input_sentence,
            num_threads=options.num_threads, max_sentence_length=options.max_sentence_length,
            pad_id=options.pad_id, minloglevel=2)
    except RuntimeError as error:
        raise training_error(error, spec, options, stats) from None
    prefix = Path(options.model_prefix)
    model_path = prefix.with_name(prefix.name + ".model")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(model_path, model.getvalue())
        processor = spm.SentencePieceProcessor(model_file=str(model_path))
        vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
                        for i in range(processor.get_piece_size()))
        atomic_write(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
        record = {"model": str(model_path.resolve()), "sha256": sha256_file(model_path),
                  "vocab_size": processor.get_piece_size(), "options": asdict(options),
                  "input": spec.describe(), "read": stats.as_dict()}
        atomic_write(prefix.with_name(prefix.name + ".json"),
                      (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    except OSError as error:
        where = error.filename or prefix.parent
        raise DataPrepError(f"--model-prefix {options.model_prefix}: cannot write {where} "
                            f"({error.strerror or error}); expected a writable directory with "
                            "free space") from None
    return record


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def training_error(error: RuntimeError, spec: SourceSpec, options: TokenizerOptions,
                   stats: ReadStats) -> DataPrepError:
    """SentencePiece's C++ check failure as a message about the option the user set.

    Its own text names a source line of the trainer ("trainer_interface.cc(744) [...]"),
    not the command-line option, the input, or what would work.
    """
    text = " ".join(str(error).split())
    inputs = ", ".join(spec.inputs)
    read = f"{stats.lines:,} lines" if stats.lines else f"{stats.rows:,} rows"
    if match := _TOO_HIGH.search(text):
        return DataPrepError(
            f"--vocab-size: expected at most {match.group(2)} for a {options.model_type} model of "
            f"{inputs} ({read} read), found {match.group(1)}; lower --vocab-size or train on "
            "more text")
    if match := _TOO_LOW.search(text):
        return DataPrepError(
            f"--vocab-size: expected at least {match.group(2)} (every character of {inputs} "
            f"kept by --character-coverage {options.character_coverage} needs an entry, plus "
            f"the special pieces), found {match.group(1)}; raise --vocab-size or lower "
            "--character-coverage")
    detail = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", text)
    return DataPrepError(f"SentencePiece could not train on {inputs} ({read} read) with "
                         f"--vocab-size {options.vocab_size} --model-type "
                         f"{options.model_type}: {detail}")


