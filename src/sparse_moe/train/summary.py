"""The run's closing figures: peak memory per rank, and the box printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak host memory (VmHWM) and, on GPUs, the caching allocator's peaks
    (what tensors held, and what it reserved from the driver for them), in MiB.

    The run's ``summary.json`` holds the largest over ranks, and each rank's."""
    peaks = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peaks["peak_host_memory_mib"] = int(line.split()[1]) / 1024
    if device.type == "cuda":
        peaks["peak_device_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peaks["peak_device_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peaks


def peak_memory_over_ranks(device: torch.device, world: int) -> dict[str, Any]:
    """The largest peak of any rank under each key, and every rank's in ``..._per_rank``."""
    peaks: list[Any] = [None] * world
    dist.all_gather_object(peaks, peak_memory(device))
    out: dict[str, Any] = {}
    for key in peaks[0]:
        values = [p[key] for p in peaks]
        out[key], out[f"{key}_per_rank"] = max(values), values
    return out


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    lines = [f"run directory: {run_dir}", f"steps: {summary['steps']}",
             f"time: {summary['seconds']:.1f} s"]
    if summary.get("train_loss") is not None:
        lines.append(f"final training loss: {summary['train_loss']:.4f}")
    for key, value in summary.items():
        if key.endswith(("/perplexity", "/bleu")):
            lines.append(f"{key}: {value:.2f}")
    width = max(len(line) for line in lines)
    print("+" + "-" * (width + 2) + "+")
    for line in lines:
        print(f"| {line.ljust(width)} |")
    print("+" + "-" * (width + 2) + "+")
