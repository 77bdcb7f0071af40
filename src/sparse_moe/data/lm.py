"""Language-model batches: the token stream of a split cut into fixed-length segments.

Two modes, both giving each data-parallel rank a disjoint part of every global batch:

* shuffled segments (default): the stream is cut into ``N`` segments of ``seq_len + 1`` tokens
  (consecutive segments overlap by one token, so every token is a target exactly once); each
  epoch visits them in a permutation drawn from ``(seed, epoch)``; global batch ``j`` is
  segments ``perm[j*G : (j+1)*G]`` with ``G = batch_size * world_size``, and rank ``r`` takes the
  ``r``-th block of ``batch_size`` of them.
* ``carry_state=True``: the stream is cut into ``batch_size * world_size`` contiguous streams
  (the classic "batchify" of recurrent LMs); batch ``j`` holds the ``j``-th window of each of the
  rank's streams, so an LSTM's state can be carried from one batch to the next. No shuffling:
  the state would be meaningless across jumps.

The reader never talks to ``torch.distributed``: rank and world size are plain integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .corpus import SplitData


@dataclass
class LMBatch:
    tokens: np.ndarray        # int64 [batch_size, seq_len + 1]
    epoch: int
    index: int                # batch number within the epoch on this rank
    reset_state: bool         # carry mode: the streams start afresh (first batch of an epoch)
    # int64 [batch_size]: which sample each row is, the same whatever the layout that reads it
    # (shuffled mode: epoch and segment; carry mode: None, rows are streams)
    sample_ids: np.ndarray | None = None

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[:, 1:]


class LMBatches:
    def __init__(self, split: SplitData, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 carry_state: bool = False) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"LMBatches.{name}: expected a positive integer, found {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"LMBatches.rank: expected 0 <= rank < world_size={world_size}, "
                             f"found {rank}")
        self.stream = split.token_stream()
        self.split_name = split.name
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.carry_state = seed, shuffle and not carry_state, carry_state
        self.epoch = 0
        self.consumed = 0     # segments (shuffled mode) or windows (carry mode) used this epoch
        self._order: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            raise ValueError(f"split {split.name!r} has {len(self.stream)} tokens: too few for one "
                             f"batch of {batch_size} x {seq_len + 1} on {world_size} rank(s); "
                             f"expected at least {self._tokens_needed()} tokens, found "
                             f"{len(self.stream)}")

    def _tokens_needed(self) -> int:
        """The shortest stream that gives every rank one batch."""
        if self.carry_state:  # each rank reads its own contiguous share of the stream
            return self.global_batch * (self.seq_len + 1)
        return self.global_batch * self.seq_len + 1

    # ---------------------------------------------------------------- geometry
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_segments(self) -> int:
        return max(0, len(self.stream) - 1) // self.seq_len

    @property
    def stream_length(self) -> int:
        return len(self.stream) // self.global_batch

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        if self.carry_state:
            return max(0, (self.stream_length - 1) // self.seq_len)
        return self.num_segments // self.global_batch

    @property
    def position(self) -> int:
        """Batches this rank has taken in the current epoch."""
        return self.consumed if self.carry_state else self.consumed // self.global_batch

    # ---------------------------------------------------------------- iteration
    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_segments)
                     if self.shuffle else np.arange(self.num_segments))
            self._order = (self.epoch, order)
        return self._order[1]

    def _next_batch(self) -> LMBatch:
        width = self.seq_len + 1
        rows = np.empty((self.batch_size, width), dtype=np.int64)
        if self.carry_state:
            offset = self.consumed * self.seq_len
            for b in range(self.batch_size):
                start = (self.rank * self.batch_size + b) * self.stream_length + offset
                rows[b] = self.stream.slice(start, start + width)
            batch = LMBatch(rows, self.epoch, self.consumed, self.consumed == 0)
            self.consumed += 1
        else:
            first = self.consumed + self.rank * self.batch_size
            segments = self._permutation()[first:first + self.batch_size]
            for b, segment in enumerate(segments):
                start = int(segment) * self.seq_len
                rows[b] = self.stream.slice(start, start + width)
            ids = self.epoch * self.num_segments + segments.astype(np.int64)
            batch = LMBatch(rows, self.epoch, self.position, False, ids)
            self.consumed += self.global_batch
        return batch

    def __iter__(self) -> Iterator[LMBatch]:
        """The rest of the current epoch; afterwards the reader stands at the next epoch."""
        while self.position < len(self):
            yield self._next_batch()
        self.epoch += 1
        self.consumed = 0

    # ---------------------------------------------------------------- resumption
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "position": self.position,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "seed": self.seed, "carry_state": self.carry_state,
                "num_tokens": len(self.stream)}

    def load_state_dict(self, state: dict, resplit: bool = False) -> None:
        """Continues at the exact next batch of a saved run.

        A different world size (or per-rank batch size) changes which rank reads what; it is
        refused unless ``resplit=True``, which continues the same epoch order from the first
        segment not yet used (shuffled mode only).
        """
        current = {"seq_len": self.seq_len, "seed": self.seed, "carry_state": self.carry_state,
                   "num_tokens": len(self.stream)}
        for key, value in current.items():
            if state[key] != value:
                raise ValueError(f"LMBatches.load_state_dict: {key} was {state[key]!r} when the "
                                 f"state was saved, now {value!r}")
        regrouped = (state["world_size"], state["batch_size"]) != (self.world_size,
                                                                    self.batch_size)
        if regrouped and not resplit:
            raise ValueError(
                f"LMBatches.load_state_dict: saved with world_size={state['world_size']}, "
                f"batch_size={state['batch_size']}; now world_size={self.world_size}, "
                f"batch_size={self.batch_size}. Pass resplit=True to re-split the remaining "
                "data over the new ranks")
        if regrouped and self.carry_state:
            raise ValueError("LMBatches.load_state_dict: carry_state streams cannot be re-split "
                             "over a different number of ranks; restart the epoch instead")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
