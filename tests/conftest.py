"""Tests marked ``cuda`` run wherever PyTorch sees a GPU and are skipped, with the reason in
the summary (``-ra``), everywhere else; ``multi_gpu`` ones need two GPUs or more. The
processes other tests start see no GPU (``tests/gpus.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.gpus import hide_from_child_processes

GPUS = hide_from_child_processes()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = GPUS
    no_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU: this torch ({torch.__version__}, CUDA "
                                     f"{torch.version.cuda}) sees none")
    one_gpu = pytest.mark.skip(reason=f"needs two CUDA GPUs: this machine has {gpus}")
    for item in items:
        if item.get_closest_marker("cuda") is not None and gpus == 0:
            item.add_marker(no_gpu)
        elif item.get_closest_marker("multi_gpu") is not None and gpus < 2:
            item.add_marker(one_gpu)
