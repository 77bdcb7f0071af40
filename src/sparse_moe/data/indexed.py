"""Megatron-LM's memory-mapped indexed format (``.bin`` tokens + ``.idx`` index, "MMIDIDX").

Shards in this format open unchanged in Megatron-LM's ``IndexedDataset`` and the tools built on
it, which is why the project stores corpora this way rather than in a format of its own.

Layout of the index file (all integers little-endian):

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   uint64    S
    document count   uint64    D + 1 (the document index array starts with 0)
    sequence lengths int32[S]  tokens per sequence
    pointers         int64[S]  byte offset of each sequence in the .bin file
    document index   int64[D+1] first sequence of each document, then S

A sequence is one encoded segment (a line); a document is a run of consecutive sequences.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")
# Crash-safety testing: "<point>:<shard name>" makes the writer SIGKILL itself at that point.
FAULT_AT_ENV = "SPARSE_MOE_DATA_FAULT_AT"
FAULT_POINTS = ("mid-shard", "before-rename", "between-renames", "before-manifest",
                "manifest-replace")


def fault_point(point: str, shard: str) -> None:
    """Dies like a killed process (no clean-up, no flush) where the test asked for it."""
    if os.environ.get(FAULT_AT_ENV) == f"{point}:{shard}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class ShardFormatError(ValueError):
    """A shard's files do not have the layout or the contents the manifest promises."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page-cache use), otherwise int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encode_index(dtype: np.dtype, sequence_lengths: np.ndarray, document_index: np.ndarray) -> bytes:
    """The bytes of an ``.idx`` file for sequences stored back to back from offset 0."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_index, dtype=np.int64)
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_OF_DTYPE[np.dtype(dtype)],
                          len(lengths), len(docs))
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


class ShardWriter:
    """Writes one shard under temporary names; ``finish`` verifies it and renames it into place.

    Tokens stream to disk as they arrive (memory stays flat); the ``.bin`` checksum is computed
    on the way. A shard that is not finished leaves only ``*.tmp`` files, which a resumed run
    deletes, so a half-written shard can never be mistaken for a finished one.
    """

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self.idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        with _naming(self.bin_tmp):
            self._bin = open(self.bin_tmp, "wb")
        self._digest = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._docs: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.tokens = 0
        self.sequences = 0
        self.documents = 0

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray,
                      sequences_per_document: np.ndarray) -> None:
        """Appends whole documents: their tokens, per-sequence lengths, sequences per document."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        with _naming(self.bin_tmp):
            self._bin.write(data)
        self._digest.update(data)
        self._lengths.append(np.asarray(sequence_lengths, dtype=np.int32))
        ends = self.sequences + np.cumsum(sequences_per_document, dtype=np.int64)
        self._docs.append(ends)
        self.tokens += int(len(tokens))
        self.sequences += int(len(sequence_lengths))
        self.documents += int(len(sequences_per_document))
        fault_point("mid-shard", self.prefix.name)

    def finish(self) -> dict:
        """Writes the index, checks both files on disk, renames them; returns the shard record."""
        with _naming(self.bin_tmp):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        index = encode_index(self.dtype, lengths, np.concatenate(self._docs))
        with _naming(self.idx_tmp), open(self.idx_tmp, "wb") as handle:
            handle.write(index)
            handle.flush()
            os.fsync(handle.fileno())
        record = {
            "name": self.prefix.name, "documents": self.documents, "sequences": self.sequences,
            "tokens": self.tokens, "bin_bytes": self.tokens * self.dtype.itemsize,
            "idx_bytes": len(index), "bin_sha256": self._digest.hexdigest(),
            "idx_sha256": hashlib.sha256(index).hexdigest(),
        }
        problems = check_shard_files(self.bin_tmp, self.idx_tmp, record, self.dtype)
        if problems:
            raise ShardFormatError(f"shard {self.prefix.name} failed its check after writing: "
                                   + "; ".join(problems))
        fault_point("before-rename", self.prefix.name)
        os.replace(self.idx_tmp, self.prefix.with_name(self.prefix.name + ".idx"))
        fault_point("between-renames", self.prefix.name)
        os.replace(self.bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
        return record

    def abandon(self) -> None:
        try:
            self._bin.close()
        except OSError:
            pass  # a full disk fails the final flush too; the file is removed anyway
        for path in (self.bin_tmp, self.idx_tmp):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path: Path):
    """Adds the file name to an OSError that lacks one (a failed write() on a full disk)."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def read_index(path: str | os.PathLike) -> dict:
    """Parses an ``.idx`` file; raises ShardFormatError naming the file on any inconsistency."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < _HEADER.size:
        raise ShardFormatError(f"{path}: {len(raw)} bytes, shorter than the {_HEADER.size}-byte "
                               "MMIDIDX header (truncated?)")
    magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise ShardFormatError(f"{path}: magic {magic!r}, expected {INDEX_MAGIC!r}")
    if version != INDEX_VERSION:
        raise ShardFormatError(f"{path}: version {version}, expected {INDEX_VERSION}")
    if code not in DTYPE_CODES:
        raise ShardFormatError(f"{path}: dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
    expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
    if len(raw) < expected:
        raise ShardFormatError(f"{path}: {len(raw)} bytes, expected at least {expected} for "
                               f"{n_seq} sequences and {n_doc} document entries (truncated?)")
    offset = _HEADER.size
    lengths = np.frombuffer(raw, np.int32, n_seq, offset)
    pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, offset + 12 * n_seq)
    return {"dtype": DTYPE_CODES[code], "lengths": lengths, "pointers": pointers,
            "document_index": docs}


