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

from .indexed import IndexedShard, check_shard_files, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sparse-moe-corpus"
MANIFEST_VERSION = 1


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete, damaged, or belongs to another tokenizer."""


def load_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CorpusError(f"{path} does not exist: not a corpus directory (run `python -m "
                          "data_prep encode` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}: not valid JSON ({error})") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f"{path}: field 'format' is {manifest.get('format')!r}, expected "
                          f"{MANIFEST_FORMAT!r}")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Atomic: a reader sees the old manifest or the new one, never a torn file."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_tokenizer(manifest: dict, tokenizer, where: str) -> None:
    """Refuses a tokenizer (path, or object with ``sha256``/``vocab_size``) the corpus wasn't made with."""
    if isinstance(tokenizer, (str, os.PathLike)):
        sha, vocab, name = sha256_file(tokenizer), None, str(tokenizer)
    else:
        sha, vocab, name = tokenizer.sha256, tokenizer.vocab_size, str(tokenizer.path)
    recorded = manifest["tokenizer"]
    if sha != recorded["sha256"]:
        raise CorpusError(f"{where}: corpus was encoded with tokenizer {recorded['file']} "
                          f"(sha256 {recorded['sha256'][:16]}..., vocabulary {recorded['vocab_size']}), "
                          f"but training was given {name} (sha256 {sha[:16]}...)")
    if vocab is not None and vocab != recorded["vocab_size"]:
        raise CorpusError(f"{where}: vocabulary size {recorded['vocab_size']} in the manifest, "
                          f"tokenizer {name} has {vocab}")


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
            raise CorpusError(f"{self.directory / MANIFEST_NAME}: no split {name!r}; it has "
                              f"{sorted(splits)}")
        entry = splits[name]
        if not entry.get("complete"):
            raise CorpusError(f"{self.directory}: split {name!r} is incomplete (its encode was "
                              "interrupted); re-run the same encode command to finish it")
        shards = []
        for shard in entry["shards"]:
            opened = IndexedShard(self.directory / shard["name"])
            if len(opened.tokens) != shard["tokens"]:
                raise CorpusError(f"{self.directory / shard['name']}.bin: {len(opened.tokens)} "
                                  f"tokens, manifest says {shard['tokens']}")
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
        check_tokenizer(manifest, tokenizer, str(directory / MANIFEST_NAME))
    if verify:
        bad = {name: p for name, p in verify_corpus(directory).items() if p}
        if bad:
            raise CorpusError(f"{directory}: damaged shards: " + "; ".join(
                f"{name}: {', '.join(p)}" for name, p in bad.items()))
    return Corpus(directory, manifest)
