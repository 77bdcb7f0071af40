"""Checkpoints that are either complete or invisible.

DeepSpeed writes a checkpoint's files straight to their final names and then overwrites the
``latest`` pointer in place, so a process killed during a save (a preemption that ran out of
time, a node failure, ``kill -9``) can leave ``latest`` naming a half-written checkpoint, or a
half-written ``latest``. Here the files go through DeepSpeed's own checkpoint engine
(``engine.save_checkpoint(..., save_latest=False)``), and the pointer is the commit:

1. every rank writes its files and ``fsync``s them (the checkpoint engine's ``save`` is wrapped
   to learn which files this rank wrote, and to turn a write error into a report instead of
   leaving the other ranks stuck in DeepSpeed's barriers);
2. the ranks agree that every rank succeeded (one ``all_gather_object`` of error texts);
3. rank 0 replaces ``latest`` atomically: temporary file, ``fsync``, ``os.replace``, ``fsync``
   of the directory;
4. only then are old checkpoints pruned, never the one ``latest`` names.

A process killed at any moment leaves ``latest`` naming the previous complete checkpoint. A
failed write (disk full, read-only directory) raises :class:`CheckpointWriteError` on every rank,
naming the rank and the file, and leaves ``latest`` as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from sparse_moe.atomic import atomic_write, fsync_directory
from sparse_moe.parallel import deepspeed_internals as ds_internals
from sparse_moe.train.checkpoint.files import LATEST, checkpoint_tag, read_latest, tag_step
from sparse_moe.train.errors import CheckpointWriteError
from sparse_moe.train.fault_injection import FaultHooks

fsync_path = fsync_directory  # flushes a file's, or a directory's entries', data to the device


def write_latest(directory: Path, tag: str) -> None:
    """Points ``latest`` at ``tag``: readers see the old or the new tag, never a partial file."""
    atomic_write(directory / LATEST, tag, durable=True)


class RecordingWriter:
    """Wraps a DeepSpeed checkpoint engine's ``save`` for one checkpoint at a time.

    Records the files this rank wrote (to ``fsync`` them) and the first write error, after which
    the rank writes nothing more but still takes part in DeepSpeed's collectives, so that every
    rank reaches the agreement step and fails together with the same message.
    """

    def __init__(self, engine: Any, faults: FaultHooks) -> None:
        ds_internals.intercept_checkpoint_writes(engine, self._write)
        self.faults = faults
        self.written: list[Path] = []
        self.error: str | None = None

    def begin(self) -> None:
        self.written, self.error = [], None
        self.faults.begin_save()

    def _write(self, save: Callable[[Any, str], None], state_dict: Any, path: str) -> None:
        if self.error is not None:
            return
        try:
            # DeepSpeed logs and ignores a failed makedirs; this raises the real reason instead.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.faults.before_write(path)
            save(state_dict, path)
            self.written.append(Path(path))
            self.faults.after_write(path)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports ENOSPC as RuntimeError
            self.error = f"writing {path}: {err}"

    def flush(self) -> None:
        """``fsync``s the files written and their directories; records an error instead of raising."""
        if self.error is not None:
            return
        try:
            for path in self.written:
                fsync_path(path)
            for parent in sorted({p.parent for p in self.written}):
                fsync_path(parent)
        except OSError as err:
            self.error = f"flushing {err.filename}: {err}"


def agree_or_raise(local_error: str | None, what: str, directory: Path) -> None:
    """Every rank learns every rank's error; all raise the same message if there was one."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error)
    failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
    if failed:
        previous = read_latest(directory)
        kept = (f"{directory / LATEST} still names {previous}, which is complete and loads"
                if previous else f"there is no earlier checkpoint in {directory}")
        raise CheckpointWriteError(f"{what} failed: " + "; ".join(failed) + f". {kept}.")


def save_checkpoint(engine: Any, writer: RecordingWriter, directory: Path, step: int,
                    client_state: dict[str, Any], keep_last: int) -> str:
    """Writes ``step_XXXXXXXX`` on every rank, commits it through ``latest``, prunes old ones.

    A step that ``latest`` already names (a preemption right after a periodic save, or a
    finished run resumed again) is not written again: rewriting the committed checkpoint in
    place would expose it to a kill. Rank 0 decides, so every rank takes the same branch.
    """
    tag = checkpoint_tag(step)
    rank = dist.get_rank()
    committed = [read_latest(directory) == tag if rank == 0 else None]
    dist.broadcast_object_list(committed, src=0)
    if committed[0]:
        return tag
    if rank == 0:
        remove_uncommitted(directory, tag)  # a save of this step that was interrupted before
    writer.begin()
    # DeepSpeed's first barrier orders the removal above before any rank writes.
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    writer.flush()
    agree_or_raise(writer.error, f"saving checkpoint {directory / tag}", directory)
    pointer_error = None
    if rank == 0:
        try:
            write_latest(directory, tag)
        except OSError as err:
            pointer_error = f"writing {directory / LATEST}: {err}"
    agree_or_raise(pointer_error, f"committing checkpoint {directory / tag}", directory)
    if rank == 0:
        prune_checkpoints(directory, keep_last)
    dist.barrier()
    return tag


def remove_uncommitted(directory: Path, tag: str) -> None:
    """Removes a directory ``tag`` that ``latest`` does not name (left by an interrupted save)."""
    path = directory / tag
    if path.is_dir() and read_latest(directory) != tag:
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Keeps the newest ``keep_last`` committed checkpoints, up to and including ``latest``.

    Deletes older ones, uncommitted ones newer than ``latest`` (an interrupted save, which the
    resumed run writes again) and temporary pointer files. Never deletes what ``latest`` names;
    with no ``latest`` it deletes nothing.
    """
    latest = read_latest(directory)
    latest_step = tag_step(latest) if latest else None
    if latest_step is None:
        return
    tags = sorted((step, path) for path in directory.iterdir()
                  if path.is_dir() and (step := tag_step(path.name)) is not None)
    committed = [path for step, path in tags if step <= latest_step]
    keep = {path.name for path in committed[-keep_last:]} | {latest}
    for _, path in tags:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in directory.glob(f".{LATEST}*.tmp"):
        tmp.unlink(missing_ok=True)
