"""How the code chooses its kernels and devices for a GPU, checked on any machine.

The choices are plain functions of (device, dtype, compute capability, launcher variables);
the paths they pick for a GPU are device-agnostic code, run here on the CPU against
independent references: a per-expert loop for the experts' products, an fp32 LSTM for the
fp32 recurrence of bf16 LSTMs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_moe.models import layers
from sparse_moe.moe import experts
from sparse_moe.moe.cpu_experts import use_cpu_workers, use_padded_batches
from sparse_moe.moe.experts import GroupedFFNExperts, choose_expert_kernel
from sparse_moe.train.distributed import local_gpu_index
from sparse_moe.train.tasks import batch_to_device
from tests.moe.test_experts import loop_reference

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.mark.parametrize("device,dtype,capability,kernel", [
    ("cuda", BF16, (9, 0), "grouped_mm"),  # H100/H200: CUTLASS grouped GEMM
    ("cuda", BF16, (10, 0), "grouped_mm"),  # B200
    ("cuda", BF16, (8, 0), "per_group"),  # A100: PyTorch's operator would loop anyway
    ("cuda", FP32, (9, 0), "per_group"),
    ("cuda", FP16, (9, 0), "per_group"),
    ("cuda", FP16, (7, 0), "per_group"),  # V100 under fp16
    ("cuda", FP64, (9, 0), "per_group"),
    ("cpu", FP32, None, "grouped_mm"),
    ("cpu", BF16, None, "grouped_mm"),
    ("cpu", FP64, None, "per_group"),
    ("meta", FP32, None, "grouped_mm"),
    ("mps", FP32, None, "per_group"),
])
def test_expert_kernel_per_device_dtype_and_architecture(device, dtype, capability, kernel):
    assert choose_expert_kernel(device, dtype, capability) == kernel


def test_a_torch_without_grouped_mm_loops_over_the_experts(monkeypatch):
    monkeypatch.setattr(experts, "HAS_GROUPED_MM", False)
    assert choose_expert_kernel("cuda", BF16, (9, 0)) == "per_group"
    assert choose_expert_kernel("cpu", FP32, None) == "per_group"


@pytest.mark.parametrize("counts,bias", [([3, 0, 5, 1], True), ([0, 0, 7, 0, 2, 0], False),
                                         ([4, 4, 4, 4], True)])
def test_per_expert_products_equal_the_loop(counts, bias, monkeypatch):
    """The path GPUs without the grouped kernel take (equal groups: one bmm)."""
    monkeypatch.setattr(experts, "expert_gemm_kernel", lambda device, dtype: "per_group")
    torch.manual_seed(len(counts))
    module = GroupedFFNExperts(len(counts), 6, 10, 5, hidden_layers=2, bias=bias)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 6, requires_grad=True)
    upstream = torch.randn(x.shape[0], 5)
    params = [x, *module.parameters()]
    (module(x, counts) * upstream).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    weights = list(module.weights)
    biases = list(module.biases) if bias else None
    (loop_reference(x, counts, weights, biases) * upstream).sum().backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("proj,lengths", [(0, None), (6, [5, 3])])
def test_bf16_lstm_without_a_kernel_computes_in_fp32(proj, lengths, monkeypatch):
    """Where CUDA lacks a bf16 LSTM, the layer runs the fp32 LSTM on its bf16 weights: its
    output and gradients are the fp32 LSTM's, rounded once to bf16."""
    monkeypatch.setattr(layers, "lstm_compute_dtype", lambda device, dtype: FP32)
    torch.manual_seed(proj)
    layer = layers.LSTMLayer(8, 12, proj_size=proj, residual=False).to(BF16)
    fp32 = layers.LSTMLayer(8, 12, proj_size=proj, residual=False)
    fp32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    lengths = None if lengths is None else torch.tensor(lengths)
    x = torch.randn(2, 5, 8).to(BF16).requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    state = (torch.randn(1, 2, proj or 12).to(BF16), torch.randn(1, 2, 12).to(BF16))
    out, (h, c) = layer(x, state, lengths)
    out32, (h32, c32) = fp32(x32, tuple(s.float() for s in state), lengths)
    assert out.dtype == h.dtype == c.dtype == BF16
    for got, want in ((out, out32), (h, h32), (c, c32)):
        assert torch.equal(got, want.to(BF16))
    upstream = torch.randn(out.shape).to(BF16)
    (out * upstream).sum().backward()
    (out32 * upstream.float()).sum().backward()
    assert torch.equal(x.grad, x32.grad.to(BF16))
    for p, p32 in zip(layer.parameters(), fp32.parameters()):
        assert p.grad.dtype == BF16 and torch.equal(p.grad, p32.grad.to(BF16))


