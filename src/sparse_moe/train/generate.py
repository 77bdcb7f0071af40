"""``sparse-moe-generate``: sample text from a trained language model's run directory.

    sparse-moe-generate runs/moe32 --prompt "The history of" --tokens 60 --temperature 0.8

Loads the run's effective config and its latest (or ``--tag``) DeepSpeed checkpoint into a
one-process engine. Checkpoints written with expert parallelism load too: DeepSpeed stores
one file per global expert and the one process takes all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from sparse_moe.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from sparse_moe.data import CorpusError, TokenizerError, load_tokenizer, open_corpus
from sparse_moe.models.decoding import sample_text
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import init_distributed, shut_down_distributed
from sparse_moe.train.engine import build_engine
from sparse_moe.train.export import (
    CONFIG,
    ExportError,
    export_model_config,
    is_export,
    load_export_into,
)
from sparse_moe.train.preflight import CheckpointError, check_checkpoint, checkpoint_tags
from sparse_moe.train.tasks import LanguageModelTask, make_task
from sparse_moe.train.trainer import CHECKPOINT_DIR, build_rank_model


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
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    tag = check_checkpoint(checkpoint_dir, tag, config, model_settings, resume=False)
    if tag is None:
        raise CheckpointError(f"{checkpoint_dir}: expected a checkpoint (a 'latest' file and "
                              f"its tag directory), found {checkpoint_tags(checkpoint_dir) or 'none'}")
    device = init_distributed()
    engine = build_engine(build_rank_model(task, config, device), config, 1, run_dir,
                          training=False).engine
    path, _ = engine.load_checkpoint(str(run_dir / CHECKPOINT_DIR), tag=tag,
                                     load_optimizer_states=False,
                                     load_lr_scheduler_states=False, load_module_only=True)
    if path is None:
        raise ConfigError(f"{run_dir / CHECKPOINT_DIR}: no checkpoint to load"
                          + (f" with tag {tag!r}" if tag else ""))
    engine.eval()
    return engine, task, tokenizer, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-moe-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    status = generate(parser.parse_args(argv))
    shut_down_distributed()  # engine and groups gone before Python finalizes
    return status


def generate(args: argparse.Namespace) -> int:
    """Loads the run (or export) and prints a sample for every prompt; the exit status."""
    try:
        if is_export(args.run_dir):
            model, tokenizer = load_export_for_generation(args.run_dir)
        else:
            engine, task, tokenizer, _ = load_trained(args.run_dir, args.tag)
            model = engine.module if isinstance(task, LanguageModelTask) else None
    except (ConfigError, CorpusError, TokenizerError, CheckpointError, ExportError) as err:
        print(f"sparse-moe-generate: {err}", file=sys.stderr)
        return 2
    if model is None or getattr(tokenizer, "processor", None) is None:
        print("sparse-moe-generate: expected a language-model run with a SentencePiece "
              "tokenizer", file=sys.stderr)
        return 2
    eos = tokenizer.processor.eos_id()
    for prompt in args.prompt:
        text = sample_text(model, tokenizer.processor, prompt, args.tokens,
                           args.temperature, args.top_k, args.seed,
                           eos_id=eos if eos >= 0 else None)
        print(f"{prompt}{text}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
