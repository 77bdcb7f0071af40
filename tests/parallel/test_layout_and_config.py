"""Single-process checks: the receive permutation, layout rules and config errors."""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import MoEConfig
from sparse_moe.parallel import ExpertParallelConfig, check_layout, source_major_to_expert_major


def _naive_expert_major(counts: torch.Tensor) -> list[int]:
    """Row indices written out block by block, the obvious way."""
    starts, position = {}, 0
    for s in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            starts[s, j] = position
            position += int(counts[s, j])
    return [starts[s, j] + i for j in range(counts.shape[1]) for s in range(counts.shape[0])
            for i in range(int(counts[s, j]))]


@pytest.mark.parametrize("counts", [
    [[2, 0, 1], [0, 3, 1]],
    [[0, 0], [0, 0]],
    [[5], [0], [2], [1]],
    [[0, 4], [3, 0]],
])
def test_receive_permutation_matches_block_by_block_order(counts):
    counts = torch.tensor(counts)
    assert source_major_to_expert_major(counts).tolist() == _naive_expert_major(counts)


def test_layout_errors_name_the_field_and_values():
    with pytest.raises(ValueError, match=r"ep_size: expected a divisor of "
                                         r"MoEConfig\.num_experts=6, found 4"):
        check_layout(MoEConfig(d_model=8, d_hidden=8, num_experts=6, k=1), 4)
    with pytest.raises(ValueError, match=r"num_groups=2 \(each group of experts lives on one "
                                         r"rank\), found 4"):
        check_layout(MoEConfig(d_model=8, d_hidden=8, num_experts=8, num_groups=2, k=1), 4)
    check_layout(MoEConfig(d_model=8, d_hidden=8, num_experts=8, num_groups=4, k=1), 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ep_size=0), r"ep_size: expected a positive integer, found 0"),
    (dict(capacity_factor=0.0), r"capacity_factor: expected None \(dropless\) or a positive"),
    (dict(min_capacity=-1), r"min_capacity: expected a non-negative integer, found -1"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertParallelConfig(**kwargs)


def test_unknown_yaml_field_is_named():
    with pytest.raises(ValueError, match=r"configs/ep\.yaml: unknown ExpertParallelConfig "
                                         r"field\(s\) \['ep'\]"):
        ExpertParallelConfig.from_dict({"ep": 2}, source="configs/ep.yaml")
