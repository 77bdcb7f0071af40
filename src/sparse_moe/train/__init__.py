"""Training on DeepSpeed engines: configuration, the loop, checkpoints, tracking."""

from sparse_moe.train.config import (
                                     DataConfig,
                                     DeepSpeedSection,
                                     ModelSection,
                                     RunConfig,
                                     TrackingConfig,
                                     TrainConfig,
                                     load_train_config,
)

__all__ = ["DataConfig", "DeepSpeedSection", "ModelSection", "RunConfig", "TrackingConfig",
           "TrainConfig", "load_train_config"]
