"""``sparse-moe-plan``: the memory, traffic and work of one rank, from a training config.

    sparse-moe-plan --config run.yaml model.preset=moe-4096-h parallel.ep_size=16 \\
        --world 16 --device-memory 80GiB
    sparse-moe-plan model.preset=moe-1024-h parallel.ep_size=4 --world 4 --device cpu --json

Takes the same --config file and section.field=value overrides as sparse-moe-train.
data.corpus is optional: its manifest gives the vocabulary size when it exists; otherwise
--vocab-size, or the preset's own (793,471 words for the paper's language models).
Exit status 0 when the plan fits (or no --device-memory was given), 1 when it does not,
2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys

from sparse_moe.config_io import ConfigError, apply_overrides, from_dict, load_yaml

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
PLACEHOLDER_CORPUS = "(not read by the planner)"


def parse_size(text: str) -> int:
    """``80GiB``, ``12GB``, ``512MiB`` or a byte count."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"--device-memory: expected a size such as 80GiB, 12GB or 512MiB, "
                          f"found {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def load_config(path: str | None, overrides: list[str]):
    """The training config, with data.corpus optional (the planner reads no data)."""
    from sparse_moe.train.config import TrainConfig

    values = apply_overrides(load_yaml(path) if path else {}, overrides)
    data = values.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'command line'}: data: expected a section, found {data!r}")
    if not data.get("corpus"):
        data["corpus"] = PLACEHOLDER_CORPUS
    return from_dict(TrainConfig, values, str(path or "command line"))


def resolve_vocabulary(config, vocab_size: int | None) -> int:
    from sparse_moe.train.resolved import corpus_vocabulary

    return corpus_vocabulary(config, vocab_size)[0]


def format_plan(plan) -> str:
    gib = 2**30
    b = plan.bytes_per_rank
    lines = [f"rank share of {plan.world} rank(s), parallel.ep_size={plan.ep_size}, "
             f"{plan.regime['precision']}, ZeRO {plan.regime['zero_stage']} "
             f"({plan.regime['optimizer']}; DeepSpeed wrapper: "
             f"{plan.regime['optimizer_wrapper']}), device {plan.device}",
             f"parameters per rank: {plan.params_per_rank:,} (dense "
             f"{plan.params_detail['dense']:,}, experts {plan.params_detail['experts']:,})"]
    width = max(len(k) for k in b)
    lines += [f"  {key.ljust(width)}  {value / gib:9.3f} GiB" for key, value in b.items()]
    lines.append(f"the total is held during a {plan.peak_phase}; checkpoint_save is what a "
                 "rank holds while DeepSpeed writes a checkpoint (a copy of its experts)")
    act = plan.activations
    lines += [f"activations ({plan.tokens_per_micro_batch} tokens a micro-batch): "
              f"{act['without_checkpointing'] / gib:.3f} GiB without checkpointing, "
              f"{act['with_checkpointing'] / gib:.3f} GiB with",
              f"all-to-all per step: {plan.all_to_all_bytes_per_step / 2**20:.1f} MiB sent",
              f"multiply-adds per step (forward and backward): "
              f"{plan.multiply_adds_per_step:.3e}"]
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.device_memory / gib:.1f} GiB")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-moe-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the training YAML")
    parser.add_argument("--world", type=int, default=None,
                        help="processes (GPUs); default: parallel.ep_size")
    parser.add_argument("--device-memory", default=None, help="per device, e.g. 80GiB")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="what the framework's resident memory is counted for")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--print-config", action="store_true",
                        help="print the configuration planned, the model resolved to all its "
                             "fields (as sparse-moe-train --print-config), and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return parser


def make_plan(args: argparse.Namespace):
    from sparse_moe.plan.planner import plan_run
    from sparse_moe.train.tasks import resolve_model_config

    config = load_config(args.config, list(args.overrides))
    memory = parse_size(args.device_memory) if args.device_memory else None
    model = resolve_model_config(config, resolve_vocabulary(config, args.vocab_size))
    return plan_run(config, model, args.world or config.parallel.ep_size, args.device, memory)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.print_config:
        return print_config(args)
    try:
        # DeepSpeed's logger (imported on the way) writes to stdout; the plan owns stdout.
        with contextlib.redirect_stdout(sys.stderr):
            plan = make_plan(args)
    except ConfigError as error:
        print(f"sparse-moe-plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    if plan.fits is False:
        need, have = plan.bytes_per_rank["total"] / 2**30, plan.device_memory / 2**30
        print(f"sparse-moe-plan: --device-memory: expected at least {need:.2f} GiB (what a "
              f"rank of this plan needs), found {have:.2f} GiB; raise parallel.ep_size (experts: "
              f"{plan.params_detail['experts']:,} parameters a rank), enable "
              "model.activation_checkpointing, lower data.micro_batch_size, or use a ZeRO "
              "config (deepspeed.config)", file=sys.stderr)
        return 1
    return 0


def print_config(args: argparse.Namespace) -> int:
    try:
        # DeepSpeed's logger writes to the stdout it finds when imported; the YAML owns stdout.
        with contextlib.redirect_stdout(sys.stderr):
            from sparse_moe.train.resolved import printable_config

            config = load_config(args.config, list(args.overrides))
            text = printable_config(config, args.vocab_size)
    except ConfigError as error:
        print(f"sparse-moe-plan: {error}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
