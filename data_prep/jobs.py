"""The encode jobs behind the command line: a monolingual corpus, or aligned parallel sides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from .encode import EncodeOptions, EncodeSummary, write_splits
from .sources import DataPrepError, DocChunk, ReadStats, SourceSpec, _decoded_lines, input_bytes, iter_chunks


def _settings(options: EncodeOptions, source: dict) -> dict:
    """What must match for a resumed run to continue a split (num_proc and chunking may change)."""
    return {"source": source, "eos": options.eos, "shard_bytes": options.shard_bytes}


def encode_corpus(spec: SourceSpec, options: EncodeOptions,
                  command: list[str] | None = None) -> tuple[EncodeSummary, dict]:
    """Encodes one split of a monolingual corpus (text, JSONL, Parquet, saved or hub dataset)."""
    stats = ReadStats()
    source = spec.describe(options.output)

    def chunks() -> Iterator[tuple]:
        return ((chunk,) for chunk in iter_chunks(spec, stats, options.chunk_bytes))

    def record(manifest: dict) -> None:
        entry = manifest["splits"][options.split]
        entry["source"] = source
        entry["command"] = command if command is not None else sys.argv

    total = input_bytes(spec) if spec.resolved_format() == "text" else None
    summary, manifest = write_splits(
        chunks, [options.split], options, {options.split: _settings(options, source)},
        extra_manifest=record, progress_total=total,
        progress_counter=(lambda: stats.bytes) if total is not None else None)
    if not summary.already_complete:
        manifest["splits"][options.split]["read"] = stats.as_dict()
        from sparse_moe.data.corpus import write_manifest
        write_manifest(options.output, manifest)
    return summary, manifest


def _count_lines(path: Path, spec: SourceSpec) -> int:
    return sum(1 for _ in _decoded_lines(path, spec, ReadStats()))


def _parallel_chunks(src: Path | None, tgt: Path | None, tsv: Path | None, spec: SourceSpec,
                     stats: ReadStats, chunk_bytes: int) -> Iterator[tuple]:
    """(source, target) chunks of one-sentence documents; pairs with a blank side are dropped."""
    if tsv is not None:
        pairs = (_split_tsv(line, tsv, n) for n, line in
                 enumerate(_decoded_lines(tsv, spec, stats), 1))
    else:
        pairs = zip(_decoded_lines(src, spec, stats), _decoded_lines(tgt, spec, ReadStats()))
    left_side, right_side, size = [], [], 0
    for left, right in pairs:
        if not left.strip() or not right.strip():
            stats.blank_lines += 1
            continue
        left_side.append(left)
        right_side.append(right)
        size += len(left) + len(right)
        if size >= chunk_bytes:
            yield DocChunk(left_side), DocChunk(right_side)
            left_side, right_side, size = [], [], 0
    if left_side:
        yield DocChunk(left_side), DocChunk(right_side)


def _split_tsv(line: str, path: Path, number: int) -> tuple[str, str]:
    parts = line.split("\t")
    if len(parts) < 2:
        raise DataPrepError(f"{path}:{number}: expected 'source<TAB>target', found no tab in "
                            f"{line[:60]!r}")
    return parts[0], parts[1]


def encode_parallel(options: EncodeOptions, spec: SourceSpec, source: str | None = None,
                    target: str | None = None, tsv: str | None = None, src_lang: str = "src",
                    tgt_lang: str = "tgt", command: list[str] | None = None
                    ) -> tuple[EncodeSummary, dict]:
    """Encodes aligned source/target files (or one TSV) into aligned shards, one set per side.

    Both sides' shards hold the same sentences: shard i of the source side and shard i of the
    target side have equal document counts, so pair j is document j on each side.
    """
    if tsv is None and (source is None or target is None):
        given = [name for name, value in (("--source", source), ("--target", target)) if value]
        raise DataPrepError("encode-parallel: expected --source and --target (aligned files) "
                            f"or --tsv, found {' and '.join(given) if given else 'none of them'}")
    if tsv is not None and (source is not None or target is not None):
        raise DataPrepError("encode-parallel: expected either --tsv or --source/--target, "
                            "found both")
    src_path = Path(source) if source else None
    tgt_path = Path(target) if target else None
    tsv_path = Path(tsv) if tsv else None
    if tsv_path is None:
        counts = {p: _count_lines(p, spec) for p in (src_path, tgt_path)}
        if counts[src_path] != counts[tgt_path]:
            raise DataPrepError(
                f"parallel files are misaligned: {src_path} has {counts[src_path]:,} lines, "
                f"{tgt_path} has {counts[tgt_path]:,}; expected the same number (one sentence "
                "per line, in the same order)")
    files = [p for p in (src_path, tgt_path, tsv_path) if p is not None]
    described = SourceSpec([str(p) for p in files], format="text", encoding=spec.encoding,
                           errors=spec.errors).describe(options.output)
    described["layout"] = "tsv" if tsv_path else "aligned files"
    splits = [f"{options.split}.{src_lang}", f"{options.split}.{tgt_lang}"]
    stats = ReadStats()

    def record(manifest: dict) -> None:
        manifest.setdefault("parallel", {})[options.split] = {"source": splits[0],
                                                             "target": splits[1]}
        for name in splits:
            manifest["splits"][name]["source"] = described
            manifest["splits"][name]["command"] = command if command is not None else sys.argv

    settings = {name: _settings(options, {**described, "side": name}) for name in splits}
    summary, manifest = write_splits(
        lambda: _parallel_chunks(src_path, tgt_path, tsv_path, spec, stats, options.chunk_bytes),
        splits, options,
        settings, extra_manifest=record)
    if not summary.already_complete:
        for name in splits:
            manifest["splits"][name]["read"] = stats.as_dict()
        from sparse_moe.data.corpus import write_manifest
        write_manifest(options.output, manifest)
    return summary, manifest
