"""``sparse-moe-train``: train a language model from a YAML config plus dotted overrides.

    sparse-moe-train --config configs/lm_debug.yaml run.steps=200 optimizer.lr=3e-3
    deepspeed --num_gpus 8 -m sparse_moe.train --config configs/lm_moe256.yaml parallel.ep_size=8
    torchrun --nproc-per-node 2 -m sparse_moe.train --config ... run.resume=true
"""

from __future__ import annotations

import argparse
import sys

from sparse_moe.config_io import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparse-moe-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the run's sections")
    parser.add_argument("--resume", action="store_true", help="same as run.resume=true")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        from sparse_moe.train.config import load_train_config

        config = load_train_config(args.config, overrides)
        from sparse_moe.train.trainer import EXIT_PREEMPTED, Trainer

        summary = Trainer(config).run()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if summary.get("preempted"):
            return EXIT_PREEMPTED
    except ConfigError as err:
        print(f"sparse-moe-train: configuration error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
