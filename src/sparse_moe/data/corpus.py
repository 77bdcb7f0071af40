"""A corpus directory: ``manifest.json`` plus Megatron-format shards, opened and checked.

The manifest is the single source of truth about a corpus: which tokenizer wrote it (file hash
and vocabulary size), the token dtype, and for every split the shards with their token and
document counts, sizes and checksums. Training opens a corpus through ``open_corpus`` so that a
corpus encoded with another tokenizer is refused before a single step runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_moe.atomic import atomic_write

from .indexed import IndexedShard, check_shard_files, fault_point, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sparse-moe-corpus"
MANIFEST_VERSION = 1


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete, damaged, or belongs to another tokenizer."""


def load_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CorpusError(f"{path} does not exist: not a corpus directory (expected the "
                          "manifest that `python -m data_prep encode` writes, found no such "
                          "file)")
    try:
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: expected a JSON manifest, found bytes that are not UTF-8 "
                          f"text ({error.reason} at byte {error.start}); restore it or re-run "
                          "the encode") from None
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}: expected a JSON manifest, found text that is not valid "
                          f"JSON ({json_problem(text, error)}); restore it or re-run the "
                          "encode") from None
    if not isinstance(manifest, dict):
        raise CorpusError(f"{path}: expected a JSON object at the top level, found "
                          f"{type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f"{path}: field 'format' is {manifest.get('format')!r}, expected "
                          f"{MANIFEST_FORMAT!r}")
    _check_manifest_fields(path, manifest)
    return manifest


def json_problem(text: str, error: json.JSONDecodeError) -> str:
    """What is wrong with ``text``, in words that do not depend on where the corpus lives.

    A manifest cut short (a full disk, a copy interrupted) is the common case; its decode
    position depends on the length of every path recorded before the cut, so it is named as
    a cut instead. Other damage (a hand edit) is located by line and column.
    """
    if not text.strip():
        return "the file is empty"
    if _ends_inside_a_value(text):
        return "the text ends before its outermost object is closed: cut short?"
    return f"{error.msg} at line {error.lineno} column {error.colno}"


def _ends_inside_a_value(text: str) -> bool:
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return in_string or depth > 0


def path_in_manifest(path: str | os.PathLike, directory: str | os.PathLike) -> str:
    """How a manifest records a file: relative to the corpus directory when inside it.

    A corpus prepared on one machine is often read from another mount; a tokenizer or input
    kept inside the corpus directory then still resolves, and the manifest's bytes do not
    depend on where the directory lives. Files elsewhere keep their absolute path.
    """
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(Path(directory).resolve()).as_posix()
    except ValueError:
        return str(absolute)


def path_from_manifest(recorded: str, directory: str | os.PathLike) -> Path:
    """The file a manifest entry names (the inverse of :func:`path_in_manifest`)."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(directory) / path


_TOKENIZER_FIELDS = {"file": str, "sha256": str, "vocab_size": int, "eos_id": int, "pad_id": int}
_SHARD_FIELDS = {"name": str, "documents": int, "sequences": int, "tokens": int,
                 "bin_bytes": int, "idx_bytes": int, "bin_sha256": str, "idx_sha256": str}
TOKEN_DTYPES = ("uint16", "int32")


def _check_manifest_fields(path: Path, manifest: dict) -> None:
    """Fails naming the first field that is missing or of the wrong kind.

    A hand-edited or foreign manifest would otherwise fail later with a bare KeyError.
    """
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorpusError(f"{path}: field 'version' is {manifest.get('version')!r}, expected "
                          f"{MANIFEST_VERSION}")
    if manifest.get("dtype") not in TOKEN_DTYPES:
        raise CorpusError(f"{path}: field 'dtype' is {manifest.get('dtype')!r}, expected one of "
                          f"{list(TOKEN_DTYPES)}")
    _check_fields(path, "tokenizer", manifest.get("tokenizer"), _TOKENIZER_FIELDS)
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise CorpusError(f"{path}: field 'splits' is {splits!r}, expected an object mapping "
                          "split names to their shards")
    for name, entry in splits.items():
        where = f"splits.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise CorpusError(f"{path}: field '{where}.shards' is missing, expected a list of "
                              "shard records")
        for i, shard in enumerate(entry["shards"]):
            _check_fields(path, f"{where}.shards[{i}]", shard, _SHARD_FIELDS)


def _check_fields(path: Path, where: str, record, fields: dict[str, type]) -> None:
    if not isinstance(record, dict):
        raise CorpusError(f"{path}: field '{where}' is {record!r}, expected an object")
    for key, kind in fields.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorpusError(f"{path}: field '{where}.{key}' is {value!r}, expected "
                              f"{'an integer' if kind is int else 'a string'}")


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Atomic: a reader sees the old manifest or the new one, never a torn file."""
    shards = [s["name"] for entry in manifest.get("splits", {}).values()
              for s in entry.get("shards", [])]
    atomic_write(Path(directory) / MANIFEST_NAME,
                 json.dumps(manifest, indent=2, sort_keys=False) + "\n",
                 before_replace=(lambda: fault_point("manifest-replace", shards[-1]))
                 if shards else None)


