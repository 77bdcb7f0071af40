"""The run directory a training run writes: its config, its W&B run id (kept over resumes and
requeues, so every start logs to the one W&B run), and its checkpoints' folder."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch.distributed as dist
import yaml

from sparse_moe.atomic import atomic_write
from sparse_moe.config_io import to_dict
from sparse_moe.train.checkpoint.files import checkpoint_dir
from sparse_moe.train.config import TrainConfig

RUN_ID_FILE = "wandb_run_id"


def prepare_run_dir(run_dir: Path, config: TrainConfig, rank: int) -> str:
    """Rank 0 creates the directory and writes ``config.yaml`` (and the run id once); every
    rank returns the run id, after a barrier."""
    if rank == 0:
        checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex[:12])
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    dist.barrier()
    return (run_dir / RUN_ID_FILE).read_text().strip()
