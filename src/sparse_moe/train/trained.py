"""A trained run (or an export) loaded into one process: the library under
``sparse-moe-generate``, ``sparse-moe-translate``, ``sparse-moe-export`` and the routing report.

Loads the run's effective config and its latest (or a named) DeepSpeed checkpoint into a
one-process engine. Checkpoints written with expert parallelism load too: DeepSpeed stores one
file per global expert and the one process takes all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparse_moe.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from sparse_moe.data import load_tokenizer, open_corpus
from sparse_moe.train.checkpoint.errors import CheckpointError, ExportError
from sparse_moe.train.checkpoint.export import (
    CONFIG,
    export_model_config,
    is_export,
    load_export_into,
)
from sparse_moe.train.checkpoint.files import checkpoint_dir, checkpoint_tags
from sparse_moe.train.checkpoint.verify import check_checkpoint
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import init_distributed
from sparse_moe.train.engine import build_engine
from sparse_moe.train.rank_model import build_rank_model
from sparse_moe.train.tasks import make_task


def run_task(run_dir: Path, overrides: list[str] | None = None
             ) -> tuple[TrainConfig, Any, Any, Any]:
    """(config, task, tokenizer, model config) of a run directory, for one process.

    ``overrides`` (``section.field=value``) change the run's config, e.g. the batch size
    used by ``task.evaluate``. An export directory (``sparse-moe-export``) works too, given
    ``data.corpus``: its model and tokenizer are the export's.
    """
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: expected a run directory written by sparse-moe-train, "
                          "found no directory")
    if is_export(run_dir):
        tokenizers = sorted(run_dir.glob("*.model"))
        values = {"model": {"preset": str(run_dir / CONFIG)},
                  "data": {"tokenizer": str(tokenizers[0]) if tokenizers else None}}
        source = str(run_dir / CONFIG)
    else:
        values, source = load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml")
    values = apply_overrides(values, overrides or [])
    values["parallel"] = {**(values.get("parallel") or {}), "ep_size": 1}
    config = from_dict(TrainConfig, values, source)
    tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
    corpus = open_corpus(config.data.corpus, tokenizer=tokenizer)
    task = make_task(config, corpus, tokenizer, rank=0, world=1)
    return config, task, tokenizer, task.model_config(f"{source}: model.overrides")


def run_model_config(run_dir: Path) -> tuple[TrainConfig, Any, Path | None]:
    """(config, model config, tokenizer file) a run was trained with."""
    config, _, tokenizer, model = run_task(run_dir)
    return config, model, tokenizer.path if tokenizer is not None else None


def load_trained(run_dir: str | Path, tag: str | None = None, overrides: list[str] | None = None
                 ) -> tuple[Any, Any, Any, torch.device]:
    """(engine, task, tokenizer, device) with the run's weights, in eval mode: its checkpoint
    (``tag``, default the latest), or an export's weights."""
    run_dir = Path(run_dir)
    config, task, tokenizer, model_settings = run_task(run_dir, overrides)
    if is_export(run_dir):
        device = init_distributed()
        model = build_rank_model(task, config, device)
        load_export_into(model, run_dir)
        engine = build_engine(model, config, 1, run_dir, training=False).engine
        engine.eval()
        return engine, task, tokenizer, device
    checkpoints = checkpoint_dir(run_dir)
    tag = check_checkpoint(checkpoints, tag, config, model_settings, resume=False)
    if tag is None:
        raise CheckpointError(f"{checkpoints}: expected a checkpoint (a 'latest' file and "
                              f"its tag directory), found {checkpoint_tags(checkpoints) or 'none'}")
    device = init_distributed()
    engine = build_engine(build_rank_model(task, config, device), config, 1, run_dir,
                          training=False).engine
    path, _ = engine.load_checkpoint(str(checkpoints), tag=tag,
                                     load_optimizer_states=False,
                                     load_lr_scheduler_states=False, load_module_only=True)
    if path is None:
        raise ConfigError(f"{checkpoints}: no checkpoint to load"
                          + (f" with tag {tag!r}" if tag else ""))
    engine.eval()
    return engine, task, tokenizer, device


def load_export_for_generation(directory: Path) -> tuple[Any, Any]:
    """An exported language model and its tokenizer, without a corpus or an engine."""
    from sparse_moe.models import LMConfig
    from sparse_moe.parallel import ExpertParallelConfig, create_expert_parallel_groups, parallelize

    model_config = export_model_config(directory)
    tokenizers = sorted(directory.glob("*.model"))
    if not isinstance(model_config, LMConfig) or not tokenizers:
        raise ExportError(f"{directory}: expected an exported language model with its "
                          "SentencePiece tokenizer (*.model), found "
                          f"{type(model_config).__name__} and {len(tokenizers)} tokenizer(s)")
    device = init_distributed()
    model = parallelize(model_config, ExpertParallelConfig(), create_expert_parallel_groups(1),
                        seed=0, device=device)
    load_export_into(model, directory)
    return model.eval(), load_tokenizer(tokenizers[0])
