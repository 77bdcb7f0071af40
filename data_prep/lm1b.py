"""The One Billion Word benchmark as users download it, with the standard split.

Layout (Chelba et al. 2013):
    <root>/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100    training (99 files)
    <root>/heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050
The held-out shard 00000 is the test set everyone reports; held-out shard 00001 (when present)
serves as validation. Sentences are already tokenized into words; each is one document with one
end-of-sentence token, the protocol behind the paper's perplexities.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from sparse_moe.atomic import atomic_write
from sparse_moe.data.tokenizer import WORD_SPECIALS

from .encode import EncodeOptions
from .jobs import encode_corpus
from .sources import DataPrepError, ReadStats, SourceSpec, _decoded_lines

TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"


def lm1b_files(root: str | Path) -> dict[str, list[Path]]:
    root = Path(root)
    train = sorted((root / TRAIN_DIR).glob("news.en-*-of-00100"))
    heldout = root / HELDOUT_DIR
    test = heldout / "news.en.heldout-00000-of-00050"
    if not test.is_file():
        raise DataPrepError(f"{test} does not exist: expected the 1B-word layout "
                            f"{HELDOUT_DIR}/news.en.heldout-00000-of-00050 under {root}")
    files = {"test": [test]}
    valid = heldout / "news.en.heldout-00001-of-00050"
    if valid.is_file():
        files["valid"] = [valid]
    if train:
        files["train"] = train
    return files


def build_word_vocab(files: list[Path], path: Path, min_count: int = 3,
                     max_size: int | None = None, progress: bool = False) -> int:
    """Words seen at least ``min_count`` times in training, most frequent first.

    With the full training set and ``min_count=3`` this is the benchmark's 793,471-word
    vocabulary (plus the three specials <S>, </S>, <UNK>).
    """
    from tqdm import tqdm

    counts: Counter[str] = Counter()
    spec = SourceSpec([str(f) for f in files])
    for file in tqdm(files, desc="word counts", unit=" files", file=sys.stderr,
                     disable=not progress):
        for line in _decoded_lines(file, spec, ReadStats()):
            counts.update(line.split())
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in WORD_SPECIALS),
                   key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[:max(0, max_size - len(WORD_SPECIALS))]
    lines = [f"{s}\t0" for s in WORD_SPECIALS] + [f"{w}\t{counts[w]}" for w in words]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(lines) + "\n")
    return len(lines)


def prepare_lm1b(root: str, output: str, tokenizer: str | None, vocab_from: str = "train",
                 min_count: int = 3, max_vocab: int | None = None, num_proc: int = 1,
                 shard_bytes: int = 256 << 20, overwrite: bool = False, progress: bool = True,
                 command: list[str] | None = None) -> dict:
    """Encodes every split found; builds the word vocabulary first when no tokenizer is given."""
    files = lm1b_files(root)
    out = Path(output)
    if tokenizer is None:
        if vocab_from not in files:
            raise DataPrepError(f"cannot build the word vocabulary from split {vocab_from!r}: "
                                f"{root} has splits {sorted(files)}")
        tokenizer = str(out / "vocab.txt")
        if not Path(tokenizer).exists() or overwrite:
            size = build_word_vocab(files[vocab_from], Path(tokenizer), min_count, max_vocab,
                                    progress)
            print(f"word vocabulary: {size:,} entries -> {tokenizer}")
    results = {}
    for split, paths in files.items():
        options = EncodeOptions(tokenizer=tokenizer, output=output, split=split, eos="line",
                                shard_bytes=shard_bytes, num_proc=num_proc, overwrite=overwrite,
                                progress=progress)
        summary, manifest = encode_corpus(SourceSpec([str(p) for p in paths]), options, command)
        print(f"{split}: " + ("already complete" if summary.already_complete else summary.line()))
        results[split] = summary
    return results