def check_shard_files(bin_path: Path, idx_path: Path, record: dict, dtype: np.dtype) -> list[str]:
    """Every way the shard's files differ from ``record`` (empty list: the shard is good)."""
    problems = []
    for path, key in ((bin_path, "bin"), (idx_path, "idx")):
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != record[f"{key}_bytes"]:
            problems.append(f"{path}: size {size} bytes, manifest says {record[f'{key}_bytes']}")
            continue
        digest = sha256_file(path)
        if digest != record[f"{key}_sha256"]:
            problems.append(f"{path}: sha256 {digest}, manifest says {record[f'{key}_sha256']}")
    if problems:
        return problems
    index = read_index(idx_path)
    if index["dtype"] != np.dtype(dtype):
        problems.append(f"{idx_path}: dtype {index['dtype']}, manifest says {np.dtype(dtype)}")
    if len(index["lengths"]) != record["sequences"]:
        problems.append(f"{idx_path}: {len(index['lengths'])} sequences, manifest says "
                        f"{record['sequences']}")
    if len(index["document_index"]) != record["documents"] + 1:
        problems.append(f"{idx_path}: {len(index['document_index']) - 1} documents, manifest "
                        f"says {record['documents']}")
    if int(index["lengths"].sum()) != record["tokens"]:
        problems.append(f"{idx_path}: sequence lengths sum to {int(index['lengths'].sum())} "
                        f"tokens, manifest says {record['tokens']}")
    return problems


class IndexedShard:
    """A read-only, memory-mapped view of one shard: ``tokens`` (all of them), sequences, documents.

    Nothing is read until it is touched, so many ranks can open the same shards cheaply.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        index = read_index(self.prefix.with_name(self.prefix.name + ".idx"))
        self.dtype: np.dtype = index["dtype"]
        self.sequence_lengths: np.ndarray = index["lengths"]
        self.sequence_pointers: np.ndarray = index["pointers"]
        self.document_index: np.ndarray = index["document_index"]
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        expected = int(self.sequence_lengths.sum()) * self.dtype.itemsize
        size = bin_path.stat().st_size
        if size != expected:
            raise ShardFormatError(f"{bin_path}: expected {expected} bytes (as its index "
                                   f"describes), found {size} (truncated or overwritten?)")
        self.tokens: np.ndarray = (np.memmap(bin_path, dtype=self.dtype, mode="r") if size
                                   else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def document(self, i: int) -> np.ndarray:
        first, last = int(self.document_index[i]), int(self.document_index[i + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        end = int(self.sequence_pointers[last - 1]) // self.dtype.itemsize + int(
            self.sequence_lengths[last - 1])
        return self.tokens[start:end]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document's sequences are contiguous)."""
        cumulative = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cumulative[self.document_index[1:]] - cumulative[self.document_index[:-1]]
