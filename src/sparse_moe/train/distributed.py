"""Process start-up for every launcher: ``deepspeed``, ``torchrun``, ``srun`` or none.

DeepSpeed reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``. The
``deepspeed`` launcher and ``torchrun`` set them; under ``srun`` without a launcher they are
derived from Slurm's variables; a plain ``python -m sparse_moe.train`` is a world of one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import torch

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


def fill_launcher_environment() -> None:
    """Sets the rendezvous variables when no launcher did (srun tasks, or a single process)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
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
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    init_deepspeed_distributed(backend, timeout=timedelta(minutes=timeout_minutes))
    return device
