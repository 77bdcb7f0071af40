"""Bad configs and inputs get clear errors that name the field, the expected and found value."""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import HierarchicalMoE, MoE, MoEConfig, build_moe


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), r"MoEConfig\.k: expected an integer in \[1, num_experts=8\], found 0"),
    (dict(k=9), r"MoEConfig\.k: expected .* found 9"),
    (dict(d_model=0), r"MoEConfig\.d_model: expected a positive integer, found 0"),
    (dict(d_hidden=-4), r"MoEConfig\.d_hidden: expected a positive integer, found -4"),
    (dict(num_experts=0), r"MoEConfig\.num_experts: expected a positive integer, found 0"),
    (dict(expert_type="conv"), r"MoEConfig\.expert_type: expected one of \('ffn',\), found 'conv'"),
    (dict(gating="switch"), r"MoEConfig\.gating: expected one of .* found 'switch'"),
    (dict(w_load=-0.1), r"MoEConfig\.w_load: expected a non-negative number, found -0\.1"),
    (dict(noise_epsilon=0.0), r"MoEConfig\.noise_epsilon: expected a positive number"),
    (dict(num_groups=3), r"MoEConfig\.num_experts: expected a multiple of num_groups=3, found 8"),
    (dict(num_groups=2, k_primary=3, k=1), r"MoEConfig\.k_primary: expected .*num_groups=2.*found 3"),
    (dict(num_groups=2, k=5), r"MoEConfig\.k: expected an integer in \[1, experts per group=4\]"),
    (dict(num_groups=2, k=1, gating="strict_balanced"), r"MoEConfig\.gating: expected noisy_topk"),
])
def test_invalid_config(kwargs, message):
    base = dict(d_model=4, d_hidden=8, num_experts=8, k=2)
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**base, **kwargs})


def test_unknown_yaml_field_is_named():
    with pytest.raises(ValueError, match=r"configs/lm\.yaml: unknown MoEConfig field\(s\) \['topk'\]"):
        MoEConfig.from_dict({"d_model": 4, "d_hidden": 8, "num_experts": 4, "topk": 2},
                            source="configs/lm.yaml")


def test_layer_kind_must_match_config():
    with pytest.raises(ValueError, match="use HierarchicalMoE"):
        MoE(MoEConfig(4, 8, 8, k=1, num_groups=2))
    with pytest.raises(ValueError, match="expected num_groups > 0"):
        HierarchicalMoE(MoEConfig(4, 8, 8, k=1))
    assert isinstance(build_moe(MoEConfig(4, 8, 8, k=1, num_groups=2)), HierarchicalMoE)


def test_wrong_last_dimension():
    moe = MoE(MoEConfig(16, 8, 4, k=2))
    with pytest.raises(ValueError, match=r"expected last dimension d_model=16, found 12 "
                                         r"\(input shape \(3, 5, 12\)\)"):
        moe(torch.randn(3, 5, 12))


def test_integer_input():
    with pytest.raises(ValueError, match="expected a floating-point tensor, found torch.int64"):
        MoE(MoEConfig(4, 8, 4, k=2))(torch.ones(3, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_in_check_mode(bad):
    moe = MoE(MoEConfig(4, 8, 4, k=2, check_finite=True))
    x = torch.randn(5, 4)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"expected finite values, found 1 NaN/Inf entries"):
        moe(x)


def test_wrong_noise_shape():
    moe = MoE(MoEConfig(4, 8, 4, k=2)).train()
    with pytest.raises(ValueError, match=r"noise: expected shape \[\.\.\., 4\] with 6 tokens, "
                                         r"found \(6, 3\)"):
        moe(torch.randn(6, 4), noise=torch.randn(6, 3))
    hier = HierarchicalMoE(MoEConfig(4, 8, 4, k=1, num_groups=2)).train()
    with pytest.raises(ValueError, match="expected a pair"):
        hier(torch.randn(6, 4), noise=torch.randn(6, 2))


@pytest.mark.parametrize("config", [
    MoEConfig(4, 8, 4, k=2), MoEConfig(4, 8, 4, k=2, gating="strict_balanced"),
    MoEConfig(4, 8, 4, k=1, num_groups=2),
])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_returns_empty_output_and_zero_loss(config, training):
    moe = build_moe(config).train(training)
    x = torch.randn(2, 0, 4, requires_grad=True)
    out = moe(x)
    assert out.y.shape == (2, 0, 4)
    assert float(out.aux_loss.detach()) == 0.0
    assert out.counts.tolist() == [0] * 4
    (out.y.sum() + out.aux_loss).backward()  # no crash on the way back either
