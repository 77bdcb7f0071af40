"""Training on DeepSpeed engines: configuration, the loop, checkpoints, tracking.

The configuration classes are imported on first use: ``python -m sparse_moe.train`` then
starts without importing DeepSpeed, whose logger writes to the standard output it finds
(``--print-config`` keeps that for its YAML).
"""

from typing import Any

__all__ = ["DataConfig", "DeepSpeedSection", "ModelSection", "RunConfig", "TrackingConfig",
           "TrainConfig", "load_train_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sparse_moe.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'sparse_moe.train' has no attribute {name!r}")
