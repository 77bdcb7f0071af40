"""Preemption: a SIGUSR1/SIGTERM to any rank saves at the next step boundary, then the run
exits with :data:`EXIT_PREEMPTED` and leaves ``<run>/preempted.json`` for the job script.

Launchers report exit statuses differently (torchrun turns any failure into 1), so the marker
file is what the Slurm templates test to requeue; the status is 75 too.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparse_moe.atomic import atomic_write
from sparse_moe.train.distributed import all_reduce_host

EXIT_PREEMPTED = 75
PREEMPTED_MARKER = "preempted.json"


class PreemptionFlag:
    """Remembers a SIGUSR1/SIGTERM; ranks agree on it at step boundaries (an all-reduce MAX).

    Acting only at a step boundary, and only when every rank has seen the agreement, keeps the
    ranks in lockstep: no rank leaves a collective that the others are still inside.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.install()

    def install(self) -> None:
        """(Re)installs the handlers; libraries started later (wandb) may replace them."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(a signal reached some rank, some rank asks for a checkpoint): one all-reduce MAX
        for both, so every rank acts on the same answers at the same step."""
        flags = torch.tensor([1 if self.received is not None else 0, int(save_due)],
                             dtype=torch.int32)
        all_reduce_host(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def signal_name(self) -> str:
        return (signal.Signals(self.received).name if self.received
                else "a signal on another rank")


def clear_preempted(run_dir: Path) -> None:
    (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)


def mark_preempted(run_dir: Path, step: int, signame: str) -> None:
    """Written by rank 0 once every rank's checkpoint files are (the requeue's signal)."""
    atomic_write(run_dir / PREEMPTED_MARKER, json.dumps(
        {"step": step, "signal": signame, "time": time.time()}))
