"""Translation batches: aligned sentence pairs bucketed by length under a token budget.

Each epoch, pairs are sorted by padded length (ties broken by a permutation drawn from
``(seed, epoch)``), packed greedily into batches whose padded size ``rows * longest side``
stays within ``max_tokens``, and the batches are shuffled. Global batch ``j`` goes to rank
``j % world_size``; each rank gets the same number of batches (the remainder is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .corpus import Corpus, CorpusError


@dataclass
class TranslationBatch:
    source: np.ndarray          # int64 [rows, longest source], padded with pad_id
    target: np.ndarray          # int64 [rows, longest target]
    source_lengths: np.ndarray  # int64 [rows]
    target_lengths: np.ndarray
    pairs: np.ndarray           # pair indices in the split, for tracing
    epoch: int
    index: int


class _Side:
    def __init__(self, corpus: Corpus, split: str) -> None:
        data = corpus.split(split)
        self.stream = data.token_stream()
        self.lengths = np.concatenate([s.document_lengths() for s in data.shards]) \
            if data.shards else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def get(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return self.stream.slice(start, start + int(self.lengths[i]))


class TranslationBatches:
    def __init__(self, corpus: Corpus, pair: str, max_tokens: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 pad_id: int | None = None) -> None:
        parallel = corpus.manifest.get("parallel", {})
        if pair not in parallel:
            raise CorpusError(f"{corpus.directory}: no parallel split {pair!r}; it has "
                              f"{sorted(parallel)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TranslationBatches.rank: expected 0 <= rank < {world_size}, "
                             f"found {rank}")
        self.source = _Side(corpus, parallel[pair]["source"])
        self.target = _Side(corpus, parallel[pair]["target"])
        if len(self.source.lengths) != len(self.target.lengths):
            raise CorpusError(f"{corpus.directory}: parallel split {pair!r} is misaligned: "
                              f"{len(self.source.lengths)} source and {len(self.target.lengths)} "
                              "target sentences")
        self.max_tokens, self.rank, self.world_size = max_tokens, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.pad_id = pad_id if pad_id is not None else max(corpus.pad_id, 0)
        longest = np.maximum(self.source.lengths, self.target.lengths)
        self.usable = np.nonzero(longest <= max_tokens)[0]
        self.too_long = len(longest) - len(self.usable)
        self.epoch = 0
        self.position = 0
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _global_batches(self) -> list[np.ndarray]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        pairs = rng.permutation(self.usable) if self.shuffle else self.usable
        longest = np.maximum(self.source.lengths, self.target.lengths)[pairs]
        order = np.argsort(longest, kind="stable")
        pairs, longest = pairs[order], longest[order]
        batches, start, widest = [], 0, 0
        for i, length in enumerate(longest.tolist()):
            if i > start and max(widest, length) * (i - start + 1) > self.max_tokens:
                batches.append(pairs[start:i])
                start, widest = i, length
            else:
                widest = max(widest, length)
        if start < len(pairs):
            batches.append(pairs[start:])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self._global_batches()) // self.world_size

    def _pad(self, side: _Side, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = side.lengths[pairs].astype(np.int64)
        out = np.full((len(pairs), int(lengths.max(initial=0))), self.pad_id, dtype=np.int64)
        for row, pair in enumerate(pairs):
            out[row, :lengths[row]] = side.get(int(pair))
        return out, lengths

    def __iter__(self) -> Iterator[TranslationBatch]:
        """The rest of the current epoch on this rank; then the reader moves to the next epoch."""
        batches = self._global_batches()
        while self.position < len(self):
            pairs = batches[self.position * self.world_size + self.rank]
            source, source_lengths = self._pad(self.source, pairs)
            target, target_lengths = self._pad(self.target, pairs)
            batch = TranslationBatch(source, target, source_lengths, target_lengths, pairs,
                                     self.epoch, self.position)
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "seed": self.seed, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict, resplit: bool = False) -> None:
        """Resumes at the next batch; a new world size needs ``resplit=True``.

        Re-splitting continues after the global batches already handed out; when the old and
        new world sizes do not divide, it rounds down, so at most ``world_size - 1`` batches of
        the epoch are seen again.
        """
        for key in ("seed", "max_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(f"TranslationBatches.load_state_dict: {key} was {state[key]!r}, "
                                 f"now {getattr(self, key)!r}")
        if state["world_size"] != self.world_size:
            if not resplit:
                raise ValueError(
                    f"TranslationBatches.load_state_dict: saved with world_size="
                    f"{state['world_size']}, now {self.world_size}; pass resplit=True to "
                    "re-split the remaining batches over the new ranks")
            self.epoch = int(state["epoch"])
            self.position = int(state["position"]) * state["world_size"] // self.world_size
            return
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
