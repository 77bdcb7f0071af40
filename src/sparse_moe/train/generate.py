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
from sparse_moe.train.preflight import CheckpointError, check_checkpoint, checkpoint_tags
from sparse_moe.train.tasks import LanguageModelTask, make_task
from sparse_moe.train.trainer import CHECKPOINT_DIR, build_rank_model


def load_trained(run_dir: str | Path, tag: str | None = None, overrides: list[str] | None = None
                 ) -> tuple[Any, Any, Any, torch.device]:
    """(engine, task, tokenizer, device) with the checkpoint's weights, in eval mode.

    ``overrides`` (``section.field=value``) change the run's config, e.g. the batch size
    used by ``task.evaluate``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: expected a run directory written by sparse-moe-train, "
                          "found no directory")
    values = apply_overrides(load_yaml(run_dir / "config.yaml"), overrides or [])
    values["parallel"] = {**(values.get("parallel") or {}), "ep_size": 1}
    config = from_dict(TrainConfig, values, str(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
    corpus = open_corpus(config.data.corpus, tokenizer=tokenizer)
    task = make_task(config, corpus, tokenizer, rank=0, world=1)
    model_settings = task.model_config(f"{run_dir / 'config.yaml'}: model.overrides")
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
    """Loads the run and prints a sample for every prompt; returns the exit status."""
    try:
        engine, task, tokenizer, _ = load_trained(args.run_dir, args.tag)
    except (ConfigError, CorpusError, TokenizerError, CheckpointError) as err:
        print(f"sparse-moe-generate: {err}", file=sys.stderr)
        return 2
    if not isinstance(task, LanguageModelTask) or tokenizer is None:
        print("sparse-moe-generate: expected a language-model run with a SentencePiece "
              "tokenizer", file=sys.stderr)
        return 2
    eos = tokenizer.processor.eos_id()
    for prompt in args.prompt:
        text = sample_text(engine.module, tokenizer.processor, prompt, args.tokens,
                           args.temperature, args.top_k, args.seed,
                           eos_id=eos if eos >= 0 else None)
        print(f"{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
