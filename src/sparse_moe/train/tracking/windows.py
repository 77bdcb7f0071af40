"""What the trainer keeps between logs for the dashboards: tokens per expert over a window of
steps (idle experts per logging window, the expert-load picture per evaluation window), and
the sample translations an evaluation wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ExpertWindow:
    """Tokens per expert of every MoE layer, summed over the steps after ``since``.

    Added to at every step, so the sums are arrays (a layer may have 10^5 experts)."""

    def __init__(self, since: int = 0) -> None:
        self.since = since
        self._totals: list[np.ndarray] = []

    def add(self, counts: list[list[float]]) -> None:
        if not self._totals:
            self._totals = [np.asarray(layer, dtype=np.float64) for layer in counts]
            return
        for total, layer in zip(self._totals, counts):
            total += layer

    @property
    def counts(self) -> list[list[float]]:
        return [total.tolist() for total in self._totals]

    def dead_experts(self) -> dict[str, float]:
        """Per layer, the experts that received no token in the window."""
        return {f"moe{i}/dead_experts": float(np.count_nonzero(total == 0))
                for i, total in enumerate(self._totals)}


def sample_translations(run_dir: Path, split: str, count: int) -> list[list[str]]:
    """The first ``count`` (reference, hypothesis) pairs rank 0 wrote for ``split``."""
    hyp, ref = (run_dir / "translations" / f"{split}.{ext}" for ext in ("hyp", "ref"))
    if not (hyp.is_file() and ref.is_file()):
        return []
    hyps = hyp.read_text(encoding="utf-8").splitlines()[:count]
    refs = ref.read_text(encoding="utf-8").splitlines()[:count]
    return [[r, h] for r, h in zip(refs, hyps)]
