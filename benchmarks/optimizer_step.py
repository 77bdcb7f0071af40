"""Time of one optimizer step over the parameter sets of MoE-32 and MoE-1-Wide, in one run.

Contenders: this project's ``FactoredAdam`` (the paper's memory-saving Adam, as trained) and
``torch.optim.Adam`` (foreach implementation) as the peer, each on the same parameters with
random gradients. The step is memory-bound, so its cost grows with the parameter count, which
is what separates an MoE from its compute-matched dense model. Usage:

    python benchmarks/optimizer_step.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparse_moe.models import MoELSTMLanguageModel, lm_preset
from sparse_moe.optim import FactoredAdam
from sparse_moe.train.host_memory import retain_freed_host_memory


def parameters_of(preset: str, vocab_size: int) -> list[torch.nn.Parameter]:
    """The preset's parameters, each with a random gradient."""
    model = MoELSTMLanguageModel(lm_preset(preset, vocab_size=vocab_size))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def step_seconds(optimizer: torch.optim.Optimizer, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["moe-32", "moe-1-wide"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    retain_freed_host_memory()  # as the trainer does on CPU
    print(f"\nOptimizer step, vocabulary {args.vocab_size}, threads={torch.get_num_threads()}, "
          f"median of {args.repeats} after {args.warmup}\n")
    print("| preset | params (M) | optimizer | step (ms) | vs torch Adam |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        params = parameters_of(preset, args.vocab_size)
        count = sum(p.numel() for p in params) / 1e6
        adam = step_seconds(torch.optim.Adam(params, lr=1e-3, foreach=True), args.warmup,
                            args.repeats)
        ours = step_seconds(FactoredAdam(params, lr=1e-3), args.warmup, args.repeats)
        for name, seconds in (("torch Adam", adam), ("FactoredAdam", ours)):
            print(f"| {preset} | {count:.1f} | {name} | {seconds * 1e3:.1f} | "
                  f"{seconds / adam:.2f}x |")


if __name__ == "__main__":
    main()
