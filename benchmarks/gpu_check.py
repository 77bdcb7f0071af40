"""The GPU check: what one GPU does with this stack, as one table (``benchmarks/gpu_check.sh``).

    bash benchmarks/gpu_check.sh                   # on a GPU machine, after `make install`
    python benchmarks/gpu_check.py --tiny --device cpu   # every section at toy size, anywhere

Sections, each bounded in time and reported as a row even when it fails:
  environment  GPU, compute capability, torch, CUDA, NCCL and cuDNN versions
  cuda tests   ``pytest -m cuda tests/cuda``: passed, failed, skipped
  layer        the MoE layer's forward+backward against the dense ideal (one FFN of k experts'
               width, no routing) in bf16, at 16, 64 and 256 experts (benchmarks/moe_layer.py)
  expert gemm  the experts' product (``sparse_moe.moe.experts.grouped_matmul``) in TFLOP/s,
               against one dense GEMM of the per-expert shape and the GPU's bf16 peak
  training     MoE-32 against MoE-1-Wide (the same multiply-adds, no routing): tokens/s of
               real bf16 ZeRO-1 runs (benchmarks/train_lm.py), model FLOPs utilisation (the
               planner's multiply-adds), and each run's peak memory against the planner's

Targets (from the GPU readiness issue): the expert GEMM at least 0.85 of the dense GEMM with
512 rows or more per expert; the layer at most 1.15x the dense ideal up to 64 experts;
MoE-32 at least 0.9x MoE-1-Wide's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets,
# matched against torch.cuda.get_device_name in this order (the first substring wins).
BF16_PEAK_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0),
    ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("A6000", 154.8), ("RTX 4090", 165.2),
)
SECTIONS = ("environment", "tests", "layer", "gemm", "training")


@dataclass
class Row:
    section: str
    item: str
    value: str
    versus: str = ""  # the comparison: a ratio against the baseline, a target
    note: str = ""


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named ``device_name``, None when it is not listed."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu runs every section at once on the CPU (with --tiny: a test)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: seconds, not minutes")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS,
                        help="sections left out (their rows say so)")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="layer section: expert counts (default 16 64 256)")
    parser.add_argument("--rows-per-expert", type=int, nargs="+", default=None,
                        help="expert gemm section: rows each expert gets (default 512 2048)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bf16 peak, when the built-in table lacks it")
    parser.add_argument("--tests-timeout", type=int, default=270, help="seconds for pytest")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    args.experts = args.experts or sizes["experts"]
    args.rows_per_expert = args.rows_per_expert or sizes["rows_per_expert"]
    args.train_steps = args.train_steps or sizes["train_steps"]
    for name in ("experts", "rows_per_expert"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected positive counts, found "
                         f"{getattr(args, name)}")
    if args.train_steps < 2:
        parser.error(f"--train-steps: expected 2 or more (the first log window is start-up), "
                     f"found {args.train_steps}")
    args.sizes = sizes
    return args


FULL = dict(experts=[16, 64, 256], rows_per_expert=[512, 2048], d_model=1024, d_hidden=4096,
            tokens=16384, k=4, repeats=10, train_steps=24, batch=64, seq_len=64,
            vocab_size=8000, train_bytes=3_000_000, moe="moe-32", dense="moe-1-wide")
TINY = dict(experts=[4, 8], rows_per_expert=[16], d_model=32, d_hidden=64, tokens=256, k=2,
            repeats=2, train_steps=4, batch=4, seq_len=16, vocab_size=500,
            train_bytes=200_000, moe="debug-moe", dense="debug-dense")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def environment_rows(args) -> list[Row]:
    import torch

    rows = [Row("environment", "torch", torch.__version__)]
    if args.device == "cpu":
        return rows + [Row("environment", "device", "cpu", note="no GPU measured")]
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    nccl = torch.cuda.nccl.version()  # a tuple (2, 27, 3); an int in older builds
    nccl = ".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else str(nccl)
    peak = args.peak_tflops or peak_tflops(name)
    return rows + [
        Row("environment", "GPU", name, note=f"{torch.cuda.device_count()} visible"),
        Row("environment", "compute capability", f"{major}.{minor}"),
        Row("environment", "CUDA", str(torch.version.cuda)),
        Row("environment", "NCCL", nccl),
        Row("environment", "cuDNN", str(torch.backends.cudnn.version())),
        Row("environment", "bf16 peak", "unknown" if peak is None else f"{peak:g} TFLOP/s",
            note="--peak-tflops" if args.peak_tflops else "data sheet"),
    ]


def pytest_counts(output: str) -> dict[str, int]:
    """passed/failed/skipped/error counts from pytest's last summary line."""
    counts = {key: 0 for key in ("passed", "failed", "skipped", "error", "deselected")}
    lines = [line for line in output.strip().splitlines() if re.search(r"\d+ \w+", line)]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                   lines[-1] if lines else ""):
        counts["error" if word.startswith("error") else word] += int(number)
    return counts


