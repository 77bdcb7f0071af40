"""Gating noise that belongs to the token, not to the process that routes it.

Noisy top-k gating draws ``[tokens, experts]`` standard normals per step. Drawn from a
process's generator, the noise a sequence gets depends on which rank holds it and what else
that rank holds, so the same data on another layout (more processes, another expert-parallel
size, a different micro-batch per rank) routes differently. Inside :func:`keyed_noise` the
layers draw it instead from a counter-based generator: the noise of token ``t`` of sample
``s`` for expert (or group) ``e`` of MoE layer ``l`` is a hash of (run seed, ``l``, ``s``,
``t``, ``e``) turned into a normal by Box-Muller. Any layout that feeds the same samples gets
the same noise, on any device, and so the same routing. ``tests/moe/test_noise.py`` checks
its distribution against the standard normal.

The trainer enters the context for language-model batches, whose samples are the corpus's
segments (``LMBatch.sample_ids``), around the forward and backward pass (activation
checkpointing recomputes the forward, and must draw the same noise). Outside it, or when the
layer sees only some of the tokens (a padding mask), the noise comes from the process's
generator as before.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SampleKeys:
    seed: int
    sample_ids: Tensor  # [B] int64, unique within the run (epoch and segment)
    tokens_per_sample: int  # T: the layer's rows are the B x T tokens, sample-major


_ACTIVE: ContextVar[SampleKeys | None] = ContextVar("sparse_moe_keyed_noise", default=None)


@contextmanager
def keyed_noise(seed: int, sample_ids: Tensor, tokens_per_sample: int) -> Iterator[None]:
    """Noise keyed by (seed, layer, sample, position, expert) inside the block."""
    token = _ACTIVE.set(SampleKeys(seed, sample_ids.to(torch.long), tokens_per_sample))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_keys(num_tokens: int) -> SampleKeys | None:
    """The keys in force, when they describe exactly ``num_tokens`` rows."""
    keys = _ACTIVE.get()
    if keys is None or keys.sample_ids.numel() * keys.tokens_per_sample != num_tokens:
        return None
    return keys


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2^32`` for ``x < 2^32`` in int64 arithmetic without overflow."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state: Tensor, value: Tensor) -> Tensor:
    """Folds a 64-bit value into a 32-bit hash state, 32 bits at a time."""
    state = _mix(state ^ (value & MASK32))
    return _mix(state ^ ((value >> 32) & MASK32))


def keyed_normal(seed: int, stream: int, row_keys: Tensor, row_positions: Tensor,
                 columns: Tensor) -> Tensor:
    """Standard normals ``[R, C]``: one per (row's sample, its position, column).

    ``columns`` is ``[C]`` (the same for every row) or ``[R, C]``; the result is fp32 on the
    rows' device.
    """
    device = row_keys.device
    base = _mix(torch.tensor([(seed ^ (seed >> 32)) & MASK32], device=device, dtype=torch.long))
    state = _absorb(_absorb(base, torch.tensor([stream], device=device)), row_keys)
    state = _absorb(state, row_positions.to(torch.long))
    columns = columns.to(torch.long)
    cells = _absorb(state.unsqueeze(1).expand(-1, columns.shape[-1]), columns.expand(
        row_keys.shape[0], -1))
    first = _mix(cells ^ 0x9E3779B9).to(torch.float64)
    second = _mix(cells ^ 0x7F4A7C15).to(torch.float64)
    u1 = (first + 0.5) / 2.0**32  # in (0, 1): the logarithm is finite
    u2 = second / 2.0**32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(torch.float32)


def token_noise(keys: SampleKeys, stream: int, tokens: Tensor, columns: Tensor) -> Tensor:
    """Noise for the layer's rows ``tokens`` (indices into the ``B x T`` flattened tokens)."""
    sample = keys.sample_ids.to(tokens.device)[tokens // keys.tokens_per_sample]
    return keyed_normal(keys.seed, stream, sample, tokens % keys.tokens_per_sample, columns)