def test_lstm_dtype_is_kept_off_cuda():
    for dtype in (FP32, BF16, FP16):
        assert layers.lstm_compute_dtype(torch.device("cpu"), dtype) == dtype
    assert layers.lstm_compute_dtype(torch.device("cuda", 0), FP32) == FP32  # no probe needed


def test_cpu_only_expert_paths_are_off_on_other_devices():
    """Worker threads and the CPU's padded bmm never run on a GPU's tensors."""
    x = torch.empty(64, 8, device="meta")
    assert not use_cpu_workers(x, 64)
    assert not use_padded_batches(x, torch.full((4,), 16))


@pytest.mark.parametrize("local_rank,visible", [(0, 1), (3, 8), (0, 8), (7, 8)])
def test_each_process_gets_the_gpu_of_its_local_rank(local_rank, visible):
    assert local_gpu_index(local_rank, visible) == local_rank


@pytest.mark.parametrize("local_rank,visible", [(4, 2), (3, 1)])
def test_a_process_that_cannot_see_its_gpu_is_told_what_to_change(local_rank, visible):
    with pytest.raises(RuntimeError, match=rf"LOCAL_RANK={local_rank} but this process sees "
                                           rf"{visible} GPU\(s\).*--gpus-per-node"):
        local_gpu_index(local_rank, visible)


def test_batches_reach_the_cpu_unchanged():
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    tensor = batch_to_device(array, torch.device("cpu"))
    assert tensor.dtype == torch.int64 and tensor.tolist() == array.tolist()


def test_the_bf16_lstm_probe_runs_in_evaluation_and_leaves_the_generator_alone():
    """The probe needs gradients even when the first LSTM runs under no_grad, and draws no
    number from the generators the trainer reseeds (a resumed run would differ)."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        layers.probe_bf16_lstm(torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_a_failing_probe_means_fp32_and_says_so(monkeypatch, caplog):
    def no_kernel(device):
        raise RuntimeError('"_thnn_fused_lstm_cell_cuda" not implemented for \'BFloat16\'')

    monkeypatch.setattr(layers, "probe_bf16_lstm", no_kernel)
    probe = layers._cuda_bf16_lstm_works.__wrapped__
    with caplog.at_level("WARNING", logger=layers.__name__):
        assert probe(torch.device("cpu")) is False
    assert "no bf16 kernel" in caplog.text and "_thnn_fused_lstm_cell_cuda" in caplog.text
    monkeypatch.setattr(layers, "probe_bf16_lstm", lambda device: None)
    assert probe(torch.device("cpu")) is True


def test_an_operand_viewed_off_16_bytes_is_copied_for_the_grouped_kernel():
    """A bf16 weight viewed into a flat buffer one element in (as after a parameter of odd
    size) starts on 2 bytes; the grouped kernel gets an aligned copy with the same values."""
    flat = torch.randn(1 + 4 * 8 * 16).to(BF16)
    weight = flat[1:].view(4, 8, 16)
    assert weight.data_ptr() % 16 == 2
    copied = experts.aligned_to_16_bytes(weight)
    assert copied.data_ptr() % 16 == 0 and torch.equal(copied, weight)
    aligned = flat[8:8 + 4 * 8 * 15].view(4, 8, 15)
    assert experts.aligned_to_16_bytes(aligned) is aligned  # nothing copied when not needed