def test_rows(args) -> list[Row]:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               "tests/cuda"]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=args.tests_timeout)
    except subprocess.TimeoutExpired:
        return [Row("cuda tests", "pytest -m cuda", "timed out",
                    note=f"over {args.tests_timeout} s")]
    counts = pytest_counts(proc.stdout)
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED", "ERROR"))]
    value = f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, " \
            f"{counts['skipped']} skipped"
    return [Row("cuda tests", "pytest -m cuda tests/cuda", value,
                note=f"{time.monotonic() - started:.0f} s" + (f"; {', '.join(failed)}"
                                                             if failed else ""))]


def layer_rows(args) -> list[Row]:
    from moe_layer import Case, spawn

    sizes, rows = args.sizes, []
    dtype = "bf16"
    base = dict(d_model=sizes["d_model"], d_hidden=sizes["d_hidden"], tokens=sizes["tokens"],
                device=args.device, dtype=dtype, repeats=sizes["repeats"])
    for experts in args.experts:
        ideal = spawn(Case("dense-ideal", experts, sizes["k"], **base))
        moe = spawn(Case("sparse-moe", experts, sizes["k"], **base))
        item = f"{experts} experts, k={sizes['k']}"
        if "error" in ideal or "error" in moe:
            rows.append(Row("layer", item, "error", note=ideal.get("error") or moe.get("error")))
            continue
        ratio = moe["seconds"] / ideal["seconds"]
        target = " (target <= 1.15)" if experts <= 64 else ""
        rows.append(Row("layer", item, f"{moe['seconds'] * 1e3:.2f} ms",
                        f"{ratio:.2f}x dense ideal{target}",
                        f"dense ideal {ideal['seconds'] * 1e3:.2f} ms; {sizes['tokens']} tokens,"
                        f" d={sizes['d_model']}, expert hidden {sizes['d_hidden']}, {dtype}"))
    return rows


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after a warm-up, synchronised on GPUs."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rows(args, peak: float | None) -> list[Row]:
    """The experts' first product (``[rows, d] x [d, hidden]`` per expert, bf16)."""
    import torch

    from sparse_moe.moe.experts import expert_gemm_kernel, group_offsets, grouped_matmul

    sizes, rows = args.sizes, []
    d, h, dtype = sizes["d_model"], sizes["d_hidden"], torch.bfloat16
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    kernel = expert_gemm_kernel(device, dtype)
    for experts in (max(args.experts[0], 2), 64 if not args.tiny else args.experts[-1]):
        for per_expert in args.rows_per_expert:
            x = torch.randn(experts * per_expert, d, device=device, dtype=dtype)
            w = torch.randn(experts, d, h, device=device, dtype=dtype)
            offsets = group_offsets(torch.full((experts,), per_expert, device=device))
            grouped = _timed(lambda x=x, w=w, offsets=offsets: grouped_matmul(x, w, offsets),
                             args.device, sizes["repeats"])
            dense = _timed(lambda one=x[:per_expert], w0=w[0]: one @ w0, args.device,
                           sizes["repeats"])
            flops = 2 * per_expert * d * h
            grouped_tflops = flops * experts / grouped / 1e12
            dense_tflops = flops / dense / 1e12
            of_peak = f", {grouped_tflops / peak:.0%} of peak" if peak else ""
            target = " (target >= 0.85)" if per_expert >= 512 else ""
            rows.append(Row("expert gemm", f"{experts} x [{per_expert}, {d}] x [{d}, {h}]",
                            f"{grouped_tflops:.3g} TFLOP/s",
                            f"{grouped_tflops / dense_tflops:.2f}x dense{target}",
                            f"dense GEMM of one expert's shape {dense_tflops:.3g} TFLOP/s"
                            f"{of_peak}; kernel {kernel}"))
    return rows


def contender_plan(overrides: list[str], device: str, vocab_size: int | None = None):
    """The planner's view of one process running ``overrides``: multiply-adds and memory."""
    import contextlib

    from sparse_moe.plan.cli import build_parser, make_plan

    argv = [*overrides, "--world", "1", "--device", device]
    if vocab_size is not None:
        argv += ["--vocab-size", str(vocab_size)]
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger writes to stdout
        return make_plan(build_parser().parse_intermixed_args(argv))


