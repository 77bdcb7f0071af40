"""``sparse-moe-train``: train a language or translation model from a YAML config plus
``section.field=value`` overrides (YAML values: ``optimizer.lr=3e-4``, ``run.resume=true``,
``data.eval_splits=[valid]``).

    sparse-moe-train --config configs/demo.yaml data.corpus=corpora/wt2 run.steps=200
    deepspeed --num_gpus 8 --module sparse_moe.train --config my_run.yaml parallel.ep_size=8
    torchrun --nproc-per-node 2 -m sparse_moe.train --config ... run.resume=true
"""

from __future__ import annotations

import argparse
import sys

from sparse_moe.config_io import ConfigError
from sparse_moe.train.errors import TrainingAborted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = sys.argv[1:] if argv is None else argv
    # The fields' help imports the models (and DeepSpeed, which logs to stdout): only for --help.
    wants_help = any(arg in ("-h", "--help") for arg in args)
    parser = argparse.ArgumentParser(prog="sparse-moe-train", description=__doc__,
                                     epilog=configuration_help() if wants_help else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the run's sections")
    parser.add_argument("--resume", action="store_true", help="same as run.resume=true")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (YAML, the model resolved to "
                             "all its fields) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return parser.parse_args(argv)


def configuration_help() -> str:
    """Every section and field (type, default, documentation), made from the dataclasses."""
    import dataclasses
    import typing

    from sparse_moe.config_io import describe_fields
    from sparse_moe.models import LayerConfig, LMConfig, TranslationConfig
    from sparse_moe.moe import MoEConfig
    from sparse_moe.train.config import TrainConfig

    lines = ["configuration (a YAML section each; override any field as section.field=value):"]
    hints = typing.get_type_hints(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        cls = hints[section.name]
        lines += ["", f"{section.name} ({cls.__name__}):",
                  *describe_fields(cls, f"{section.name}.")]
    for title, cls, prefix in (
            ("model.overrides of a language model (LMConfig)", LMConfig, "model.overrides."),
            ("an item of its layers list (LayerConfig)", LayerConfig, ""),
            ("model.overrides of a translation model (TranslationConfig)", TranslationConfig,
             "model.overrides."),
            ("a MoE mapping (MoEConfig): a layer's moe, moe_overrides, a translation model's moe",
             MoEConfig, "")):
        lines += ["", f"{title}:", *describe_fields(cls, prefix)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    status = run_command(parse_args(argv))
    from sparse_moe.train.distributed import shut_down_distributed
    from sparse_moe.train.errors import CollectiveFailure

    # After a failed collective the groups are left alone: their peers may be gone. Otherwise
    # they are torn down here, once the trainer and any exception that held it are gone.
    if status != CollectiveFailure.exit_status:
        shut_down_distributed()
    return status


def run_command(args: argparse.Namespace) -> int:
    """Trains; returns the exit status, with a one-line message for bad input and faults."""
    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        if args.print_config:
            return print_config(args.config, overrides)
        from sparse_moe.train.config import load_train_config

        config = load_train_config(args.config, overrides)
        startup = check_inputs(config, str(args.config or "command line"))
        from sparse_moe.train.trainer import EXIT_PREEMPTED, Trainer

        if Trainer(config, startup).run().get("preempted"):
            return EXIT_PREEMPTED
    except ConfigError as err:
        print(f"sparse-moe-train: configuration error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:  # a fault: failed save, non-finite limit, dead rank...
        if not getattr(err, "reported", False):
            print(f"sparse-moe-train: error: {err}", file=sys.stderr)
        return err.exit_status
    except input_errors() as err:
        print(f"sparse-moe-train: input error: {err}", file=sys.stderr)
        return 2
    return 0


def print_config(path: str | None, overrides: list[str]) -> int:
    """Prints the configuration the run would use (every field, defaults filled in, the model
    resolved from its preset or YAML and overrides), as YAML that loads back as the same run."""
    import contextlib

    # DeepSpeed's logger writes to the stdout it finds when imported; the YAML owns stdout.
    with contextlib.redirect_stdout(sys.stderr):
        from sparse_moe.train.config import load_train_config
        from sparse_moe.train.resolved import printable_config

        text = printable_config(load_train_config(path, overrides))
    print(text, end="")
    return 0


def check_inputs(config, source: str):
    """Corpus, tokenizer, model, DeepSpeed config and checkpoint, before anything is written;
    returns what the checks built (``preflight.StartUp``) for the trainer."""
    from sparse_moe.train.preflight import (
        check_run,
        rank_from_environment,
        world_size_from_environment,
    )

    return check_run(config, source, world_size_from_environment(), rank_from_environment())


def input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (shown as one line), not a bug (shown as a traceback)."""
    from sparse_moe.data import CorpusError, ShardFormatError, TokenizerError
    from sparse_moe.train.checkpoint.errors import CheckpointError, ExportError

    return CorpusError, ShardFormatError, TokenizerError, CheckpointError, ExportError


if __name__ == "__main__":
    sys.exit(main())
