"""This rank's model: its experts only, on its device, wrapped for DeepSpeed."""

from __future__ import annotations

from typing import Any

import torch

from sparse_moe.config_io import ConfigError
from sparse_moe.parallel import check_model_layout, create_expert_parallel_groups, parallelize
from sparse_moe.train.config import TrainConfig


def build_rank_model(task: Any, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """This rank's model (its experts only, on ``device``, wrapped for DeepSpeed)."""
    try:
        model_config = task.model_config()
        check_model_layout(model_config, config.parallel.ep_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    groups = create_expert_parallel_groups(config.parallel.ep_size,
                                           config.parallel.use_data_before_expert_parallel)
    return parallelize(model_config, config.parallel, groups, seed=config.run.seed,
                       device=device)
