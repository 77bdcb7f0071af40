"""The learning-rate schedule of the paper: linear warmup, hold, then inverse square root.

``lr(n) = peak * n / warmup`` for the first ``warmup`` updates, ``peak`` for the next
``hold`` updates, then ``peak * sqrt((warmup + hold) / n)``: continuous at both joins. ``n``
is the 1-based number of the update about to be taken (``LambdaLR`` passes 0 for the first).
The paper used 1000/0 for the 1B-word models and 2000/8000 for translation; both numbers are
configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class ScheduleConfig:
    warmup_steps: int = 1000  # linear warm-up to the peak learning rate
    hold_steps: int = 0  # steps at the peak, before the inverse square root

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "hold_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ScheduleConfig.{name}: expected a non-negative integer, "
                                 f"found {value!r}")


def warmup_hold_rsqrt(warmup_steps: int, hold_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate for the ``LambdaLR`` step index."""
    ScheduleConfig(warmup_steps, hold_steps)  # validates
    plateau_end = warmup_steps + hold_steps

    def factor(step: int) -> float:
        n = step + 1
        if n <= warmup_steps:
            return n / warmup_steps
        if n <= plateau_end:
            return 1.0
        return math.sqrt(max(plateau_end, 1) / n)

    return factor


def build_scheduler(optimizer: Optimizer, config: ScheduleConfig) -> LambdaLR:
    """A ``LambdaLR`` over the optimizer's learning rates (usable as DeepSpeed's scheduler)."""
    return LambdaLR(optimizer, warmup_hold_rsqrt(config.warmup_steps, config.hold_steps))
