"""Runs a function on several CPU processes over gloo, failing (never hanging) on deadlock.

Each rank runs ``worker(rank, world_size, *args)`` after ``deepspeed.init_distributed``
with a short process-group timeout, and sends back either its return value or its
traceback. If any rank is silent past ``timeout`` seconds every rank is killed and the
call raises, naming the ranks that did not finish.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch.multiprocessing as mp

from tests.gpus import gpu_environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(worker: Callable[..., Any], rank: int, world_size: int, port: int,
           results: Any, collective_timeout: float, args: tuple, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size),
                      DS_ACCELERATOR="cuda" if backend == "nccl" else "cpu")
    try:
        import torch

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        from sparse_moe.parallel.startup import init_deepspeed_distributed

        init_deepspeed_distributed(backend, timeout=timedelta(seconds=collective_timeout))
        # pickled here by value: torch's queue would share tensors through file descriptors
        # that vanish when this process exits
        results.put((rank, "ok", pickle.dumps(worker(rank, world_size, *args))))
    except BaseException:  # report everything, including collective timeouts
        results.put((rank, "error", traceback.format_exc()))


@contextmanager
def _child_environment(env: dict[str, str] | None) -> Iterator[None]:
    """``os.environ`` replaced by ``env`` while children start (this process's CUDA, already
    started, keeps its GPUs whatever the variables say)."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_distributed(worker: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 150.0, collective_timeout: float = 60.0,
                    backend: str = "gloo") -> list[Any]:
    """Returns every rank's result, in rank order; raises if a rank failed or hung.

    ``backend="nccl"`` gives rank r GPU r (CUDA tests); gloo runs on the CPU.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(worker, rank, world_size, port, results, collective_timeout, args,
                               backend))
             for rank in range(world_size)]
    with _child_environment(gpu_environment(dict(os.environ)) if backend == "nccl" else None):
        for proc in procs:
            proc.start()  # a spawned child starts with the parent's environment of this moment
    deadline = time.monotonic() + timeout
    done: dict[int, tuple[str, Any]] = {}
    try:
        while len(done) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within "
                                   f"{timeout:.0f}s (deadlock?); finished: {sorted(done)}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
                if not dead:
                    continue
                try:  # a rank that exits right after reporting may still be in the queue
                    rank, status, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise RuntimeError(f"ranks {dead} exited without a result (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})") from None
            done[rank] = (status, payload)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
    finally:
        finished = len(done) == world_size and all(s == "ok" for s, _ in done.values())
        for proc in procs:  # after a failure the others may sit in a collective: stop them
            proc.join(timeout=5 if finished else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [pickle.loads(done[r][1]) for r in range(world_size)]
