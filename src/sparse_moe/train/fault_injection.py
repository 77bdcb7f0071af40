"""Faults a training run can inject into itself, for the crash-safety tests.

Read from the environment, so that a test can start real ``torchrun`` processes and still
choose where they fail. Unset variables inject nothing; production runs never set them.

    SPARSE_MOE_TRAIN_FAULT_RANKS=1          the ranks that inject (comma list; default: all)
    SPARSE_MOE_TRAIN_FAULT_NAN_STEPS=3,5    multiply the loss by NaN at these steps (1-based)
    SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY=0.2   sleep this many seconds after every checkpoint file,
                                            widening the window in which a kill hits a save
    SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY_RESTART=0
                                            only in the job start whose SLURM_RESTART_COUNT
                                            (0 when unset) is this one
    SPARSE_MOE_TRAIN_FAULT_ENOSPC_SAVE=2    the 2nd checkpoint save of this process fails with
                                            ENOSPC after writing half of its first file
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

PREFIX = "SPARSE_MOE_TRAIN_FAULT_"


class FaultHooks(Protocol):
    """Where a training run lets faults in: the trainer and the checkpoint writer call these
    and nothing else. :class:`FaultInjection` with nothing set injects nothing."""

    def loss(self, loss: Tensor, step: int) -> Tensor:
        """The loss of ``step`` (1-based), or a poisoned one."""

    def begin_save(self) -> None:
        """A checkpoint save starts."""

    def before_write(self, path: str) -> None:
        """A checkpoint file is about to be written (may fail it)."""

    def after_write(self, path: str) -> None:
        """A checkpoint file was written (may delay)."""


def _ints(name: str) -> frozenset[int]:
    text = os.environ.get(PREFIX + name, "").strip()
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"{PREFIX}{name}: expected comma-separated integers, found {text!r}") from err


@dataclass
class FaultInjection:
    nan_steps: frozenset[int] = frozenset()
    save_delay: float = 0.0
    enospc_save: int = 0
    saves: int = field(default=0, init=False)
    _fail_next_write: bool = field(default=False, init=False)

    @classmethod
    def from_environment(cls, rank: int) -> "FaultInjection":
        ranks = _ints("RANKS")
        if ranks and rank not in ranks:
            return cls()
        delay = float(os.environ.get(PREFIX + "SAVE_DELAY", "0") or 0)
        restart = os.environ.get(PREFIX + "SAVE_DELAY_RESTART")
        if restart is not None and restart != os.environ.get("SLURM_RESTART_COUNT", "0"):
            delay = 0.0
        return cls(nan_steps=_ints("NAN_STEPS"), save_delay=delay,
                   enospc_save=int(os.environ.get(PREFIX + "ENOSPC_SAVE", "0") or 0))

    def loss(self, loss: Tensor, step: int) -> Tensor:
        return loss * float("nan") if step in self.nan_steps else loss

    def begin_save(self) -> None:
        self.saves += 1
        self._fail_next_write = self.saves == self.enospc_save

    def before_write(self, path: str) -> None:
        if self._fail_next_write:
            self._fail_next_write = False
            with open(path, "wb") as f:  # half a file, as a full disk leaves it
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def after_write(self, path: str) -> None:
        if self.save_delay:
            time.sleep(self.save_delay)
