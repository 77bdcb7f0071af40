"""sparse_moe.data readers against an independent token stream (SentencePiece's own encoding)."""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest

from data_prep.encode import EncodeOptions
from data_prep.jobs import encode_corpus, encode_parallel
from data_prep.sources import SourceSpec
from sparse_moe.data import CorpusError, LMBatches, TranslationBatches, open_corpus
from tests.data_prep.helpers import SHARED, nonblank_lines

B, T = 4, 16


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, wt_file, spm_model):
    out = tmp_path_factory.mktemp("corpus")
    encode_corpus(SourceSpec([str(wt_file)]),
                  EncodeOptions(tokenizer=spm_model, output=str(out), shard_bytes=40_000,
                                progress=False), command=["test"])
    return out


@pytest.fixture(scope="module")
def stream(wt_file, sp) -> np.ndarray:
    """The split's tokens computed without the reader: SentencePiece ids + eos, concatenated."""
    return np.array([t for ids in sp.encode(nonblank_lines(wt_file)) for t in ids + [sp.eos_id()]])


def _batches(corpus_dir, spm_model, **kwargs):
    corpus = open_corpus(corpus_dir, tokenizer=spm_model)
    return LMBatches(corpus.split("train"), **{"batch_size": B, "seq_len": T, **kwargs})


