"""Checks of a run's inputs made before any process group, run directory or engine exists.

The trainer meets most of these problems too, but later: after it wrote the run directory,
after DeepSpeed started, and often as a library's traceback (a state-dict size mismatch, a
bare ``AssertionError`` from the checkpoint loader). Checked here first, each one is a message
that names the file or field, what was expected and what was found, and nothing is written.
Every rank runs the same checks on the same files, so all ranks stop with the same message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError
from sparse_moe.data import CorpusError, ShardFormatError, load_tokenizer, open_corpus
from sparse_moe.models import LMConfig, TranslationConfig
from sparse_moe.parallel.layout import check_world
from sparse_moe.parallel.parallelize_model import check_model_layout
from sparse_moe.train.checkpoint.export import check_export
from sparse_moe.train.checkpoint.files import checkpoint_dir
from sparse_moe.train.checkpoint.verify import check_checkpoint
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.ds_config import build_ds_config, check_precision_supported
from sparse_moe.train.tasks import make_task


@dataclass
class StartUp:
    """What the start-up checks built, handed to the trainer so that nothing is built twice."""

    rank: int
    world: int
    tokenizer: Any  # sparse_moe.data.Tokenizer, or None for a corpus without one
    corpus: Any  # sparse_moe.data.Corpus
    task: Any  # LanguageModelTask or TranslationTask, for this rank
    batches: Any  # the task's training reader, at the first batch
    model_config: LMConfig | TranslationConfig
    ds_config: dict[str, Any]  # the dict deepspeed.initialize gets


def check_run(config: TrainConfig, source: str, world_size: int, rank: int = 0) -> StartUp:
    """Everything ``Trainer(config)`` needs that can be checked before any process group
    exists, cheaply; returns what was built for it.

    ``source`` names the config (its file, or "command line") in messages. Every rank runs
    the same checks on the same files, so all ranks stop with the same message.
    """
    try:
        check_world(config.parallel.ep_size, world_size)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
    corpus = open_corpus(config.data.corpus, tokenizer=tokenizer)
    task = make_task(config, corpus, tokenizer, rank=rank, world=world_size)
    model = task.model_config(f"{source}: model.overrides")
    try:
        check_model_layout(model, config.parallel.ep_size)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        batches = task.train_reader()
    except (CorpusError, ShardFormatError):
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: data.train_split {config.data.train_split!r} of "
                          f"{corpus.directory}: {error}") from None
    if config.run.init_from:
        check_export(Path(config.run.init_from), model)
    ds = build_ds_config(config, world_size, Path(config.run.dir))
    check_precision_supported(ds, config)
    if config.run.resume:
        check_checkpoint(checkpoint_dir(Path(config.run.dir)), None, config, model, resume=True,
                         world_size=world_size, ds_config=ds)
    return StartUp(rank, world_size, tokenizer, corpus, task, batches, model, ds)


def rank_from_environment() -> int:
    """This process's rank as the launcher set it (0 for a single process)."""
    from sparse_moe.train.distributed import fill_launcher_environment

    fill_launcher_environment()
    return int(os.environ.get("RANK", "0"))


def world_size_from_environment() -> int:
    """The world size the launcher set (1 for a plain ``python -m sparse_moe.train``)."""
    from sparse_moe.train.distributed import fill_launcher_environment

    fill_launcher_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))
