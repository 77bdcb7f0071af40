"""The configuration a dashboard files a run under: what W&B's run table filters and groups by.

Every section of the training config with the model resolved (``train/resolved.py``: every
field of the built model, not just a preset's name), the DeepSpeed config as passed to
DeepSpeed, the process layout, and what code ran (the package version, and the git commit
of the checkout when the code runs from one).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from sparse_moe.train.config import TrainConfig
from sparse_moe.train.resolved import resolved_config_dict


def dashboard_config(config: TrainConfig, model_config: Any, ds_config: dict[str, Any],
                     world: int, ep_size: int, model: Any = None) -> dict[str, Any]:
    """``model``: the built model, whose MoE layers' every field (balancing weights, noise,
    gating; defaults included) goes under ``moe_layers``."""
    values = resolved_config_dict(config, model_config)
    if model is not None:
        values["moe_layers"] = moe_layer_fields(model)
    values["deepspeed_config"] = ds_config
    values["layout"] = {"world_size": world, "ep_size": ep_size,
                        "expert_data_parallel_size": world // ep_size,
                        "data_parallel_size": world}
    values["code"] = {"version": package_version(), "git_commit": git_commit()}
    return values


def moe_layer_fields(model: Any) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from sparse_moe.models.layers import MoELayer

    return [asdict(module.moe.config) for module in model.modules()
            if isinstance(module, MoELayer)]


def package_version() -> str | None:
    try:
        return metadata.version("sparse-moe")
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (None outside a git checkout)."""
    source = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None
