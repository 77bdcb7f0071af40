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

from sparse_moe.config_io import ConfigError
from sparse_moe.data import CorpusError, TokenizerError
from sparse_moe.models.decoding import sample_text
from sparse_moe.train.checkpoint.errors import CheckpointError, ExportError
from sparse_moe.train.checkpoint.export import is_export
from sparse_moe.train.distributed import shut_down_distributed
from sparse_moe.train.tasks import LanguageModelTask
from sparse_moe.train.trained import load_export_for_generation, load_trained


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


if __name__ == "__main__":
    sys.exit(main())
