"""``sparse-moe-export``: one consolidated model out of a run's DeepSpeed checkpoint.

    sparse-moe-export runs/moe32 [--tag step_00020000] --out exports/moe32

writes ``model.safetensors`` (every parameter under the plain model's names, each MoE layer's
experts stacked in global order), ``config.json`` (the model) and the run's tokenizer: see
``train/checkpoint/export.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_moe.config_io import ConfigError
from sparse_moe.data import CorpusError, TokenizerError
from sparse_moe.train.checkpoint.errors import ExportError
from sparse_moe.train.checkpoint.export import export_run
from sparse_moe.train.trained import run_model_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-moe-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        _, model_config, tokenizer_path = run_model_config(args.run_dir)
        for path in export_run(args.run_dir, args.out, model_config, tokenizer_path, args.tag):
            print(path)
    except (ExportError, ConfigError, CorpusError, TokenizerError) as error:
        print(f"sparse-moe-export: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
