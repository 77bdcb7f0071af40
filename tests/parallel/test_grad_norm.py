"""The logged gradient norm against the norm of the whole gradient gathered in one place
(2 CPU processes, gloo): dense gradients count once, each expert's once whatever the layout."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import run_distributed


def _gradients(ep_size: int, rank: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A module of one dense and two expert parameters with gradients as DeepSpeed leaves them
    (dense the same on every rank; an expert's the same on the ranks that hold it), and every
    expert's gradient of the whole model, for the reference."""
    dense = torch.nn.Parameter(torch.zeros(3, 4))
    dense.grad = torch.arange(12.0).view(3, 4) / 7
    experts_total = [torch.full((5,), 0.5 + e) for e in range(4)]  # 4 experts in the model
    per_rank = 4 // ep_size
    block = rank % ep_size
    module = torch.nn.Module()
    module.dense = dense
    for i in range(per_rank):
        param = torch.nn.Parameter(torch.zeros(5))
        param.allreduce = False  # DeepSpeed's mark of an expert parameter
        param.grad = experts_total[block * per_rank + i].clone()
        module.register_parameter(f"expert{i}", param)
    return module, [dense.grad, *experts_total]


def _worker(rank: int, world: int, ep_size: int) -> tuple[float, float]:
    from sparse_moe.train.step_metrics import global_grad_norm

    module, whole = _gradients(ep_size, rank)
    reference = float(torch.sqrt(sum((g.double() ** 2).sum() for g in whole)))
    return global_grad_norm(module, world, ep_size), reference


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ep_size", [1, 2])
def test_gradient_norm_is_that_of_the_whole_model(ep_size):
    # The squares are summed in the gradients' fp32 (torch's fused norm): a few units of fp32
    # roundoff (2^-24 each) over a handful of terms.
    for norm, reference in run_distributed(_worker, 2, ep_size):
        assert norm == pytest.approx(reference, rel=8 * 2**-24)