def flops_per_token(plan) -> float:
    """Training FLOPs per token: 2 per multiply-add of the planner's count (forward and
    backward as 3 x forward, the softmax included; one micro-step a step here)."""
    return 2.0 * plan.multiply_adds_per_step / plan.tokens_per_micro_batch


def memory_note(result: dict, plan, device: str) -> str:
    """The run's peak beside the plan: on GPUs the allocator's peak against the plan's
    tensors (the CUDA context is outside both), on CPU the resident peak against the total."""
    mib = 2**20
    if device == "cuda" and result.get("peak_device_mib"):
        tensors = (plan.bytes_per_rank["total"] - plan.bytes_per_rank["framework"]) / mib
        return (f"peak {result['peak_device_mib']:,.0f} MiB allocated, "
                f"{result['peak_device_reserved_mib']:,.0f} reserved; plan {tensors:,.0f} MiB of "
                f"tensors ({result['peak_device_mib'] / tensors:.2f}x)")
    total = plan.bytes_per_rank["total"] / mib
    return (f"peak {result['peak_rss_mib']:,.0f} MiB resident; plan {total:,.0f} MiB "
            f"({result['peak_rss_mib'] / total:.2f}x)")


def training_rows(args, peak: float | None) -> list[Row]:
    from train_lm import contender_overrides, run_contender
    from wikitext import build_corpus

    sizes = args.sizes
    extra = ("deepspeed.config=ds_configs/zero1_bf16.json",) if args.device == "cuda" else ()
    run_args = argparse.Namespace(steps=args.train_steps, log_every=max(1, args.train_steps // 4),
                                  batch=sizes["batch"], seq_len=sizes["seq_len"])
    results, plans = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        work_dir = Path(work)
        corpus, tokenizer = build_corpus(work_dir, sizes["vocab_size"], sizes["train_bytes"])
        for name in (sizes["moe"], sizes["dense"]):
            overrides = contender_overrides(name, run_args, corpus, tokenizer, work_dir / name,
                                            extra=extra)
            plans[name] = contender_plan(overrides, args.device)
            results[name] = run_contender(name, name, run_args, corpus, tokenizer, work_dir,
                                          extra=extra)
    dense = results[sizes["dense"]]
    rows = []
    for name, result in results.items():
        if "error" in result:
            rows.append(Row("training", name, "error", note=result["error"]))
            continue
        flops = flops_per_token(plans[name]) * result["tokens_per_second"]
        mfu = f"MFU {flops / (peak * 1e12):.1%}" if peak else f"{flops / 1e12:.3g} TFLOP/s"
        versus = ""
        if name == sizes["moe"] and "error" not in dense:
            versus = f"{result['tokens_per_second'] / dense['tokens_per_second']:.2f}x " \
                     f"{sizes['dense']} (target >= 0.9)"
        rows.append(Row("training", name, f"{result['tokens_per_second']:,.0f} tokens/s", versus,
                        f"{mfu}; {'bf16 ZeRO-1' if extra else 'fp32'}, batch {sizes['batch']} x "
                        f"{sizes['seq_len']}, vocab {sizes['vocab_size']}; "
                        + memory_note(result, plans[name], args.device)))
    return rows


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def render(rows: list[Row]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    header = Row("section", "item", "value", "versus", "note")
    cells = [[r.section, r.item, r.value, r.versus, r.note] for r in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_section(name: str, fn, *fn_args) -> list[Row]:
    """A section's rows; an exception becomes a row naming it, so the table is always whole."""
    try:
        return fn(*fn_args)
    except Exception as error:  # noqa: BLE001 - reported in the table, the check goes on
        return [Row(name, "(section)", "error", note=f"{type(error).__name__}: {error}"[:200])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; install a CUDA "
                  f"build (make install on the GPU machine) or pass --device cpu",
                  file=sys.stderr)
            return 2
    rows = run_section("environment", environment_rows, args)
    peak = None
    if args.device == "cuda":
        import torch

        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name(0))
    steps = (("tests", test_rows, args), ("layer", layer_rows, args),
             ("gemm", gemm_rows, args, peak), ("training", training_rows, args, peak))
    for name, fn, *fn_args in steps:
        if name in args.skip:
            rows.append(Row(name, "(section)", "skipped", note="--skip"))
            continue
        started = time.monotonic()
        print(f"gpu_check: {name}...", file=sys.stderr, flush=True)
        try:
            rows.extend(run_section(name, fn, *fn_args))
        except KeyboardInterrupt:  # the time limit (gpu_check.sh): print what was measured
            rows.append(Row(name, "(section)", "interrupted",
                            note=f"after {time.monotonic() - started:.0f} s"))
            break
        print(f"gpu_check: {name} took {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
