"""The process a rank runs in: its device and process groups, and the numeric settings that
must be made before CUDA or the allocator start (``run.deterministic``, ``run.tf32``,
``run.retain_host_memory``)."""

from __future__ import annotations

import os

import torch

from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import init_distributed
from sparse_moe.train.host_memory import retain_freed_host_memory


def start_process(config: TrainConfig) -> torch.device:
    """Process groups up, this rank's device chosen and configured; returns the device."""
    if config.run.deterministic:
        use_deterministic_kernels()  # before CUDA starts: cuBLAS reads its workspace then
    device = init_distributed(config.run.collective_timeout_minutes)
    if device.type == "cuda" and config.run.tf32:
        allow_tf32()
    if device.type == "cpu" and config.run.retain_host_memory:
        retain_freed_host_memory()  # before the model, engine and buffers are allocated
    return device


def allow_tf32() -> None:
    """``run.tf32``: fp32 matrix products and convolutions on the GPU's TF32 tensor cores (a
    10-bit mantissa for the products, fp32 accumulation), which fp32 runs (and the fp32 parts
    of bf16 runs: the LSTMs' fallback, the gates) otherwise do on the slower fp32 units."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def use_deterministic_kernels() -> None:
    """``run.deterministic``: kernels that give the same bits every run.

    On a GPU, atomic additions (the backward of the dispatch's row gather, which adds each
    token's k gradients with ``index_add``) and cuBLAS's split reductions otherwise sum in an
    order that changes between runs. Kernels with no deterministic version warn instead of
    failing (``warn_only``).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
