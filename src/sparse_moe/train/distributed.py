"""Process start-up for every launcher: ``deepspeed``, ``torchrun``, ``srun`` or none.

DeepSpeed reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``. The
``deepspeed`` launcher and ``torchrun`` set them; under ``srun`` without a launcher they are
derived from Slurm's variables; a plain ``python -m sparse_moe.train`` is a world of one.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import time
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_moe.parallel.startup import init_deepspeed_distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.CalledProcessError):
        return nodes.split(",")[0]


def slurm_port(env: Any) -> int:
    """The rendezvous port of a Slurm job's start, as ``smoe_port`` in slurm/lib.sh computes it:
    below Linux's ephemeral range (32768-60999), another one after a requeue."""
    job, restart = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0"))
    return 15000 + (job * 10 + restart) % 10000


def fill_launcher_environment() -> None:
    """Sets the rendezvous variables when no launcher did (srun tasks, or a single process)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", str(slurm_port(env)))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_minutes: float = 30.0) -> torch.device:
    """Initialises DeepSpeed's communication backend and returns this rank's device.

    NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator). ``timeout_minutes`` bounds every
    collective, so a dead rank ends the others with an error instead of a hang.
    """
    fill_launcher_environment()
    if torch.cuda.is_available():
        index = local_gpu_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    init_deepspeed_distributed(backend, timeout=timedelta(minutes=timeout_minutes))
    return device


def cpu_binding() -> dict[str, Any]:
    """Where this process may run: its host, the CPUs of its affinity mask, and its threads."""
    import socket

    cpus = sorted(os.sched_getaffinity(0))
    return {"host": socket.gethostname().split(".")[0], "cpus": cpus,
            "threads": torch.get_num_threads()}


def describe_cpu_binding(bindings: list[dict[str, Any]], detail_up_to: int = 16) -> str:
    """One line for the log: every rank's CPUs up to ``detail_up_to`` ranks, else the counts.

    What to check in a job's first minute: a rank that has fewer CPUs than its threads (an
    ``srun`` without ``--cpus-per-task``) runs them on top of each other."""
    if len(bindings) <= detail_up_to:
        parts = [f"rank {rank} on {b['host']}: {len(b['cpus'])} CPU(s) "
                 f"[{_ranges(b['cpus'])}], {b['threads']} thread(s)"
                 for rank, b in enumerate(bindings)]
        return "CPU binding: " + "; ".join(parts)
    counts: dict[tuple[int, int], int] = {}
    for b in bindings:
        key = (len(b["cpus"]), b["threads"])
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{n} rank(s) with {cpus} CPU(s) and {threads} thread(s)"
             for (cpus, threads), n in sorted(counts.items())]
    return "CPU binding: " + "; ".join(parts)


def _ranges(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            out.append(f"{start}" if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(out)


def local_gpu_index(local_rank: int, visible: int) -> int:
    """This process's GPU: the one its ``LOCAL_RANK`` names among those it sees.

    DeepSpeed too picks the GPU by ``LOCAL_RANK`` (its process group's ``device_id``, its
    engine's device), so a process must see GPU ``LOCAL_RANK``. Launchers that bind one GPU
    to each task (``srun --gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per task) leave
    local rank 3 a single GPU, numbered 0: that is refused here with what to change, before
    NCCL fails on a device that does not exist.
    """
    if local_rank < visible:
        return local_rank
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); DeepSpeed selects the GPU by "
        f"LOCAL_RANK, so every process of a node must see all of the node's GPUs: launch with "
        f"--gpus-per-node instead of --gpus-per-task or per-task GPU binding (the sbatch "
        f"templates in slurm/ do), or start at most {visible} process(es) per node")


def collective_device(group: Any = None) -> torch.device:
    """The device whose tensors the group's backend reduces: NCCL takes CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(values: Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> Tensor:
    """All-reduces a host tensor in place, through the backend's device (bookkeeping: losses
    summed over an evaluation, flags, logged metrics), and returns it."""
    device = collective_device(group)
    if device.type == "cpu":
        dist.all_reduce(values, op=op, group=group)
        return values
    on_device = values.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return values.copy_(on_device.cpu())



def shut_down_distributed() -> None:
    """Destroys every process group, and lets their threads finish, while Python is alive.

    Call it once nothing refers to the engine, model or dispatchers any more. A gloo worker
    thread that completes a collective then drops its work object, and with it the last
    reference to tensors that Python had already let go of; freeing those takes the GIL. Once
    the interpreter is finalizing, Python ends such a thread with ``pthread_exit`` inside a C++
    destructor and the process aborts (SIGABRT, "terminate called without an active
    exception") after a run that succeeded: a race that busy cores make likely. DeepSpeed's
    ``destroy_process_group`` destroys the groups and drops DeepSpeed's own references to them
    (``deepspeed.utils.groups``); the collection then frees the groups that dead objects still
    held, and each group's destructor joins its worker threads.
    """
    if dist.is_initialized():
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    gc.collect()


# Texts by which gloo, NCCL and the c10d store report a peer that went away or a timeout.
_COLLECTIVE_FAILURE_TEXTS = ("connection closed by peer", "connection reset by peer",
                             "broken pipe", "timed out", "timeout", "gloo", "nccl",
                             "socket", "connection refused")


def is_collective_failure(err: BaseException) -> bool:
    """Whether an exception is a collective (or its store) failing, not a bug in the step."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(t in text for t in _COLLECTIVE_FAILURE_TEXTS)


def roll_call_key() -> str:
    """A key prefix for :func:`answering_ranks`, the same on every rank (one broadcast)."""
    key = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(key, src=0)
    return f"sparse_moe/roll_call/{key[0]}"


def answering_ranks(prefix: str, wait_seconds: float = 5.0) -> list[int] | None:
    """After a failed collective: the ranks that answer on the rendezvous store within the wait.

    Every surviving rank that fails calls this, so a rank that never answers died or hung.
    The store is torchrun's agent (which outlives its workers) or, under other launchers, rank
    0. Returns None when the store cannot be reached (rank 0 serving it may be the dead one).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=wait_seconds))
        store.set(f"{prefix}/{rank}", "1")
        deadline = time.monotonic() + wait_seconds
        while True:
            alive = [r for r in range(world) if store.check([f"{prefix}/{r}"])]
            if len(alive) == world or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)
    except (RuntimeError, KeyError, ValueError, OSError):
        return None


