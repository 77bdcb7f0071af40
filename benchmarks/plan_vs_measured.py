"""Per-rank peak memory of real training runs beside ``sparse-moe-plan``'s total, in one run.

Every scenario is a real multi-process ``sparse-moe-train`` run (torchrun, gloo, CPU) on the
same WikiText-2 shards; its peak is each rank's own high-water mark (VmHWM, from
``summary.json``, the largest over ranks). The plan is ``sparse-moe-plan`` on the same
config, ``--device cpu``.

    python benchmarks/plan_vs_measured.py                    # the regimes, MoE-256-h, EP=2
    python benchmarks/plan_vs_measured.py --billion          # MoE-1024-h, EP=4: train, save,
                                                             # kill -9, resume, compare

``--billion`` trains MoE-1024-h (1.08B parameters) on 4 processes with ``ep_size=4`` for
``--steps`` steps, saving every 2, kills every rank with SIGKILL after the first save, resumes
to the end, and checks that the resumed run's losses equal an uninterrupted run's bit for bit.
It needs about 18 GiB of host memory (4 ranks) and 9 GiB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from wikitext import build_corpus  # noqa: E402  (benchmarks/wikitext.py)

REGIMES = {
    "fp32 ZeRO-0": [],
    "fp32 ZeRO-0, freed memory returned": ["run.retain_host_memory=false"],
    "bf16 ZeRO-0": ["deepspeed.precision=bf16"],
    "fp32 ZeRO-1": ["deepspeed.zero_stage=1"],
    "zero1_bf16.json": ["deepspeed.config=ds_configs/zero1_bf16.json"],
    "zero2_bf16.json": ["deepspeed.config=ds_configs/zero2_bf16.json"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def common(args, corpus: Path, tokenizer: Path) -> list[str]:
    return [f"data.corpus={corpus}", f"data.tokenizer={tokenizer}",
            f"model.preset={args.preset}", f"parallel.ep_size={args.ep}",
            f"data.micro_batch_size={args.batch}", f"data.seq_len={args.seq_len}",
            "tracking.wandb=false", "run.progress=false", "run.eval_batches=1",
            "data.eval_splits=[train]", "run.keep_last=1"]


def train(args, overrides: list[str], run_dir: Path, log: Path, env_extra: dict | None = None,
          kill_after_save: bool = False) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(args.world), "--master-port", str(free_port()), "-m", "sparse_moe.train",
               *overrides, f"run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", **(env_extra or {}))
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if kill_after_save:
            latest = run_dir / "checkpoints" / "latest"
            while proc.poll() is None and not latest.exists():
                time.sleep(0.5)
            kill_every_rank(proc)
        return proc.wait()


def kill_every_rank(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and each worker (torchrun starts each in its own session), and
    wait until they are gone, so that their memory is free before the next run starts."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    pids = [int(pid) for pid in children] + [proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(alive(pid) for pid in pids):
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running (a zombie has freed its memory already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def plan_total(overrides: list[str], world: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "sparse_moe.plan.cli", *overrides, "--world",
                          str(world), "--device", "cpu", "--json"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def peak_mib(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["peak_host_memory_mib"]


def per_rank(run_dir: Path) -> list[int]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return [round(v) for v in summary["peak_host_memory_mib_per_rank"]]


def losses(run_dir: Path) -> dict[int, float]:
    rows = (run_dir / "metrics" / "train_loss.csv").read_text().splitlines()
    return {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows
            if r and not r.startswith("step")}


def row(name: str, measured: float, plan: dict) -> str:
    total = plan["bytes_per_rank"]["total"] / 2**20
    return f"| {name} | {measured:.0f} | {total:.0f} | {measured / total:.3f} |"


def compare_regimes(args, corpus: Path, tokenizer: Path, work: Path) -> None:
    print(f"{args.preset}, world {args.world}, ep_size {args.ep}, {args.batch}x{args.seq_len} "
          f"tokens a micro-batch, {args.steps} steps\n")
    print("| regime | measured peak (MiB) | plan (MiB) | measured / plan |")
    print("|---|---|---|---|")
    for name, extra in REGIMES.items():
        overrides = common(args, corpus, tokenizer) + extra + [f"run.steps={args.steps}"]
        run_dir = work / name.replace(" ", "_").replace(",", "")
        status = train(args, overrides, run_dir, work / f"{run_dir.name}.log")
        if status != 0:
            print(f"| {name} | failed ({status}, see {work / run_dir.name}.log) | | |")
            continue
        print(row(name, peak_mib(run_dir), plan_total(overrides, args.world)), flush=True)


def billion(args, corpus: Path, tokenizer: Path, work: Path) -> None:
    for retain in ("true", "false"):
        print(f"\n#### run.retain_host_memory={retain}\n")
        billion_run(args, corpus, tokenizer, work / f"retain_{retain}",
                    [f"run.retain_host_memory={retain}"])


def billion_run(args, corpus: Path, tokenizer: Path, work: Path, extra: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    overrides = common(args, corpus, tokenizer) + [f"run.steps={args.steps}",
                                                   "run.save_every=2", "run.log_every=1",
                                                   *extra]
    plan = plan_total(overrides, args.world)
    started = time.time()
    assert train(args, overrides, work / "straight", work / "straight.log") == 0
    straight_seconds = time.time() - started
    killed = train(args, overrides, work / "resumed", work / "killed.log", kill_after_save=True)
    assert train(args, overrides + ["run.resume=true"], work / "resumed",
                 work / "resumed.log") == 0
    straight, resumed = losses(work / "straight"), losses(work / "resumed")
    same = all(straight[s] == resumed[s] for s in straight) and straight.keys() == resumed.keys()
    print(f"{args.preset}: {plan['params_per_rank']:,} parameters a rank, "
          f"{args.world} ranks, ep_size {args.ep}; uninterrupted run {straight_seconds:.0f} s")
    print(f"killed run exit status {killed}; resumed losses equal the uninterrupted run's: "
          f"{same} ({len(straight)} steps logged)\n")
    print("| run | measured peak (MiB) | plan (MiB) | measured / plan |")
    print("|---|---|---|---|")
    print(row("uninterrupted", peak_mib(work / "straight"), plan))
    print(row("resumed after kill -9", peak_mib(work / "resumed"), plan))
    parts = {k: f"{v / 2**20:.0f}" for k, v in plan["bytes_per_rank"].items()}
    print(f"\nplan components (MiB): {parts}")
    print(f"ranks' peaks (MiB): uninterrupted {per_rank(work / 'straight')}, resumed "
          f"{per_rank(work / 'resumed')}")
    if not same:
        raise SystemExit("the resumed run's losses differ from the uninterrupted run's")
    for run in ("straight", "resumed"):  # 4 GiB a checkpoint: free the disk for the next
        shutil.rmtree(work / run / "checkpoints")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--billion", action="store_true")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--ep", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    defaults = (("moe-1024-h", 4, 4, 6) if args.billion else ("moe-256-h", 2, 2, 3))
    for key, value in zip(("preset", "world", "ep", "steps"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    work = args.work or Path(tempfile.mkdtemp(prefix="sparse-moe-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = build_corpus(work, vocab_size=1000, train_bytes=400_000)
    (billion if args.billion else compare_regimes)(args, corpus, tokenizer, work)


if __name__ == "__main__":
    main()
