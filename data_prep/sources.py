"""Inputs a corpus can come from, all yielding documents as lists of text segments (lines).

Plain and gzip'd text is read by a small streaming reader of its own, because it must decode
bytes under an explicit policy (error / replace / skip) and count what it repaired, which the
text loader of ``datasets`` cannot report. Every other format (JSON lines, Parquet, CSV, Arrow,
a dataset saved with ``save_to_disk``, a hub name) is read through ``datasets`` in streaming
mode, so memory does not grow with the corpus and every format ``datasets`` knows works.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sparse_moe.data.corpus import path_in_manifest

DOC_MODES = ("line", "paragraph")
ERROR_POLICIES = ("error", "replace", "skip")
FORMATS = ("auto", "text", "json", "parquet", "csv", "arrow", "saved", "hub")
_SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                   ".arrow": "arrow"}


class DataPrepError(ValueError):
    """Bad input or a bad request; the message names the file, field, expected and found."""


@dataclass
class SourceSpec:
    """Where documents come from and how text is cut into documents."""

    inputs: list[str]
    format: str = "auto"
    field: str = "text"
    doc_mode: str = "line"
    encoding: str = "utf-8"
    errors: str = "error"
    dataset_split: str = "train"
    dataset_config: str | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataPrepError("no input given: pass at least one --input")
        for name, value, allowed in (("format", self.format, FORMATS),
                                     ("doc_mode", self.doc_mode, DOC_MODES),
                                     ("errors", self.errors, ERROR_POLICIES)):
            if value not in allowed:
                raise DataPrepError(f"{name}: expected one of {allowed}, found {value!r}")

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        formats = {_detect_format(p) for p in self.inputs}
        if len(formats) > 1:
            raise DataPrepError(f"inputs mix formats {sorted(formats)}; pass --format")
        return formats.pop()

    def describe(self, directory: str | Path | None = None) -> dict:
        """Identity of the input (paths, sizes, mtimes): a resumed run must see the same input.

        Paths inside ``directory`` (the corpus being written) are recorded relative to it.
        """
        fmt = self.resolved_format()
        files = []
        if fmt != "hub":
            for name in self.inputs:
                if not Path(name).exists():
                    raise DataPrepError(f"input {name} does not exist (expected a file or a "
                                        "dataset directory)")
                stat = Path(name).stat()
                if Path(name).is_file() and stat.st_size == 0:
                    raise DataPrepError(f"input file {name} is empty: expected text to encode, "
                                        "found 0 bytes")
                path = path_in_manifest(name, directory) if directory else str(Path(name).resolve())
                files.append({"path": path, "bytes": stat.st_size,
                              "mtime_ns": stat.st_mtime_ns})
        return {"format": fmt, "inputs": files if files else list(self.inputs),
                "field": self.field, "doc_mode": self.doc_mode, "encoding": self.encoding,
                "errors": self.errors, "dataset_split": self.dataset_split,
                "dataset_config": self.dataset_config}


def _detect_format(name: str) -> str:
    path = Path(name)
    if not path.exists():
        raise DataPrepError(f"input {name} does not exist (expected a file or a dataset "
                            "directory; for a hub dataset pass --format hub)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
                path / "state.json").exists():
            return "saved"
        raise DataPrepError(f"input {name} is a directory but not a dataset saved with "
                            "save_to_disk (no dataset_info.json / dataset_dict.json)")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return _SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "", "text")


@dataclass
class ReadStats:
    """What the reader met on the way: repaired or dropped lines are counted, never silent."""

    files: int = 0
    lines: int = 0
    bytes: int = 0
    blank_lines: int = 0
    crlf_lines: int = 0
    undecodable_lines: int = 0
    replaced_lines: int = 0
    skipped_lines: int = 0
    rows: int = 0
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "details"}
        out["examples"] = self.details[:10]
        return out


@dataclass
class DocChunk:
    """Consecutive documents in a compact form: their segments, and segments per document.

    ``per_doc`` is None when every document is one segment (the common line-per-document
    case), which keeps the reader's per-line work to a minimum.
    """

    segments: list[str]
    per_doc: list[int] | None = None

    def __len__(self) -> int:
        return len(self.segments) if self.per_doc is None else len(self.per_doc)

    def text_size(self) -> int:
        return sum(map(len, self.segments))

    def drop_first(self, documents: int) -> "DocChunk":
        if self.per_doc is None:
            return DocChunk(self.segments[documents:], None)
        return DocChunk(self.segments[sum(self.per_doc[:documents]):], self.per_doc[documents:])


def iter_chunks(spec: SourceSpec, stats: ReadStats, chunk_bytes: int = 1 << 20
                ) -> Iterator[DocChunk]:
    """Documents in input order, grouped into chunks of roughly ``chunk_bytes`` of text."""
    if spec.resolved_format() == "text" and spec.doc_mode == "line":
        for name in spec.inputs:
            yield from _text_line_chunks(Path(name), spec, stats, chunk_bytes)
        return
    segments: list[str] = []
    per_doc: list[int] = []
    size = 0
    for doc in iter_documents(spec, stats):
        segments.extend(doc)
        per_doc.append(len(doc))
        size += sum(map(len, doc))
        if size >= chunk_bytes:
            yield DocChunk(segments, per_doc)
            segments, per_doc, size = [], [], 0
    if per_doc:
        yield DocChunk(segments, per_doc)


def _text_line_chunks(path: Path, spec: SourceSpec, stats: ReadStats, chunk_bytes: int
                      ) -> Iterator[DocChunk]:
    """The fast path: a document per non-blank line, a whole block of lines at a time."""
    stats.files += 1
    produced = False
    for lines in _decoded_blocks(path, spec, stats, chunk_bytes):
        segments = [line for line in lines if line.strip()]
        stats.blank_lines += len(lines) - len(segments)
        if segments:
            produced = True
            yield DocChunk(segments, None)
    if not produced:
        raise DataPrepError(f"input file {path} holds no text: expected at least one "
                            "non-blank line, found only blank lines")


def iter_documents(spec: SourceSpec, stats: ReadStats) -> Iterator[list[str]]:
    """Documents in input order; each is a non-empty list of non-blank segments."""
    fmt = spec.resolved_format()
    if fmt == "text":
        for name in spec.inputs:
            yield from _text_documents(Path(name), spec, stats)
    else:
        for text in _dataset_texts(spec, fmt, stats):
            segments = [s for s in text.replace("\r\n", "\n").split("\n") if s.strip()]
            if segments:
                if spec.doc_mode == "line":
                    for segment in segments:
                        yield [segment]
                else:
                    yield segments


def input_bytes(spec: SourceSpec) -> int | None:
    """Total size of the input files, for a progress bar (None where unknown)."""
    if spec.resolved_format() == "hub":
        return None
    total = 0
    for name in spec.inputs:
        path = Path(name)
        if path.is_file():
            with open(path, "rb") as probe:
                if probe.read(2) == b"\x1f\x8b":
                    return None   # decompressed size unknown: count documents instead
        total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
            else path.stat().st_size
    return total


def _open_binary(path: Path):
    if not path.exists():
        raise DataPrepError(f"input file {path} does not exist")
    if not path.is_file():
        raise DataPrepError(f"input {path} is not a regular file")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if not magic:
        raise DataPrepError(f"input file {path} is empty: expected text to encode, found 0 bytes")
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _text_documents(path: Path, spec: SourceSpec, stats: ReadStats) -> Iterator[list[str]]:
    stats.files += 1
    paragraph: list[str] = []
    produced = False
    for line in _decoded_lines(path, spec, stats):
        if not line.strip():
            stats.blank_lines += 1
            if paragraph:
                produced = True
                yield paragraph
                paragraph = []
            continue
        if spec.doc_mode == "line":
            produced = True
            yield [line]
        else:
            paragraph.append(line)
    if paragraph:
        produced = True
        yield paragraph
    if not produced:
        raise DataPrepError(f"input file {path} holds no text: expected at least one "
                            "non-blank line, found only blank lines")


def _decoded_lines(path: Path, spec: SourceSpec, stats: ReadStats) -> Iterator[str]:
    """Lines without their line ends (LF or CRLF), decoded under the configured policy."""
    for block in _decoded_blocks(path, spec, stats, 1 << 20):
        yield from block


def _decoded_blocks(path: Path, spec: SourceSpec, stats: ReadStats, block_bytes: int
                    ) -> Iterator[list[str]]:
    """Blocks of lines without their line ends (LF or CRLF), decoded under the policy.

    A block is decoded whole (fast); only a block that fails is decoded line by line to find,
    report and repair the bad lines.
    """
    line_number = 0
    with _open_binary(path) as handle:
        while chunk := handle.readlines(block_bytes):
            stats.bytes += sum(map(len, chunk))
            try:
                lines = b"".join(chunk).decode(spec.encoding).split("\n")
                if lines[-1] == "":
                    lines.pop()
            except UnicodeDecodeError:
                lines = []
                for offset, raw in enumerate(chunk):
                    decoded = _decode_line(raw, path, line_number + offset + 1, spec, stats)
                    if decoded is not None:
                        lines.append(decoded[:-1] if decoded.endswith("\n") else decoded)
            line_number += len(chunk)
            stats.lines += len(lines)
            if any(line.endswith("\r") for line in lines):
                crlf = sum(1 for line in lines if line.endswith("\r"))
                stats.crlf_lines += crlf
                lines = [line[:-1] if line.endswith("\r") else line for line in lines]
            yield lines


def _decode_line(raw: bytes, path: Path, line_number: int, spec: SourceSpec,
                 stats: ReadStats) -> str | None:
    try:
        return raw.decode(spec.encoding)
    except UnicodeDecodeError as error:
        stats.undecodable_lines += 1
        where = (f"{path}:{line_number}: expected {spec.encoding} text, found byte "
                 f"{raw[error.start:error.start + 1]!r} at column {error.start}, not valid "
                 f"{spec.encoding}")
        if spec.errors == "error":
            raise DataPrepError(f"{where}; re-run with --errors replace or --errors skip (counted "
                                "in the manifest), or --encoding latin-1 if the file is Latin-1"
                                ) from None
        if len(stats.details) < 10:
            stats.details.append(where)
        if spec.errors == "skip":
            stats.skipped_lines += 1
            return None
        stats.replaced_lines += 1
        return raw.decode(spec.encoding, errors="replace")


def _dataset_texts(spec: SourceSpec, fmt: str, stats: ReadStats) -> Iterator[str]:
    import datasets

    if fmt == "saved":
        if len(spec.inputs) != 1:
            raise DataPrepError("a saved dataset is one directory; pass a single --input")
        loaded = datasets.load_from_disk(spec.inputs[0])
        if isinstance(loaded, datasets.DatasetDict):
            if spec.dataset_split not in loaded:
                raise DataPrepError(f"{spec.inputs[0]}: no split {spec.dataset_split!r}; it has "
                                    f"{sorted(loaded)} (pass --dataset-split)")
            loaded = loaded[spec.dataset_split]
        source = spec.inputs[0]
        rows = (row for batch in loaded.iter(batch_size=1000)
                for row in _rows_of_batch(batch))
        columns = loaded.column_names
    else:
        for name in spec.inputs if fmt != "hub" else []:
            _open_binary(Path(name)).close()
        if fmt == "hub":
            loaded = datasets.load_dataset(spec.inputs[0], spec.dataset_config,
                                           split=spec.dataset_split, streaming=True)
            source = spec.inputs[0]
        else:
            loaded = datasets.load_dataset(fmt, data_files=list(spec.inputs), split="train",
                                           streaming=True)
            source = ", ".join(spec.inputs)
        rows = iter(loaded)
        columns = None
    if columns is not None and spec.field not in columns:
        raise DataPrepError(f"{source}: no field {spec.field!r}; expected it in every row, "
                            f"found the fields {columns} (pass --field)")
    for row in rows:
        stats.rows += 1
        if spec.field not in row:
            raise DataPrepError(f"{source}: row {stats.rows} has no field {spec.field!r}; "
                                f"expected it in every row, found the fields {sorted(row)} "
                                "(pass --field)")
        value = row[spec.field]
        if value is None:
            stats.blank_lines += 1
            continue
        if not isinstance(value, str):
            raise DataPrepError(f"{source}: row {stats.rows} field {spec.field!r} is "
                                f"{type(value).__name__}, expected a string")
        yield value


def _rows_of_batch(batch: dict) -> Iterator[dict]:
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))