def describe_collective_failure(err: BaseException, phase: str, timeout_minutes: float,
                                roll_call: str | None) -> str:
    """One paragraph: this rank, the phase and its collectives, the peers, the timeout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    detail = next((line.strip() for line in str(err).splitlines() if line.strip()), repr(err))
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", detail)  # gloo's source location
    detail = detail.split(" This is typically caused")[0]
    alive = answering_ranks(roll_call) if roll_call else None
    if alive is None:
        peers = ("the rendezvous store did not answer, so which rank failed is unknown "
                 "(rank 0 serves it under launchers other than torchrun)")
    else:
        missing = sorted(set(range(world)) - set(alive))
        peers = (f"rank(s) {missing} did not answer on the rendezvous store: dead or hung"
                 if missing else "every rank answered on the rendezvous store")
    return (f"rank {rank} of {world}: a collective failed during {phase}: {detail}. {peers}. "
            f"Collectives time out after {timeout_minutes:g} min "
            f"(run.collective_timeout_minutes). Stopping this rank; restart the job with "
            f"run.resume=true to continue from the last checkpoint.")


def report_cpu_binding(rank: int, world: int) -> None:
    """Rank 0 prints every rank's CPUs and threads on one line (``describe_cpu_binding``)."""
    bindings: list[Any] = [None] * world
    dist.all_gather_object(bindings, cpu_binding())
    if rank == 0:
        print(describe_cpu_binding(bindings), flush=True)
