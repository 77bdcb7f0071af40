"""The expert-load picture a dashboard shows at each evaluation.

One heatmap for the whole model: a row per MoE layer, a column per expert, the colour the
expert's share of the layer's assignments over the window since the previous picture,
relative to a uniform share (1.0: balanced; 0: the expert got no token). Under it the same
numbers as text in the title (CV and the number of idle experts per layer), so the picture
reads without a colour scale too.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparse_moe.atomic import atomic_write  # noqa: E402


def relative_load(counts: list[list[float]]) -> np.ndarray:
    """[layers, experts]: each expert's tokens over its layer's mean (NaN pads short layers)."""
    width = max(len(layer) for layer in counts)
    out = np.full((len(counts), width), np.nan)
    for i, layer in enumerate(counts):
        values = np.asarray(layer, dtype=np.float64)
        out[i, : len(values)] = values / max(values.mean(), 1e-12)
    return out


def draw_expert_load(counts: list[list[float]], step: int, since: int, path: Path) -> Path:
    """Writes the picture of ``counts`` (per layer, tokens per expert summed over steps
    ``since + 1 .. step``) to ``path`` (PNG, atomically) and returns it."""
    share = relative_load(counts)
    layers, experts = share.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * experts, 14), 1.2 + 0.45 * layers))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0,
                      vmax=max(2.0, float(np.nanmax(share))), interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens / layer mean")
    ax.set_yticks(range(layers), [f"moe{i}" for i in range(layers)])
    ax.set_xlabel("expert")
    cvs = ", ".join(f"moe{i} CV {np.nanstd(row) / max(np.nanmean(row), 1e-12):.2f}, "
                    f"{int(np.sum(row == 0))} idle" for i, row in enumerate(share))
    ax.set_title(f"expert load, steps {since + 1}-{step}\n{cvs}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    atomic_write(path, tmp.read_bytes())
    tmp.unlink()
    return path
