"""Encoding documents into sharded Megatron-format corpora, resumably.

Pipeline: the main process reads documents (streaming) and cuts them into chunks of about a
megabyte of text; ``num_proc`` worker processes encode chunks with SentencePiece's batched
encoder and flatten the ids into numpy arrays; the main process writes the results in input
order into shards. A shard closes after the document that brings it to the target size, so
shard boundaries depend only on the documents, never on chunking or the number of workers:
``num_proc=1`` and ``num_proc=8`` write identical bytes, and a resumed run cuts the same shards.

Resumption: the manifest is rewritten (atomically) after every finished shard, listing the
shards done so far; a shard is only renamed to its final name after it was checked on disk.
A resumed run checks the finished shards, removes anything else of the split (temp files, a
shard renamed but not recorded), skips the documents already written and carries on.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from sparse_moe.data.corpus import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    load_manifest,
    path_from_manifest,
    path_in_manifest,
    write_manifest,
)
from sparse_moe.data.indexed import ShardWriter, check_shard_files, fault_point, token_dtype
from sparse_moe.data.tokenizer import load_tokenizer

from .sources import DataPrepError

EOS_MODES = ("document", "line", "none")
ENGINES = ("auto", "threads", "processes")
FAULT_ENV = "SPARSE_MOE_DATA_FAULT_AFTER_SHARDS"  # crash-safety testing: SIGKILL mid-shard


@dataclass
class EncodeOptions:
    tokenizer: str
    output: str
    split: str = "train"
    eos: str = "document"
    shard_bytes: int = 256 << 20
    num_proc: int = 1
    chunk_bytes: int = 1 << 20
    overwrite: bool = False
    progress: bool = True
    engine: str = "auto"   # "threads", "processes", or auto: threads for SentencePiece

    def __post_init__(self) -> None:
        if self.eos not in EOS_MODES:
            raise DataPrepError(f"eos: expected one of {EOS_MODES}, found {self.eos!r}")
        if self.engine not in ENGINES:
            raise DataPrepError(f"engine: expected one of {ENGINES}, found {self.engine!r}")
        if self.num_proc < 1:
            raise DataPrepError(f"num_proc: expected a positive integer, found {self.num_proc}")
        if self.shard_bytes < 1:
            raise DataPrepError(f"shard size: expected a positive size, found {self.shard_bytes}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-]*", self.split):
            raise DataPrepError(f"split: expected letters, digits, '.' or '-', found {self.split!r}")


# ---------------------------------------------------------------- encoding (runs in workers)

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _init_pool_worker(tokenizer_path: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _exit_with_parent(parent)
    _init_worker(tokenizer_path)


def _exit_with_parent(parent: int) -> None:
    """A killed encode must not leave workers behind (they would hold its pipes open)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() == parent:  # PDEATHSIG
            return
    except (OSError, AttributeError):
        pass
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def encode_sides(job: tuple[list[tuple[list[str], list[int] | None]], str, str]) -> list[tuple]:
    """Encodes one chunk: for each side, (segments, segments per document or None)."""
    sides, eos_mode, dtype = job
    return [encode_documents(_WORKER_TOKENIZER, segments, per_doc, eos_mode, np.dtype(dtype))
            for segments, per_doc in sides]


