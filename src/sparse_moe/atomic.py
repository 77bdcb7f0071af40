"""Files that are either the old version or the new one, never a torn mix.

Every file the project writes for another program, or for itself after a restart (manifests,
the checkpoint pointer, configs, summaries, metrics, vocabularies, tokenizers), goes through
:func:`atomic_write`: the data is written to a temporary file beside the target and renamed
over it, which POSIX makes atomic. A failed write leaves no temporary file behind. Each file
has one writer (rank 0, or the one data-prep process), so the temporary name is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, data: str | bytes, *, durable: bool = False,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Replaces ``path`` by ``data`` (text is written as UTF-8) in one rename.

    ``durable`` also flushes the file and the directory entry to the device before and after
    the rename, for files whose loss on a power cut would lose work (the checkpoint pointer).
    ``before_replace`` runs between the write and the rename (fault-injection points).
    """
    path = Path(path)
    # One temporary name per target: one left by a killed writer is replaced by the next write.
    tmp = path.with_name(f".{path.name}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as file:
            file.write(payload)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flushes a directory's entries (a rename into it) to the device."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
