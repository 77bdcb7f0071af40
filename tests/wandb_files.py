"""An independent reader of W&B's offline run files (``run-<id>.wandb``): what ``wandb sync``
uploads, parsed the way W&B's own service reads it.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of the type byte and the data,
little-endian length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
header is padding. Each record is a ``wandb_internal_pb2.Record`` protobuf, parsed with
wandb's own classes. A tail cut short by a kill is ignored, as W&B's reader does.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero padding, or a torn tail
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            break
        pos += HEADER + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


@dataclass
class OfflineRun:
    run: Any  # wandb_internal_pb2.RunRecord
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per history row
    metrics: list[Any] = field(default_factory=list)  # MetricRecords (define_metric)
    summary: dict[str, Any] = field(default_factory=dict)

    def steps_of(self, key: str) -> list[int]:
        """The ``_step`` of every row holding ``key``, in file order."""
        return [row["_step"] for row in self.history if key in row]

    def values(self, key: str) -> dict[int, Any]:
        return {row["_step"]: row[key] for row in self.history if key in row}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    out = None
    for raw in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out = OfflineRun(record.run)
            for item in record.run.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config" and out is not None:
            for item in record.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history" and out is not None:
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            out.history.append(_group_nested(row))
        elif kind == "metric" and out is not None:
            out.metrics.append(record.metric)
        elif kind == "summary" and out is not None:
            for item in record.summary.update:
                out.summary[_key(item)] = json.loads(item.value_json)
    assert out is not None, f"{path}: no run record"
    return out


def _group_nested(row: dict[str, Any]) -> dict[str, Any]:
    """Media are logged as several keys (``key/_type``, ``key/path``...): one dict per key."""
    grouped: dict[str, Any] = {}
    media = {k.rsplit("/", 1)[0] for k in row if k.endswith("/_type")}
    for key, value in row.items():
        parent, _, leaf = key.rpartition("/")
        if parent in media:
            grouped.setdefault(parent, {})[leaf] = value
        else:
            grouped[key] = value
    return grouped


def offline_run_files(run_dir: Path) -> list[Path]:
    """The offline run files directly under ``<run>/wandb`` (what ``wandb sync`` is given)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
