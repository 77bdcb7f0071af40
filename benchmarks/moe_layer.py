"""Forward+backward time and peak memory of the MoE layer against its peers, in one run.

Contenders, each at the same token count and expert size:
  dense-ideal  one feed-forward network with hidden k*d_hidden: the multiply-adds of the k
               chosen experts with none of the routing (the ideal an MoE can only approach)
  sparse-moe   this project's layer (noisy top-k, dropless; on CPU the expert products
               run on worker threads, equal groups as one padded bmm; see
               sparse_moe.moe.cpu_experts.use_cpu_workers and use_padded_batches)
  sparse-moe-grouped  the same layer with the padded path off (equal groups too take the
               grouped product)
  naive-loop   the same gating, then a Python loop over experts with boolean masks
  deepspeed    deepspeed.moe.layer.MoE (its top-2 gate, capacity factor 1.25), k=2 only

Each (contender, experts, k) runs in its own process, so peak memory is not polluted by the
previous contender's freed buffers. On CPU every contender keeps freed host memory for reuse,
as the trainer does (``--host-memory glibc-default`` measures glibc's defaults instead, where
every large buffer is faulted in afresh at each step). Usage:

    python benchmarks/moe_layer.py                  # the full table (d=512, hidden 1024, 8192 tokens)
    python benchmarks/moe_layer.py --quick          # a small, fast version (the demo)
    python benchmarks/moe_layer.py --device cuda --dtype bf16
    python benchmarks/moe_layer.py --contenders dense-ideal sparse-moe --rounds 5

The vs-dense-ideal column gives, with several rounds, the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("dense-ideal", "sparse-moe", "sparse-moe-grouped", "naive-loop", "deepspeed")


@dataclass
class Case:
    contender: str
    num_experts: int
    k: int
    d_model: int
    d_hidden: int
    tokens: int
    device: str
    dtype: str
    repeats: int
    host_memory: str = "retain"
    warmup: int = 4


# ---------------------------------------------------------------------------------------------
# Worker side: build one contender, time it, report JSON on stdout.
# ---------------------------------------------------------------------------------------------

def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _build(case: Case):
    """Returns (a function running one forward+backward of the contender, its tensors).

    The tensors (parameters and input) get ``grad = None`` before every timed step, as an
    optimizer's ``zero_grad`` leaves them: no step pays for accumulating into old gradients.
    """
    import torch
    from torch import nn

    from sparse_moe.moe import MoE, MoEConfig

    dtype, device = _torch_dtype(case.dtype), torch.device(case.device)
    d, h, n, k = case.d_model, case.d_hidden, case.num_experts, case.k
    x = torch.randn(case.tokens, d, device=device, dtype=dtype, requires_grad=True)

    if case.contender == "dense-ideal":
        net = nn.Sequential(nn.Linear(d, k * h), nn.ReLU(), nn.Linear(k * h, d)).to(device, dtype)
        return (lambda: net(x).sum().backward()), [x, *net.parameters()]
    if case.contender == "sparse-moe-grouped":
        from sparse_moe.moe import cpu_experts as experts

        experts.CPU_PADDED_MAX_WASTE = 0.0  # never pad: every call takes the grouped product
    if case.contender in ("sparse-moe", "sparse-moe-grouped"):
        moe = MoE(MoEConfig(d, h, n, k=k)).to(device, dtype).train()
        return (lambda: _backward_moe(moe(x))), [x, *moe.parameters()]
    if case.contender == "naive-loop":
        moe = NaiveLoopMoE(MoE(MoEConfig(d, h, n, k=k)).to(device, dtype).train())
        return (lambda: moe(x).sum().backward()), [x, *moe.moe.parameters()]
    if case.contender == "deepspeed":
        moe = _deepspeed_moe(d, h, n, k).to(device, dtype).train()

        def step():
            y, l_aux, _ = moe(x.unsqueeze(0))
            (y.sum() + l_aux).backward()
        return step, [x, *moe.parameters()]
    raise ValueError(f"unknown contender {case.contender!r}")


def _backward_moe(out) -> None:
    (out.y.sum() + out.aux_loss).backward()


class NaiveLoopMoE:
    """The same gate, then one masked gather/compute/scatter per expert in Python."""

    def __init__(self, moe) -> None:
        self.moe = moe

    def __call__(self, x):
        import torch

        decision = self.moe.router.decide(x)
        y = torch.zeros_like(x)
        weights = self.moe.experts.weights
        biases = self.moe.experts.biases
        for e in range(self.moe.config.num_experts):
            token, slot = (decision.expert_idx == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = x[token] @ weights[0][e]
            h = torch.relu(h + biases[0][e] if biases is not None else h)
            out = h @ weights[1][e]
            out = out + biases[1][e] if biases is not None else out
            y.index_add_(0, token, out * decision.gates[token, slot].unsqueeze(1).to(x.dtype))
        return y


def _deepspeed_moe(d: int, h: int, n: int, k: int):
    """DeepSpeed's MoE layer on a one-process group (its documented single-rank use)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from torch import nn

    from sparse_moe.parallel.startup import init_deepspeed_distributed

    init_deepspeed_distributed("gloo")
    expert = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
    moe = DeepSpeedMoE(hidden_size=d, expert=expert, num_experts=n, ep_size=1, k=k,
                       capacity_factor=1.25, eval_capacity_factor=1.25)
    moe.set_deepspeed_parallelism()
    return moe


