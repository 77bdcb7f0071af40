"""The plan of every Table 7 and Table 8 language model on the paper's own GPUs and on 80 GB
GPUs: the tables of ``docs/scaling.md``, made by ``sparse-moe-plan``'s own code.

    python benchmarks/paper_plans.py                 # print the tables
    python benchmarks/paper_plans.py --write         # and rewrite docs/scaling.md's tables

Each model at the paper's GPU count and expert-parallel layout (``paper_layout``), the
1B-word vocabulary (793,471 words; full softmax, and in one table the sampled softmax of 8192
draws), ``--tokens`` tokens a GPU per micro-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
GIB = 2**30
K40 = 12 * 10**9  # 12 GB
H100 = 80 * 10**9  # 80 GB (A100-80GB, H100)
REGIMES = {  # name -> (device memory, overrides)
    "K40 12 GB, fp32": (K40, ["deepspeed.config=ds_configs/cpu_fp32.json"]),
    "80 GB, fp32": (H100, ["deepspeed.config=ds_configs/cpu_fp32.json"]),
    "80 GB, zero1_bf16": (H100, ["deepspeed.config=ds_configs/zero1_bf16.json"]),
    "K40 12 GB, fp32, sampled softmax": (K40, ["deepspeed.config=ds_configs/cpu_fp32.json",
                                               "model.overrides.softmax.kind=sampled",
                                               "model.overrides.softmax.num_samples=8192"]),
}


def plan_preset(name: str, overrides: list[str], memory: int, tokens: int):
    from sparse_moe.models.presets import paper_layout
    from sparse_moe.plan.cli import load_config
    from sparse_moe.plan.planner import plan_run
    from sparse_moe.train.tasks import resolve_model_config

    gpus, ep = paper_layout(name)
    config = load_config(None, [f"model.preset={name}", f"parallel.ep_size={ep}",
                                "data.micro_batch_size=1", f"data.seq_len={tokens}",
                                *overrides])
    model = resolve_model_config(config, 793_471)
    return plan_run(config, model, gpus, "cuda", memory)


def table(regime: str, tokens: int) -> str:
    from sparse_moe.models.presets import PAPER_LM_100B_TABLE, PAPER_LM_TABLE, paper_layout

    memory, overrides = REGIMES[regime]
    lines = ["| model | GPUs | ep_size | parameters a GPU (M) | weights + gradients + "
             "optimizer (GiB) | buffers (GiB) | activations (GiB) | total (GiB) | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in PAPER_LM_TABLE + PAPER_LM_100B_TABLE:
        plan = plan_preset(name, overrides, memory, tokens)
        b = plan.bytes_per_rank
        state = (b["parameters"] + b["gradients"] + b["optimizer"]) / GIB
        gpus, ep = paper_layout(name)
        lines.append(f"| {name} | {gpus} | {ep} | {plan.params_per_rank / 1e6:,.1f} | "
                     f"{state:.2f} | {b['buffers'] / GIB:.2f} | {b['activations'] / GIB:.2f} | "
                     f"{b['total'] / GIB:.2f} | {'yes' if plan.fits else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=640)
    parser.add_argument("--write", action="store_true", help=f"rewrite the tables in {DOC}")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up log
        tables = {regime: table(regime, args.tokens) for regime in REGIMES}
    for regime, text in tables.items():
        print(f"### {regime}\n\n{text}\n")
    if args.write:
        doc = DOC.read_text(encoding="utf-8")
        for regime, text in tables.items():
            pattern = re.compile(rf"(<!-- plan: {re.escape(regime)} -->\n).*?(\n<!-- end -->)",
                                 re.DOTALL)
            if not pattern.search(doc):
                raise SystemExit(f"{DOC}: no '<!-- plan: {regime} -->' block to rewrite")
            doc = pattern.sub(lambda m, text=text: m.group(1) + text + m.group(2), doc)
        DOC.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
