"""GPUs in the test suite: the pytest process keeps them, the processes the tests start get
none unless a test asks (``gpu_environment``).

On a GPU machine the trainer and DeepSpeed pick CUDA whenever they see a GPU, so the CPU
tests' training runs, launchers and spawned ranks would all land on GPU 0 (and a second
local rank on no GPU at all). Hiding the GPUs from child processes keeps every CPU test on
the CPU, as on CI. The pytest process initialises CUDA before hiding them: the driver reads
``CUDA_VISIBLE_DEVICES`` once, when it starts, so this process keeps its GPUs.
"""

from __future__ import annotations

import os

import torch

ORIGINAL = "SPARSE_MOE_TESTS_CUDA_VISIBLE_DEVICES"  # what the suite started with
UNSET = "(unset)"


def hide_from_child_processes() -> int:
    """The number of GPUs this process sees; children see none from here on."""
    if ORIGINAL in os.environ or not torch.cuda.is_available():
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    torch.zeros(1, device="cuda")  # CUDA starts now, with the GPUs of the original setting
    os.environ[ORIGINAL] = os.environ.get("CUDA_VISIBLE_DEVICES", UNSET)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return torch.cuda.device_count()


def gpu_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` (a child's whole environment) with the suite's original GPUs visible again."""
    env = dict(env)
    original = env.pop(ORIGINAL, None)
    if original is None:
        return env
    if original == UNSET:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = original
    return env