class PeakMemory:
    """Peak memory of the steps above what the built contender holds.

    CUDA: the allocator's peak. CPU: the process's high-water mark (VmHWM) minus its resident
    size before the first step; nothing samples while the steps are timed.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _rss()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self.peak = _high_water_mark() - self._base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_case(case: Case) -> dict:
    import torch

    if case.device == "cpu" and case.host_memory == "retain":
        from sparse_moe.train.host_memory import retain_freed_host_memory

        retain_freed_host_memory()  # as the trainer does on CPU
    torch.manual_seed(0)
    step, tensors = _build(case)
    sync = torch.cuda.synchronize if case.device.startswith("cuda") else (lambda: None)
    times = []
    with PeakMemory(case.device) as memory:
        for _ in range(case.warmup):  # kernels, DeepSpeed's lazy set-up, the heap's growth
            for tensor in tensors:
                tensor.grad = None
            step()
        sync()
        for _ in range(case.repeats):
            for tensor in tensors:
                tensor.grad = None
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": memory.peak}


# ---------------------------------------------------------------------------------------------
# Driver side: one subprocess per case, then the table.
# ---------------------------------------------------------------------------------------------

def spawn(case: Case) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(case))],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cases_for(args) -> list[Case]:
    base = dict(d_model=args.d_model, d_hidden=args.d_hidden, tokens=args.tokens,
                device=args.device, dtype=args.dtype, repeats=args.repeats,
                host_memory=args.host_memory, warmup=args.warmup)
    cases = []
    for n in args.experts:
        for contender, k in (("dense-ideal", args.k), ("sparse-moe", args.k),
                             ("sparse-moe-grouped", args.k), ("naive-loop", args.k),
                             ("dense-ideal", 2), ("sparse-moe", 2), ("deepspeed", 2)):
            if contender in args.contenders:
                cases.append(Case(contender, n, k, **base))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast demo")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed steps first; on CPU the heap grows for the first 3-4 steps "
                             "of a large layer (each growth is fresh pages to fault in), after "
                             "which every step reuses it, as a training run does")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole sweep this many times, contenders interleaved; "
                             "report each case's median over the rounds and the range of its "
                             "per-round ratio to the dense ideal (drift on a shared machine then "
                             "hits every contender alike)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--host-memory", default="retain", choices=["retain", "glibc-default"],
                        help="CPU: keep freed memory for reuse, as the trainer does "
                             "(sparse_moe.train.host_memory), or glibc's defaults")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(Case(**json.loads(args.worker)))))
        return
    if args.quick:
        args.d_model, args.d_hidden, args.tokens, args.experts = 256, 512, 2048, [4, 16, 64]
    cases = cases_for(args)
    rounds: list[list[dict]] = [[] for _ in cases]
    for round_number in range(args.rounds):
        for case, measured in zip(cases, rounds):
            result = spawn(case)
            measured.append(result)
            print(f"  round {round_number + 1}: measured {case.contender:12s} "
                  f"n={case.num_experts:<4d} k={case.k}: {_fmt_time(result)}",
                  file=sys.stderr, flush=True)
    results = [(case, merge_rounds(measured)) for case, measured in zip(cases, rounds)]
    print_table(args, results)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), **r} for c, r in results], indent=1))


def merge_rounds(measured: list[dict]) -> dict:
    """One case over the rounds: the median time, the largest peak, every round's time."""
    errors = [r for r in measured if "error" in r]
    if errors:
        return errors[0]
    return {"seconds": statistics.median(r["seconds"] for r in measured),
            "peak_bytes": max(r["peak_bytes"] for r in measured),
            "round_seconds": [r["seconds"] for r in measured]}


def _fmt_time(result: dict) -> str:
    return result["error"] if "error" in result else f"{result['seconds'] * 1e3:.1f} ms"


def print_table(args, results) -> None:
    by_key = {(c.contender, c.num_experts, c.k): r for c, r in results}

    def seconds(contender, n, k):
        return by_key.get((contender, n, k), {}).get("seconds")

    def ratio_to_ideal(result, n, k) -> str:
        ideal = by_key.get(("dense-ideal", n, k), {})
        if "seconds" not in ideal:
            return ""
        text = f"{result['seconds'] / ideal['seconds']:.2f}x"
        if len(result["round_seconds"]) > 1:
            per_round = [a / b for a, b in zip(result["round_seconds"], ideal["round_seconds"])]
            text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
        return text

    print(f"\nMoE layer forward+backward: d_model={args.d_model} d_hidden={args.d_hidden} "
          f"tokens={args.tokens} device={args.device} dtype={args.dtype} "
          f"host memory={args.host_memory} "
          f"(median of {args.repeats} after {args.warmup} untimed; {args.rounds} round(s))\n")
    header = ("| experts | k | contender | time (ms) | peak mem (MiB) | vs dense ideal | "
              "vs deepspeed |")
    print(header)
    print("|" + "---|" * 7)
    for c, r in results:
        if "error" in r:
            print(f"| {c.num_experts} | {c.k} | {c.contender} | error: {r['error']} | | | |")
            continue
        ds = seconds("deepspeed", c.num_experts, c.k)
        vs_ideal = ratio_to_ideal(r, c.num_experts, c.k)
        vs_ds = f"{r['seconds'] / ds:.2f}x" if ds and c.contender != "deepspeed" else ""
        print(f"| {c.num_experts} | {c.k} | {c.contender} | {r['seconds'] * 1e3:.1f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {vs_ideal} | {vs_ds} |")
    first, last = args.experts[0], args.experts[-1]
    t_first, t_last = seconds("sparse-moe", first, args.k), seconds("sparse-moe", last, args.k)
    if t_first and t_last:
        print(f"\nsparse-moe k={args.k}: time at {last} experts / time at {first} experts = "
              f"{t_last / t_first:.2f}x")


if __name__ == "__main__":
    main()