def test_shuffled_segments_cover_the_stream_once_and_ranks_are_disjoint(corpus_dir, spm_model,
                                                                         stream):
    world = 3
    readers = [_batches(corpus_dir, spm_model, rank=r, world_size=world, seed=7)
               for r in range(world)]
    assert len(open_corpus(corpus_dir).split("train").shards) > 3       # crosses shard borders
    n_segments = (len(stream) - 1) // T
    available = _segment_counts(stream, T)
    seen = Counter()
    for reader in readers:
        for batch in reader:
            assert batch.tokens.shape == (B, T + 1) and batch.tokens.dtype == np.int64
            assert np.array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
            for row in batch.tokens:
                assert row.tobytes() in available, "batch row is not a segment of the stream"
                seen[row.tobytes()] += 1
    assert all(count <= available[key] for key, count in seen.items())   # no segment twice
    assert sum(seen.values()) == (n_segments // (B * world)) * B * world
    # Same seed and epoch: same order; another epoch: another order.
    again = _batches(corpus_dir, spm_model, rank=1, world_size=world, seed=7)
    first = [b.tokens for b in again]
    assert all(np.array_equal(a, b.tokens) for a, b in
               zip(first, _batches(corpus_dir, spm_model, rank=1, world_size=world, seed=7)))
    assert not np.array_equal(first[0], next(iter(again)).tokens)      # epoch 1 differs


def _segment_counts(stream: np.ndarray, seq_len: int) -> Counter:
    """Every segment of the independent stream (they start at multiples of T), by content."""
    return Counter(stream[s:s + seq_len + 1].tobytes()
                   for s in range(0, len(stream) - seq_len, seq_len))


def test_state_dict_resumes_at_the_exact_next_batch(corpus_dir, spm_model):
    full = [b.tokens for b in _batches(corpus_dir, spm_model, rank=1, world_size=2, seed=3)]
    reader = _batches(corpus_dir, spm_model, rank=1, world_size=2, seed=3)
    taken = [b.tokens for _, b in zip(range(5), reader)]
    state = reader.state_dict()
    resumed = _batches(corpus_dir, spm_model, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = [b.tokens for b in resumed]
    assert len(taken) + len(rest) == len(full)
    assert all(np.array_equal(a, b) for a, b in zip(taken + rest, full))


def test_different_world_size_is_refused_unless_resplit(corpus_dir, spm_model):
    readers = [_batches(corpus_dir, spm_model, rank=r, world_size=2, seed=5) for r in range(2)]
    used = set()
    for reader in readers:
        for _, batch in zip(range(3), reader):
            used.update(map(bytes, batch.tokens))
    state = readers[0].state_dict()
    fresh = _batches(corpus_dir, spm_model, rank=0, world_size=4, seed=5)
    with pytest.raises(ValueError, match=r"saved with world_size=2.*now world_size=4.*resplit"):
        fresh.load_state_dict(state)
    rest = set()
    for r in range(4):
        reader = _batches(corpus_dir, spm_model, rank=r, world_size=4, seed=5)
        reader.load_state_dict(state, resplit=True)
        for batch in reader:
            rest.update(map(bytes, batch.tokens))
    assert not used & rest                                       # nothing read twice
    total = len(_batches(corpus_dir, spm_model, seed=5)) * B    # every segment of the epoch
    assert len(used) + len(rest) >= total - 4 * B


def test_carry_state_streams_are_contiguous(corpus_dir, spm_model, stream):
    world = 2
    for rank in range(world):
        reader = _batches(corpus_dir, spm_model, rank=rank, world_size=world, carry_state=True)
        length = len(stream) // (B * world)
        for j, batch in enumerate(reader):
            assert batch.reset_state == (j == 0)
            for b in range(B):
                start = (rank * B + b) * length + j * T
                assert np.array_equal(batch.tokens[b], stream[start:start + T + 1])
        assert j + 1 == (length - 1) // T


def test_translation_batches_respect_the_budget_and_stay_aligned(tmp_path, spm_model, sp):
    en = gzip.open(SHARED / "multi30k" / "val.en.gz", "rt", encoding="utf-8").read().split("\n")
    de = gzip.open(SHARED / "multi30k" / "val.de.gz", "rt", encoding="utf-8").read().split("\n")
    (tmp_path / "v.en").write_text("\n".join(en))
    (tmp_path / "v.de").write_text("\n".join(de))
    out = tmp_path / "par"
    encode_parallel(EncodeOptions(tokenizer=spm_model, output=str(out), shard_bytes=8_000,
                                  eos="line", progress=False), SourceSpec(["-"]),
                    str(tmp_path / "v.en"), str(tmp_path / "v.de"), src_lang="en", tgt_lang="de")
    pairs = [(e, d) for e, d in zip(en, de) if e.strip() and d.strip()]
    src_ids = [ids + [sp.eos_id()] for ids in sp.encode([p[0] for p in pairs])]
    tgt_ids = [ids + [sp.eos_id()] for ids in sp.encode([p[1] for p in pairs])]
    corpus = open_corpus(out, tokenizer=spm_model)
    budget, world = 600, 2
    seen = []
    for rank in range(world):
        reader = TranslationBatches(corpus, "train", max_tokens=budget, rank=rank,
                                    world_size=world, seed=1, pad_id=-5)
        for batch in reader:
            rows = len(batch.pairs)
            assert rows * max(batch.source.shape[1], batch.target.shape[1]) <= budget
            for r, pair in enumerate(batch.pairs):
                n, m = batch.source_lengths[r], batch.target_lengths[r]
                assert batch.source[r, :n].tolist() == src_ids[pair]
                assert batch.target[r, :m].tolist() == tgt_ids[pair]
                assert (batch.source[r, n:] == -5).all() and (batch.target[r, m:] == -5).all()
            seen.extend(batch.pairs.tolist())
    assert len(seen) == len(set(seen)) and len(seen) > 0.9 * len(pairs)
    reader = TranslationBatches(corpus, "train", max_tokens=budget, rank=0, world_size=world)
    next(iter(reader))
    with pytest.raises(ValueError, match="resplit"):
        TranslationBatches(corpus, "train", max_tokens=budget, world_size=1).load_state_dict(
            reader.state_dict())


def test_opening_checks_the_tokenizer_and_completeness(corpus_dir, other_spm_model, tmp_path):
    with pytest.raises(CorpusError, match="wt600"):
        open_corpus(corpus_dir, tokenizer=other_spm_model)
    with pytest.raises(CorpusError, match="no split 'valid'"):
        open_corpus(corpus_dir).split("valid")
    with pytest.raises(CorpusError, match="does not exist: not a corpus directory"):
        open_corpus(tmp_path)


def test_ranks_together_equal_one_rank_with_the_global_batch(corpus_dir, spm_model):
    """Rank r's rows are rows [r*B, (r+1)*B) of the single-process global batch."""
    single = list(_batches(corpus_dir, spm_model, batch_size=3 * B, seed=11))
    per_rank = [list(_batches(corpus_dir, spm_model, rank=r, world_size=3, seed=11))
                for r in range(3)]
    assert all(len(p) == len(single) for p in per_rank)
    for j, batch in enumerate(single):
        assert np.array_equal(batch.tokens, np.concatenate([p[j].tokens for p in per_rank]))


def _gloo_rank(rank, world, corpus_dir, spm_model, port, out):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        reader = _batches(corpus_dir, spm_model, rank=rank, world_size=world, seed=2)
        mine = torch.from_numpy(np.stack([b.tokens for b in reader]))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_ranks_in_separate_gloo_processes(corpus_dir, spm_model, tmp_path):
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.pt"
    mp.spawn(_gloo_rank, args=(2, corpus_dir, spm_model, port, str(out)), nprocs=2)
    gathered = torch.load(out)
    single = list(_batches(corpus_dir, spm_model, batch_size=2 * B, seed=2))
    assert gathered[0].shape[0] == len(single)
    for j, batch in enumerate(single):
        assert np.array_equal(batch.tokens, torch.cat([g[j] for g in gathered]).numpy())
