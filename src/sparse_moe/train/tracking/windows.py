"""What the trainer keeps between logs for the dashboards: tokens per expert over a window of
steps (idle experts per logging window, the expert-load picture per evaluation window), and
the sample translations an evaluation wrote."""

from __future__ import annotations

from pathlib import Path


class ExpertWindow:
    """Tokens per expert of every MoE layer, summed over the steps after ``since``."""

    def __init__(self, since: int = 0) -> None:
        self.since = since
        self.counts: list[list[float]] = []

    def add(self, counts: list[list[float]]) -> None:
        if not self.counts:
            self.counts = [list(layer) for layer in counts]
            return
        for total, layer in zip(self.counts, counts):
            for i, value in enumerate(layer):
                total[i] += value

    def dead_experts(self) -> dict[str, float]:
        """Per layer, the experts that received no token in the window."""
        return {f"moe{i}/dead_experts": float(sum(1 for c in layer if c == 0))
                for i, layer in enumerate(self.counts)}


def sample_translations(run_dir: Path, split: str, count: int) -> list[list[str]]:
    """The first ``count`` (reference, hypothesis) pairs rank 0 wrote for ``split``."""
    hyp, ref = (run_dir / "translations" / f"{split}.{ext}" for ext in ("hyp", "ref"))
    if not (hyp.is_file() and ref.is_file()):
        return []
    hyps = hyp.read_text(encoding="utf-8").splitlines()[:count]
    refs = ref.read_text(encoding="utf-8").splitlines()[:count]
    return [[r, h] for r, h in zip(refs, hyps)]