def encode_documents(tokenizer, segments: Sequence[str], per_doc: Sequence[int] | None,
                     eos_mode: str, dtype: np.dtype
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat tokens, tokens per segment, segments per document.

    ``per_doc=None`` means one segment per document.
    """
    per_doc = (np.ones(len(segments), np.int64) if per_doc is None
               else np.asarray(per_doc, dtype=np.int64))
    ids = tokenizer.encode_batch(segments)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    if eos_mode != "none" and len(ids):
        closing = np.arange(len(ids)) if eos_mode == "line" else np.cumsum(per_doc) - 1
        tokens = np.insert(tokens, np.cumsum(lengths)[closing], tokenizer.eos_id)
        lengths[closing] += 1
    return tokens, lengths.astype(np.int32), per_doc


class _InProcess:
    """The single-process path: same function, no pickling."""

    def __init__(self, tokenizer_path: str) -> None:
        _init_worker(tokenizer_path)

    def map(self, jobs: Iterable) -> Iterator:
        return map(encode_sides, jobs)

    def close(self) -> None:
        pass


class _OrderedWindow:
    """An ordered map over an executor with at most two jobs per worker in flight, so
    reading the input never runs far ahead of encoding. Subclasses set ``pool``,
    ``workers`` and the job function ``_run``."""

    pool: Executor
    workers: int

    def map(self, jobs: Iterable) -> Iterator:
        window: deque = deque()
        for job in jobs:
            window.append(self.pool.submit(self._run, job))
            if len(window) >= 2 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class _Threads(_OrderedWindow):
    """Ordered map over threads sharing one SentencePiece processor.

    SentencePiece releases the GIL while it encodes, so threads encode on all cores with no
    process start-up and no pickling; only turning ids into arrays holds the GIL.
    """

    def __init__(self, tokenizer_path: str, workers: int) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="encode")

    def _run(self, job: tuple) -> list[tuple]:
        sides, eos_mode, dtype = job
        return [encode_documents(self.tokenizer, segments, per_doc, eos_mode, np.dtype(dtype))
                for segments, per_doc in sides]


class _Pool(_OrderedWindow):
    """Ordered map over a process pool with a bounded window, so reading never runs ahead."""

    def __init__(self, tokenizer_path: str, workers: int) -> None:
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_pool_worker,
                                        initargs=(tokenizer_path, os.getpid()))

    _run = staticmethod(encode_sides)  # a module function: picklable for the worker processes


# ---------------------------------------------------------------- output directory and manifest


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def _split_files(directory: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(split)}_\d{{5}}\.(bin|idx)(\.tmp)?")
    return [p for p in directory.iterdir() if pattern.fullmatch(p.name)]


def prepare_split(directory: Path, tokenizer, dtype: np.dtype, split_settings: dict[str, dict],
                  overwrite: bool) -> tuple[dict, bool]:
    """Loads or creates the manifest and readies each split; returns (manifest, already_done).

    Refuses a directory that holds a corpus from another tokenizer, or the same split written
    with other settings, unless ``overwrite``; keeps the verified shards of an unfinished split.
    """
    directory.mkdir(parents=True, exist_ok=True)
    identity = {**tokenizer.identity(),
                "file": path_in_manifest(tokenizer.identity()["file"], directory)}
    if (directory / MANIFEST_NAME).exists():
        manifest = load_manifest(directory)
        original = copy.deepcopy(manifest)
        recorded = manifest["tokenizer"]
        if recorded["sha256"] != identity["sha256"] or manifest["dtype"] != dtype.name:
            if not overwrite:
                raise DataPrepError(
                    f"{directory} already holds a corpus encoded with tokenizer "
                    f"{path_from_manifest(recorded['file'], directory)} "
                    f"(sha256 {recorded['sha256'][:16]}..., dtype {manifest['dtype']}); expected "
                    f"the same tokenizer, found {tokenizer.path} (sha256 "
                    f"{identity['sha256'][:16]}..., dtype {dtype.name}). Choose another "
                    "--output or pass --overwrite to replace it")
            for split in list(manifest["splits"]):
                _remove_split(directory, manifest, split)
            manifest = _new_manifest(identity, dtype)
    else:
        stray = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".idx")]
        if stray and not overwrite:
            raise DataPrepError(f"{directory} holds shard files {stray[:3]} but no {MANIFEST_NAME}: "
                                "another corpus? Choose another --output or pass --overwrite")
        manifest = _new_manifest(identity, dtype)
        original = None
    done = []
    for split, settings in split_settings.items():
        entry = manifest["splits"].get(split)
        if entry is not None and (entry["settings"] != settings or overwrite):
            if entry["settings"] != settings and not overwrite:
                raise DataPrepError(
                    f"{directory}: split {split!r} was written with other settings "
                    f"({_settings_difference(entry['settings'], settings)}); expected the same "
                    "settings to resume or skip it: pass --overwrite to replace it or choose "
                    "another --split/--output")
            _remove_split(directory, manifest, split)
            entry = None
        if entry is None:
            for path in _split_files(directory, split):
                path.unlink()
            manifest["splits"][split] = {"settings": settings, "complete": False, "shards": []}
            done.append(False)
            continue
        done.append(entry["complete"])
        if not entry["complete"]:
            entry["shards"] = _verified_prefix(directory, entry["shards"], dtype)
            keep = {f"{s['name']}.{ext}" for s in entry["shards"] for ext in ("bin", "idx")}
            for path in _split_files(directory, split):
                if path.name not in keep:
                    path.unlink()
    if manifest != original:
        write_manifest(directory, manifest)
    return manifest, all(done)


def _new_manifest(identity: dict, dtype: np.dtype) -> dict:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "tokenizer": identity,
            "dtype": dtype.name, "splits": {}}


def _remove_split(directory: Path, manifest: dict, split: str) -> None:
    for path in _split_files(directory, split):
        path.unlink()
    manifest["splits"].pop(split, None)
    for pair, sides in list(manifest.get("parallel", {}).items()):
        if split in sides.values():
            manifest["parallel"].pop(pair)


def _verified_prefix(directory: Path, shards: list[dict], dtype: np.dtype) -> list[dict]:
    """The finished shards that still check out, up to the first that does not."""
    kept = []
    for shard in shards:
        prefix = directory / shard["name"]
        problems = check_shard_files(prefix.with_name(shard["name"] + ".bin"),
                                     prefix.with_name(shard["name"] + ".idx"), shard, dtype)
        if problems:
            print(f"resume: redoing from shard {shard['name']}: {'; '.join(problems)}",
                  file=sys.stderr)
            break
        kept.append(shard)
    return kept


def _settings_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} before, {new.get(k)!r} now" for k in keys)


# ---------------------------------------------------------------- the writing loop


def _skip_documents(chunks: Iterator[tuple], count: int) -> Iterator[tuple]:
    """Drops the first ``count`` documents (already in finished shards) without encoding them."""
    for chunk in chunks:
        if count >= len(chunk[0]):
            count -= len(chunk[0])
            continue
        if count:
            chunk = tuple(side.drop_first(count) for side in chunk)
            count = 0
        yield chunk


def _take(result: tuple, start: int, stop: int) -> tuple:
    """Documents [start, stop) of one side's encoded chunk."""
    tokens, lengths, per_doc = result
    seq_bounds = np.concatenate([[0], np.cumsum(per_doc)])
    tok_bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    s0, s1 = int(seq_bounds[start]), int(seq_bounds[stop])
    return tokens[tok_bounds[s0]:tok_bounds[s1]], lengths[s0:s1], per_doc[start:stop]


def _doc_tokens(result: tuple) -> np.ndarray:
    _, lengths, per_doc = result
    tok_bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    seq_bounds = np.concatenate([[0], np.cumsum(per_doc)])
    return tok_bounds[seq_bounds[1:]] - tok_bounds[seq_bounds[:-1]]


@dataclass
class EncodeSummary:
    documents: int = 0
    tokens: int = 0
    bytes_written: int = 0
    shards: int = 0
    seconds: float = 0.0
    skipped_documents: int = 0
    already_complete: bool = False

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"{self.documents:,} documents, {self.tokens:,} tokens in {self.shards} new shards "
                f"({self.bytes_written / 2**20:,.1f} MiB) in {self.seconds:.1f} s: "
                f"{rate / 1e6:.2f}M tokens/s, peak memory {peak_memory_mib():.0f} MiB"
                + (f"; resumed after {self.skipped_documents:,} documents already written"
                   if self.skipped_documents else ""))


