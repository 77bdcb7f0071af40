"""Throughput of the expert-parallel MoE layer (forward+backward) against one process.

Every rank keeps a fixed batch of tokens; the world grows with ``ep_size`` (pure expert
parallelism: world == ep_size), so ideal weak scaling keeps tokens/s per rank constant.
Rows:
  local        the layer with its LocalDispatcher, no process group (the baseline)
  ep=1         the expert-parallel dispatcher on a one-rank group (its bookkeeping alone)
  ep=2, ep=4   the expert-parallel dispatcher across 2 and 4 processes

``comm`` is the fraction of the step each rank spends inside collectives (the count
exchange, both all-to-alls forward and backward, the statistics all-reduces), timed with
the dispatcher's own timer. On a CPU box the ranks share the cores, so the figures are
about overheads, not speed. Usage:

    python benchmarks/expert_parallel.py                    # gloo on CPU, ep 1, 2, 4
    python benchmarks/expert_parallel.py --quick
    python benchmarks/expert_parallel.py --device cuda --backend nccl --ep 1   # one GPU
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.multiprocessing as mp


@dataclass
class Setup:
    d_model: int
    d_hidden: int
    num_experts: int
    k: int
    tokens_per_rank: int
    steps: int
    warmup: int
    device: str
    backend: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _layer(setup: Setup):
    from sparse_moe.moe import MoEConfig, build_moe

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=setup.d_model, d_hidden=setup.d_hidden,
                    num_experts=setup.num_experts, k=setup.k)
    return build_moe(cfg).to(setup.device)


def _time_steps(layer, setup: Setup, dispatcher=None) -> tuple[float, float]:
    """Median seconds per forward+backward, and the mean fraction of it in collectives."""
    x = torch.randn(setup.tokens_per_rank, setup.d_model, device=setup.device)
    times, comm = [], []
    for step in range(setup.warmup + setup.steps):
        if dispatcher is not None:
            dispatcher.timer.reset()
        _sync(setup.device)
        start = time.perf_counter()
        out = layer(x)
        (out.y.square().mean() + out.aux_loss).backward()
        _sync(setup.device)
        elapsed = time.perf_counter() - start
        if step >= setup.warmup:
            times.append(elapsed)
            comm.append(dispatcher.timer.seconds / elapsed if dispatcher is not None else 0.0)
    return statistics.median(times), statistics.mean(comm)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rank(rank: int, world: int, port: int, setup: Setup, threads: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from sparse_moe.parallel import ExpertParallelConfig, create_expert_parallel_groups, shard_experts
    from sparse_moe.parallel.startup import init_deepspeed_distributed

    init_deepspeed_distributed(setup.backend, timeout=timedelta(seconds=300))
    groups = create_expert_parallel_groups(world)
    layer = _layer(setup)
    dispatcher = shard_experts(layer, groups,
                               ExpertParallelConfig(ep_size=world, time_communication=True))
    seconds, comm = _time_steps(layer, setup, dispatcher)
    gathered = [None] * world
    dist.all_gather_object(gathered, (seconds, comm))
    if rank == 0:
        results.put(gathered)
    dist.barrier()
    dist.destroy_process_group()


def run_ep(world: int, setup: Setup, threads: int) -> tuple[float, float]:
    """Slowest rank's step time and the mean communication fraction over ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, world, port, setup, threads, results))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    gathered = results.get(timeout=1800)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"benchmark rank exited with code {proc.exitcode}")
    return max(s for s, _ in gathered), statistics.mean(c for _, c in gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per process (1: ranks do not fight for cores)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps")
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.d_hidden, args.tokens, args.steps, args.warmup = 64, 128, 512, 3, 1
    setup = Setup(args.d_model, args.d_hidden, args.experts, args.k, args.tokens, args.steps,
                  args.warmup, args.device, args.backend)
    cores = os.cpu_count() or 1

    torch.set_num_threads(args.threads)
    base_seconds, _ = _time_steps(_layer(setup), setup)
    base_rate = setup.tokens_per_rank / base_seconds
    print(f"d_model={setup.d_model} d_hidden={setup.d_hidden} experts={setup.num_experts} "
          f"k={setup.k} tokens/rank={setup.tokens_per_rank} device={setup.device} "
          f"backend={setup.backend} cores={cores} threads/process={args.threads}")
    header = (f"{'layout':<8} {'world':>5} {'step ms':>9} {'tokens/s':>10} "
              f"{'tokens/s/rank':>14} {'vs local':>9} {'comm':>6}")
    print(header)
    print("-" * len(header))
    print(f"{'local':<8} {1:>5} {base_seconds * 1e3:>9.1f} {base_rate:>10.0f} "
          f"{base_rate:>14.0f} {1.0:>9.2f} {'-':>6}")
    for ep in args.ep:
        if setup.num_experts % ep:
            print(f"ep={ep}: skipped ({setup.num_experts} experts do not split {ep} ways)")
            continue
        seconds, comm = run_ep(ep, setup, args.threads)
        rate = ep * setup.tokens_per_rank / seconds
        print(f"{'ep=' + str(ep):<8} {ep:>5} {seconds * 1e3:>9.1f} {rate:>10.0f} "
              f"{rate / ep:>14.0f} {rate / ep / base_rate:>9.2f} {comm:>6.1%}")


if __name__ == "__main__":
    main()
