"""Peak memory of one training step at the 1B-word vocabulary (793,471 words): sampled softmax
against the full softmax, side by side in one run.

The model is the paper's MoE-32 language model (LSTM-512 -> MoE -> LSTM-512) with its real
793,471 x 512 embedding and softmax matrices over a synthetic Zipfian token stream. Each case
runs in a fresh process (forward, backward and a ``FactoredAdam`` step, two steps) and reports
its peak resident memory (VmHWM). The full softmax at the paper's micro-batch does not fit
here, so it is measured at smaller micro-batches and extrapolated along the line through the
two largest (there the softmax's activations, linear in the tokens, set the peak); the
planner's estimate of the softmax's activations (``plan/activations.py``) is shown beside
each. Usage:

    python benchmarks/softmax_memory.py [--samples 8192] [--batch 8 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

VOCAB = 793_471
PRESET = "moe-32"


def run_case(kind: str, batch: int, seq_len: int, samples: int) -> dict:
    """One case in this process: two training steps, then the peak resident memory."""
    from sparse_moe.models import MoELSTMLanguageModel, compose_loss, lm_preset
    from sparse_moe.optim import FactoredAdam
    from sparse_moe.train.host_memory import retain_freed_host_memory

    retain_freed_host_memory()  # as the trainer does on CPU
    torch.manual_seed(0)
    config = lm_preset(PRESET, vocab_size=VOCAB)
    config.softmax.kind, config.softmax.num_samples = kind, samples
    model = MoELSTMLanguageModel(config)
    optimizer = FactoredAdam(model.parameters(), lr=1e-3)
    optimizer.initialize_state()
    # Zipfian ids (frequency-sorted vocabulary), as a word-level corpus.
    u = torch.rand(batch, seq_len + 1, dtype=torch.float64)
    tokens = torch.floor(torch.exp(u * torch.log(torch.tensor(VOCAB + 1.0)))).long() - 1
    before = peak_mib()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
        compose_loss(out, tokens[:, 1:]).total.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return {"kind": kind, "tokens": batch * seq_len, "peak_mib": peak_mib(),
            "before_step_mib": before, "step_s": seconds[-1],
            "planned_softmax_mib": planned_softmax_mib(config, batch * seq_len)}


def planned_softmax_mib(config, tokens: int) -> float:
    from sparse_moe.plan.activations import lm_softmax_bytes

    return lm_softmax_bytes(config, tokens, config.d_model, 4) / 2**20


def peak_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def in_subprocess(kind: str, batch: int, seq_len: int, samples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", kind, str(batch), str(seq_len),
                          str(samples)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--full-tokens", type=int, nargs="+", default=[384, 512, 768],
                        help="micro-batch sizes (tokens, one sequence each) the full softmax runs at")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, batch, seq_len, samples = args.case
        print(json.dumps(run_case(kind, int(batch), int(seq_len), int(samples))))
        return
    tokens = args.batch * args.seq_len
    sampled = in_subprocess("sampled", args.batch, args.seq_len, args.samples)
    full = [in_subprocess("full", 1, n, args.samples) for n in args.full_tokens]
    # The line through the two largest: at small micro-batches another transient sets the peak.
    slope = (full[-1]["peak_mib"] - full[-2]["peak_mib"]) / (full[-1]["tokens"] - full[-2]["tokens"])
    extrapolated = full[-1]["peak_mib"] + slope * (tokens - full[-1]["tokens"])
    print(f"\nOne training step of {PRESET} at a {VOCAB:,}-word vocabulary, FactoredAdam, fp32, "
          f"threads={torch.get_num_threads()}\n")
    print("| softmax | tokens | peak (MiB) | before the step (MiB) | softmax activations, "
          "plan (MiB) | step (s) |")
    print("|---|---|---|---|---|---|")
    for case in [sampled, *full]:
        label = f"sampled, {args.samples} draws" if case["kind"] == "sampled" else "full"
        print(f"| {label} | {case['tokens']} | {case['peak_mib']:.0f} | "
              f"{case['before_step_mib']:.0f} | {case['planned_softmax_mib']:.0f} | "
              f"{case['step_s']:.1f} |")
    print(f"| full (extrapolated, not run) | {tokens} | {extrapolated:.0f} | "
          f"{full[0]['before_step_mib']:.0f} | {full_plan(tokens):.0f} | - |")
    print(f"\nfull / sampled at {tokens} tokens: {extrapolated / sampled['peak_mib']:.2f}x "
          f"(full softmax: {slope:.2f} MiB more per token, measured)")


def full_plan(tokens: int) -> float:
    from sparse_moe.models import lm_preset

    return planned_softmax_mib(lm_preset(PRESET, vocab_size=VOCAB), tokens)


if __name__ == "__main__":
    main()
