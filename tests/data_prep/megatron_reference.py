"""An independent reader of Megatron-LM's MMIDIDX index, written from its published layout.

Deliberately shares no code with ``sparse_moe.data.indexed``: header fields are unpacked one by
one with ``struct`` and the arrays are decoded from the documented widths.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

# Published dtype codes of the index header.
CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def read_shard(prefix: Path) -> dict:
    raw = Path(str(prefix) + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00", raw[:9]
    (version,) = struct.unpack("<Q", raw[9:17])
    assert version == 1
    code = raw[17]
    (n_seq,) = struct.unpack("<Q", raw[18:26])
    (n_doc,) = struct.unpack("<Q", raw[26:34])
    pos = 34
    lengths = struct.unpack(f"<{n_seq}i", raw[pos:pos + 4 * n_seq])
    pos += 4 * n_seq
    pointers = struct.unpack(f"<{n_seq}q", raw[pos:pos + 8 * n_seq])
    pos += 8 * n_seq
    doc_index = struct.unpack(f"<{n_doc}q", raw[pos:pos + 8 * n_doc])
    pos += 8 * n_doc
    assert pos == len(raw), (pos, len(raw))
    dtype = np.dtype(CODES[code])
    data = Path(str(prefix) + ".bin").read_bytes()
    sequences = []
    for length, pointer in zip(lengths, pointers):
        sequences.append(np.frombuffer(data[pointer:pointer + length * dtype.itemsize],
                                       dtype=dtype).tolist())
    documents = []
    for first, last in zip(doc_index[:-1], doc_index[1:]):
        documents.append([token for seq in sequences[first:last] for token in seq])
    return {"code": code, "dtype": dtype, "sequences": sequences, "documents": documents,
            "doc_index": list(doc_index)}


def read_split(directory: Path, manifest: dict, split: str) -> dict:
    """All documents and sequences of a split, shard after shard, in manifest order."""
    out = {"documents": [], "sequences": [], "codes": set()}
    for shard in manifest["splits"][split]["shards"]:
        parsed = read_shard(directory / shard["name"])
        out["documents"] += parsed["documents"]
        out["sequences"] += parsed["sequences"]
        out["codes"].add(parsed["code"])
    return out
