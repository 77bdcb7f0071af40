"""The MoE layer against the dense reference on the training device (CPU here, CUDA on GPUs).

The reference (``tests/moe/reference.py``) runs in fp32 on the same device, on fp32 copies of
the layer's own parameters and input, so the layer in bf16 differs from it only by its own
bf16 roundings. The CPU cases run everywhere and keep the test honest; the ``cuda`` cases
are the same code on a GPU (the grouped GEMM kernel, cuBLAS, the CUDA generator's noise).
"""

from __future__ import annotations

import pytest
import torch

from sparse_moe.moe import HierarchicalMoE, MoE, MoEConfig
from tests.moe import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
D, H = 32, 64
FP32_TOL = 1e-5
# bf16 keeps 8 significant bits (unit roundoff u = 2^-8). The layer rounds its input to the
# experts, their hidden activations, their outputs and the gate-weighted sum: four roundings
# on the way forward, and as many on the way back. Differences are bounded relative to the
# largest magnitude of each tensor: 8u, twice the count of roundings on one path.
BF16_TOL = 8 * 2.0**-8


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Zero-initialised gates route by ties; random ones route decisively."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "w_gate" in name or "w_noise" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _fp32_leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().requires_grad_(True) for t in tensors]


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, want = got.detach().float(), want.detach()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=FP32_TOL, msg=what)
        return
    scale = float(want.abs().max())
    error = float((got - want).abs().max())
    assert error <= BF16_TOL * max(scale, 1e-30), f"{what}: {error:.3g} over {BF16_TOL} x {scale:.3g}"


def _compare(layer_out, ref_out, layer_tensors, ref_tensors, dtype) -> None:
    (y, aux), (y_ref, aux_ref) = layer_out, ref_out
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.device)
    ((y.float() * upstream).sum() + aux).backward()
    ((y_ref * upstream).sum() + aux_ref).backward()
    _assert_close(y, y_ref, dtype, "output")
    _assert_close(aux, aux_ref, torch.float32 if dtype == torch.float32 else dtype, "aux loss")
    for i, (t, t_ref) in enumerate(zip(layer_tensors, ref_tensors)):
        assert t.grad is not None, f"tensor {i}: no gradient"
        _assert_close(t.grad, t_ref.grad, dtype, f"gradient of tensor {i} {tuple(t.shape)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_experts,k", [(16, 4), (64, 2)])
def test_flat_layer_matches_the_dense_reference(device, dtype, num_experts, k):
    torch.manual_seed(num_experts + k)
    moe = _randomised(MoE(MoEConfig(D, H, num_experts, k=k)), seed=k).train()
    moe = moe.to(device, dtype)
    x = torch.randn(256, D).to(device, dtype).requires_grad_(True)
    noise = torch.randn(256, num_experts).to(device)
    weights = list(moe.experts.weights)
    tensors = [x, moe.router.w_gate, moe.router.w_noise, *weights]
    leaves = _fp32_leaves(tensors)
    out = moe(x, noise=noise)
    y_ref, aux_ref, _, _ = ref.flat_reference(leaves[0], leaves[1], leaves[2], noise, leaves[3:],
                                              None, k)
    _compare((out.y, out.aux_loss), (y_ref, aux_ref), tensors, leaves, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hierarchical_layer_matches_the_dense_reference(device, dtype):
    torch.manual_seed(3)
    a, b = 4, 8
    cfg = MoEConfig(D, H, a * b, k=2, num_groups=a, k_primary=2)
    moe = _randomised(HierarchicalMoE(cfg), seed=5).train().to(device, dtype)
    x = torch.randn(256, D).to(device, dtype).requires_grad_(True)
    noise1, noise2 = torch.randn(256, a).to(device), torch.randn(256, a, b).to(device)
    tensors = [x, moe.primary.w_gate, moe.primary.w_noise, moe.w_gate, moe.w_noise,
               *moe.experts.weights]
    leaves = _fp32_leaves(tensors)
    out = moe(x, noise=(noise1, noise2))
    y_ref, aux_ref, _, _ = ref.hierarchical_reference(
        leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], noise1, noise2, leaves[5:], None,
        2, 2)
    _compare((out.y, out.aux_loss), (y_ref, aux_ref), tensors, leaves, dtype)