def peak_memory_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_splits(chunks_factory: Callable[[], Iterator[tuple]], splits: list[str], options: EncodeOptions,
                 split_settings: dict, extra_manifest: Callable[[dict], None] | None = None,
                 progress_total: int | None = None,
                 progress_counter: Callable[[], int] | None = None) -> tuple[EncodeSummary, dict]:
    """Encodes chunks (a tuple of DocChunks, one per split: 1, or 2 aligned sides) to shards.

    A write that fails (full disk, read-only or vanished directory) becomes a DataPrepError
    naming the file; the shard being written is removed and the finished ones stay listed
    in the manifest, so the same command resumes once the cause is fixed.
    """
    directory = Path(options.output)
    created = not directory.exists()
    had_manifest = (directory / MANIFEST_NAME).exists()
    before = _finished_shards(directory, splits) if had_manifest else {}
    try:
        return _write_splits(chunks_factory, splits, options, split_settings, extra_manifest,
                             progress_total, progress_counter)
    except OSError as error:
        raise write_error(error, options, splits[0]) from None
    except DataPrepError:
        _discard_new_splits(directory, splits, before, created, had_manifest)
        raise


def _finished_shards(directory: Path, splits: list[str]) -> dict[str, int]:
    try:
        manifest = load_manifest(directory)
    except ValueError:
        return {}
    return {s: len(manifest["splits"][s]["shards"]) for s in splits if s in manifest["splits"]}


def _discard_new_splits(directory: Path, splits: list[str], before: dict[str, int],
                        created: bool, had_manifest: bool) -> None:
    """Removes what a run that failed on bad input wrote for splits it started from nothing.

    Such shards cannot be resumed: fixing the input changes its identity, and a different
    --errors or --encoding changes the split's settings. Splits that already had finished
    shards are left as they were, and so is everything else in the directory.
    """
    if (directory / MANIFEST_NAME).exists():
        manifest = load_manifest(directory)
        fresh = [s for s in splits if s in manifest["splits"] and not before.get(s)]
        for split in fresh:
            _remove_split(directory, manifest, split)
        if fresh and not manifest["splits"] and not had_manifest:
            (directory / MANIFEST_NAME).unlink()
        elif fresh:
            write_manifest(directory, manifest)
    if created and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def write_error(error: OSError, options: EncodeOptions, split: str) -> DataPrepError:
    path = error.filename or options.output
    finished = _finished_shards(Path(options.output), [split]).get(split, 0) \
        if (Path(options.output) / MANIFEST_NAME).exists() else 0
    return DataPrepError(
        f"{path}: cannot write ({error.strerror or error}); expected a writable --output "
        f"directory with free space. {finished} finished shard(s) of split {split!r} "
        f"are kept in {options.output}; fix the cause and run the same command again to resume")


