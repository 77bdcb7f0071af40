"""A seeded synthetic multi-domain corpus: something for experts to specialise on.

Each domain has its own vocabulary (words built from its own syllables, so a subword
tokenizer learns domain-specific pieces) and its own word order (a sparse first-order Markov
chain over its words), plus a few function words shared by all domains. Every line is one
sentence from one domain. A model that keeps the domains apart predicts the next word much
better than one that blurs them, and the capacity needed grows with the number of domains:
the setting in which the paper's extra expert parameters pay off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_moe.atomic import atomic_write

SHARED_WORDS = ("the", "of", "and", "a", "in", "to", "is", "with")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


@dataclass
class SyntheticCorpusConfig:
    domains: int = 6
    words_per_domain: int = 240
    successors: int = 6  # likely next words per word: lower is more predictable
    sentence_length: tuple[int, int] = (8, 24)
    train_sentences: int = 24_000
    eval_sentences: int = 1_500
    seed: int = 1234


def _domain_syllables(rng: np.random.Generator) -> list[str]:
    consonants = rng.choice(list(_CONSONANTS), size=6, replace=False)
    vowels = rng.choice(list(_VOWELS), size=3, replace=False)
    return [c + v for c in consonants for v in vowels]


def _domain_words(rng: np.random.Generator, count: int) -> list[str]:
    syllables = _domain_syllables(rng)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables, size=rng.integers(2, 4))))
    return sorted(words)


class Domain:
    """One domain's vocabulary and Markov chain."""

    def __init__(self, rng: np.random.Generator, config: SyntheticCorpusConfig) -> None:
        self.words = _domain_words(rng, config.words_per_domain) + list(SHARED_WORDS)
        n = len(self.words)
        self.next_words = np.stack([rng.choice(n, size=config.successors, replace=False)
                                    for _ in range(n)])
        self.next_probs = rng.dirichlet(np.full(config.successors, 0.7), size=n)
        self.start = rng.dirichlet(np.full(n, 0.3))

    def sentence(self, rng: np.random.Generator, length: int) -> str:
        word = rng.choice(len(self.words), p=self.start)
        out = [self.words[word]]
        for _ in range(length - 1):
            word = self.next_words[word, rng.choice(self.next_words.shape[1],
                                                    p=self.next_probs[word])]
            out.append(self.words[word])
        return " ".join(out)


def write_synthetic_corpus(directory: str | Path, config: SyntheticCorpusConfig | None = None
                           ) -> dict[str, Path]:
    """Writes ``train.txt``, ``valid.txt`` and ``test.txt``, and beside each the domain of every
    line (``<split>.domains.txt``); returns the text files' paths."""
    config = config or SyntheticCorpusConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    domains = [Domain(rng, config) for _ in range(config.domains)]
    low, high = config.sentence_length
    sizes = {"train": config.train_sentences, "valid": config.eval_sentences,
             "test": config.eval_sentences}
    paths = {}
    for split, count in sizes.items():
        split_rng = np.random.default_rng([config.seed, len(paths)])
        lines, labels = [], []
        for _ in range(count):
            domain = int(split_rng.integers(len(domains)))
            lines.append(domains[domain].sentence(split_rng, int(split_rng.integers(low, high + 1))))
            labels.append(domain_name(domain))
        path = directory / f"{split}.txt"
        atomic_write(path, "\n".join(lines) + "\n")
        atomic_write(domain_labels(path), "\n".join(labels) + "\n")
        paths[split] = path
    return paths


def domain_name(index: int) -> str:
    return f"domain {chr(ord('A') + index)}"


def domain_labels(text: Path) -> Path:
    """The file beside a split's text that names each line's domain (``valid.domains.txt``)."""
    return text.with_name(f"{text.stem}.domains.txt")