def check_tokenizer(manifest: dict, tokenizer, directory: Path) -> None:
    """Refuses a tokenizer (path, or object with ``sha256``/``vocab_size``) the corpus wasn't made with."""
    where = str(directory / MANIFEST_NAME)
    if isinstance(tokenizer, (str, os.PathLike)):
        sha, vocab, name = sha256_file(tokenizer), None, str(tokenizer)
    else:
        sha, vocab, name = tokenizer.sha256, tokenizer.vocab_size, str(tokenizer.path)
    recorded = manifest["tokenizer"]
    shown = "" if vocab is None else f", vocabulary {vocab}"
    if sha != recorded["sha256"]:
        raise CorpusError(f"{where}: corpus was encoded with tokenizer "
                          f"{path_from_manifest(recorded['file'], directory)} "
                          f"(sha256 {recorded['sha256'][:16]}..., vocabulary "
                          f"{recorded['vocab_size']}); expected that tokenizer, but was given "
                          f"{name} (sha256 {sha[:16]}...{shown})")
    if vocab is not None and vocab != recorded["vocab_size"]:
        raise CorpusError(f"{where}: field 'tokenizer.vocab_size': expected {vocab} (the size "
                          f"of {name}), found {recorded['vocab_size']}")


def verify_corpus(directory: str | os.PathLike) -> dict[str, list[str]]:
    """Checks every shard against the manifest; maps each shard file prefix to its problems."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    report: dict[str, list[str]] = {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            prefix = directory / shard["name"]
            try:
                problems = check_shard_files(prefix.with_name(shard["name"] + ".bin"),
                                             prefix.with_name(shard["name"] + ".idx"), shard, dtype)
            except ValueError as error:
                problems = [str(error)]
            report[f"{split}/{shard['name']}"] = problems
        if not entry.get("complete"):
            report[f"{split}/(split)"] = [f"split {split!r} is incomplete: the encode that wrote "
                                          "it was interrupted; re-run it to resume"]
    return report


@dataclass
class SplitData:
    """The shards of one split, in order, as one logical token stream."""

    name: str
    shards: list[IndexedShard]
    entry: dict

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    def token_stream(self) -> "TokenStream":
        return TokenStream([s.tokens for s in self.shards])

    def documents(self):
        for shard in self.shards:
            for i in range(shard.num_documents):
                yield shard.document(i)


class TokenStream:
    """Several memory-mapped token arrays read as one; slices may cross shard boundaries."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] as int64 (a copy: batches must not pin the memory map)."""
        out = np.empty(stop - start, dtype=np.int64)
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self.starts[part])
            take = min(len(out) - filled, len(self.parts[part]) - offset)
            out[filled:filled + take] = self.parts[part][offset:offset + take]
            filled += take
            part += 1
        return out


class Corpus:
    """An opened corpus directory; ``split(name)`` gives memory-mapped shards of one split."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self.pad_id: int = manifest["tokenizer"]["pad_id"]

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitData:
        splits = self.manifest["splits"]
        if name not in splits:
            raise CorpusError(f"{self.directory / MANIFEST_NAME}: no split {name!r}; expected "
                              f"one of {sorted(splits)}, found {name!r}")
        entry = splits[name]
        if not entry.get("complete"):
            raise CorpusError(f"{self.directory / MANIFEST_NAME}: split {name!r} is incomplete: "
                              f"expected 'complete': true, found false after "
                              f"{len(entry['shards'])} finished shard(s) (its encode was "
                              "interrupted); re-run the same encode command to finish it")
        shards = []
        for shard in entry["shards"]:
            opened = IndexedShard(self.directory / shard["name"])
            if len(opened.tokens) != shard["tokens"]:
                raise CorpusError(f"{self.directory / shard['name']}.bin: expected "
                                  f"{shard['tokens']} tokens (as the manifest says), found "
                                  f"{len(opened.tokens)}")
            shards.append(opened)
        return SplitData(name, shards, entry)


def open_corpus(directory: str | os.PathLike, tokenizer=None, verify: bool = False) -> Corpus:
    """Opens a corpus, checking it against ``tokenizer`` (a path or a loaded tokenizer).

    ``verify=True`` also re-hashes every shard (slow for big corpora; ``data_prep verify`` does
    the same from the command line).
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    if tokenizer is not None:
        check_tokenizer(manifest, tokenizer, directory)
    if verify:
        bad = {name: p for name, p in verify_corpus(directory).items() if p}
        if bad:
            raise CorpusError(f"{directory}: damaged shards: " + "; ".join(
                f"{name}: {', '.join(p)}" for name, p in bad.items()))
    return Corpus(directory, manifest)