def _write_splits(chunks_factory, splits, options, split_settings, extra_manifest,
                  progress_total, progress_counter) -> tuple[EncodeSummary, dict]:
    start_time = time.perf_counter()
    directory = Path(options.output)
    tokenizer = load_tokenizer(options.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    manifest, done = prepare_split(directory, tokenizer, dtype, split_settings, options.overwrite)
    summary = EncodeSummary()
    if extra_manifest:
        extra_manifest(manifest)
    if done:
        summary.already_complete = True
        return summary, manifest
    entries = [manifest["splits"][s] for s in splits]
    skip = sum(s["documents"] for s in entries[0]["shards"])
    summary.skipped_documents = skip
    jobs = (([(side.segments, side.per_doc) for side in chunk], options.eos, dtype.name)
            for chunk in _skip_documents(chunks_factory(), skip))
    engine = _engine(options, tokenizer.kind)
    target = max(1, options.shard_bytes // dtype.itemsize)
    fault_after = int(os.environ.get(FAULT_ENV, "-1"))
    bar = _progress_bar(options.progress, progress_total)
    writers: list[ShardWriter] | None = None
    try:
        for result in engine.map(jobs):
            n_docs = len(result[0][2])
            combined = sum(_doc_tokens(side) for side in result)
            start = 0
            while start < n_docs:
                if writers is None:
                    index = len(entries[0]["shards"])
                    writers = [ShardWriter(directory / shard_name(s, index), dtype) for s in splits]
                filled = writers[0].tokens + sum(w.tokens for w in writers[1:])
                room = np.cumsum(combined[start:]) + filled
                full = np.nonzero(room >= target)[0]
                stop = start + int(full[0]) + 1 if len(full) else n_docs
                for writer, side in zip(writers, result):
                    writer.add_documents(*_take(side, start, stop))
                summary.documents += stop - start
                if fault_after >= 0 and summary.shards == fault_after and writers[0].documents:
                    os.kill(os.getpid(), signal.SIGKILL)
                if len(full):
                    _finish(writers, entries, directory, manifest, summary)
                    writers = None
                start = stop
            _advance(bar, progress_counter, n_docs)
        if writers is not None and writers[0].documents:
            _finish(writers, entries, directory, manifest, summary)
            writers = None
    except BaseException:
        if writers is not None:
            for writer in writers:
                writer.abandon()
        engine.close()
        if bar is not None:
            bar.close()
        raise
    engine.close()
    if bar is not None:
        bar.close()
    for entry in entries:
        entry["complete"] = True
        entry["documents"] = sum(s["documents"] for s in entry["shards"])
        entry["tokens"] = sum(s["tokens"] for s in entry["shards"])
    write_manifest(directory, manifest)
    summary.seconds = time.perf_counter() - start_time
    return summary, manifest


def _engine(options: EncodeOptions, kind: str):
    """Threads for SentencePiece (it encodes without the GIL), processes for pure-Python ones."""
    if options.num_proc == 1:
        return _InProcess(options.tokenizer)
    engine = options.engine if options.engine != "auto" else (
        "threads" if kind == "sentencepiece" else "processes")
    if engine == "threads":
        return _Threads(options.tokenizer, options.num_proc)
    return _Pool(options.tokenizer, options.num_proc)


def _finish(writers, entries, directory, manifest, summary) -> None:
    for writer, entry in zip(writers, entries):
        record = writer.finish()
        fault_point("before-manifest", record["name"])
        entry["shards"].append(record)
        summary.tokens += record["tokens"]
        summary.bytes_written += record["bin_bytes"] + record["idx_bytes"]
    summary.shards += 1
    write_manifest(directory, manifest)


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm

    unit = "B" if total is not None else " docs"
    return tqdm(total=total, unit=unit, unit_scale=True, desc="encode", file=sys.stderr,
                mininterval=1.0)


def _advance(bar, counter: Callable[[], int] | None, docs: int) -> None:
    if bar is None:
        return
    if counter is not None:
        bar.update(counter() - bar.n)
    else:
        bar.update(docs)

