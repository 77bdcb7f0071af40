"""Experts: feed-forward networks with stacked weights, run as grouped matrix products.

Weights are stacked over experts (``[num_experts, d_in, d_out]``) so that one grouped GEMM
runs every expert on its contiguous slice of the expert-sorted tokens, whatever the number
of experts, and so that the stack shards cleanly across expert-parallel ranks. How the
products are scheduled on a CPU (worker threads, a padded ``bmm``) is ``cpu_experts.py``'s
business; this module is the networks themselves, and which kernel runs them on a GPU
(:func:`expert_gemm_kernel`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_moe.moe.cpu_experts import (
    GROUPED_MM_DTYPES,
    padded_experts_forward,
    use_cpu_workers,
    use_padded_batches,
    worker_grouped_matmul,
)

logger = logging.getLogger(__name__)

# GPU architectures (compute capability majors: Hopper, Blackwell) on which PyTorch's
# ``grouped_mm`` is its CUTLASS grouped kernel, for bf16 only. Elsewhere, and for fp32 or fp16
# everywhere, the CUDA operator is a loop of one ``mm`` per group that first copies the
# offsets to the host: it works, outside its documented contract (bf16 on SM >= 80), and
# gains nothing over the explicit loop this module runs instead.
CUTLASS_GROUPED_MM_MAJORS = (9, 10)
# The public ``torch.nn.functional.grouped_mm`` (PyTorch 2.9 and later); older builds loop.
HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def choose_expert_kernel(device_type: str, dtype: torch.dtype,
                         capability: tuple[int, int] | None) -> str:
    """``"grouped_mm"`` (one grouped GEMM) or ``"per_group"`` (one product per expert).

    CPUs (and the meta device, which only infers shapes) use ``grouped_mm`` for the dtypes it
    takes; CUDA uses it only where it is the CUTLASS kernel (bf16 on
    ``CUTLASS_GROUPED_MM_MAJORS``); any other dtype or device loops over the experts.
    """
    if dtype not in GROUPED_MM_DTYPES or not HAS_GROUPED_MM:
        return "per_group"
    if device_type in ("cpu", "meta"):
        return "grouped_mm"
    if device_type == "cuda" and dtype == torch.bfloat16 and capability is not None \
            and capability[0] in CUTLASS_GROUPED_MM_MAJORS:
        return "grouped_mm"
    return "per_group"


@functools.lru_cache(maxsize=None)
def expert_gemm_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """:func:`choose_expert_kernel` for a device, logged once per (device, dtype)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    kernel = choose_expert_kernel(device.type, dtype, capability)
    if device.type not in ("cpu", "meta"):
        logger.info("experts on %s (compute capability %s) in %s: %s", device, capability,
                    dtype, "PyTorch's grouped GEMM" if kernel == "grouped_mm" else
                    "one matrix product per expert (the grouped GEMM kernel is bf16 on "
                    "compute capability 9.x/10.x only)")
    return kernel


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``out[rows of group g] = x[rows of group g] @ weight[g]``.

    ``x`` is ``[A, d_in]`` sorted by group, ``weight`` is ``[G, d_in, d_out]`` and
    ``offsets`` the int32 cumulative row counts (``offsets[g]`` ends group g). PyTorch's
    grouped GEMM (CUTLASS on Hopper, a C++ loop over groups elsewhere) does the work, with
    its own autograd; empty groups are allowed and get zero gradient.

    The kernels need rows aligned to 16 bytes; odd sizes (3 experts per group, bf16 with
    d=12) are zero-padded to alignment and the result sliced back, which is exact.
    """
    if expert_gemm_kernel(x.device, x.dtype) == "per_group":
        return _grouped_matmul_by_group(x, weight, offsets)
    if use_cpu_workers(x, weight.shape[0]):
        sizes = tuple(torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist())
        return worker_grouped_matmul(x, weight, sizes)
    d_in, d_out = weight.shape[1], weight.shape[2]
    multiple = max(1, 16 // x.element_size())
    pad_in, pad_out = -d_in % multiple, -d_out % multiple
    if pad_in or pad_out:
        x = F.pad(x, (0, pad_in))
        weight = F.pad(weight, (0, pad_out, 0, pad_in))
    if x.device.type == "cuda":
        x, weight = aligned_to_16_bytes(x), aligned_to_16_bytes(weight)
    out = F.grouped_mm(x, weight, offs=offsets)
    return out[:, :d_out] if pad_out else out


def aligned_to_16_bytes(t: Tensor) -> Tensor:
    """``t``, copied when its storage does not start on 16 bytes.

    The CUDA grouped kernel requires it of its operands. A bf16 expert weight that DeepSpeed
    views into a flat buffer (ZeRO, bf16) starts wherever the parameters before it end, which
    after an odd-sized one (a softmax bias over an odd vocabulary) is not on 16 bytes.
    """
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _grouped_matmul_by_group(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """One matmul per group: dtypes the grouped kernel lacks (float64 gradient checks), and
    GPUs without the CUTLASS grouped kernel (:func:`choose_expert_kernel`)."""
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return matmul_by_group(x, weight, sizes)


def matmul_by_group(x: Tensor, weight: Tensor, sizes: list[int]) -> Tensor:
    """``out[rows of group g] = x[rows of group g] @ weight[g]`` for host-side ``sizes``."""
    parts = [rows @ w for rows, w in zip(x.split(sizes), weight)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[2])


def draw_seed() -> int:
    """A 63-bit seed from the global (CPU) RNG: one draw, however large the layer."""
    return int(torch.randint(0, 2**63 - 1, (), device="cpu"))


def expert_seed(init_seed: int, expert: int) -> int:
    """The seed of global expert ``expert`` of a layer seeded ``init_seed`` (well mixed)."""
    words = np.random.SeedSequence([init_seed, expert]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def group_offsets(tokens_per_group: Tensor) -> Tensor:
    return torch.cumsum(tokens_per_group, dim=0, dtype=torch.int32)


class GroupedFFNExperts(nn.Module):
    """``num_experts`` independent ReLU networks ``d_in -> d_hidden (x layers) -> d_out``.

    The paper's experts have one hidden layer (``hidden_layers=1``); MoE-1-Deep uses four.
    Each expert is initialised like its own ``nn.Linear`` layers. Biases are off by default,
    as in the original implementation's experts (tensor2tensor's ``ffn_expert_fn``): the
    grouped GEMM cannot differentiate a per-group bias, so a bias costs a gather of
    ``[tokens, d_hidden]`` and a scatter-add in backward.

    The module may hold a block of a larger set: its experts are global experts
    ``first_expert .. first_expert + num_experts - 1``. Expert ``e`` is drawn from its own
    generator, seeded from ``(init_seed, e)``, so an expert's initial weights do not depend on
    which process holds it or how many others it holds (an expert-parallel build equals a
    single-process one, bit for bit). ``init_seed=None`` draws the layer's seed from the
    global RNG (one number, whatever ``num_experts``).
    """

    def __init__(self, num_experts: int, d_in: int, d_hidden: int, d_out: int,
                 hidden_layers: int = 1, bias: bool = False, first_expert: int = 0,
                 init_seed: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = first_expert
        dims = [d_in] + [d_hidden] * hidden_layers + [d_out]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_in, fan_out))
            for fan_in, fan_out in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, fan_out)) for fan_out in dims[1:]
        ) if bias else None
        self.init_seed = init_seed if init_seed is not None else draw_seed()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert from its own generator (on the CPU, then copied: the same values on
        every device); nothing to do on the meta device."""
        if self.weights[0].device.type == "meta":
            return
        with torch.no_grad():
            for local in range(self.num_experts):
                generator = torch.Generator().manual_seed(
                    expert_seed(self.init_seed, self.first_expert + local))
                for i, weight in enumerate(self.weights):
                    bound = 1.0 / math.sqrt(weight.shape[1])
                    weight[local].copy_(_uniform(weight.shape[1:], bound, generator))
                    if self.biases is not None:
                        self.biases[i][local].copy_(
                            _uniform(self.biases[i].shape[1:], bound, generator))

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Runs expert e on its rows of ``x`` (``[A, d_in]``, sorted by expert).

        ``tokens_per_expert`` (``[num_experts]``) gives the length of each expert's slice.
        Parameters are cast to the input dtype, so a bf16 activation runs a bf16 GEMM.
        """
        if use_padded_batches(x, tokens_per_expert):
            return padded_experts_forward(x, tokens_per_expert.to(x.device), self.weights,
                                          self.biases)
        if expert_gemm_kernel(x.device, x.dtype) == "per_group":
            sizes = tokens_per_expert.tolist()  # the one host copy of this pass
            if sizes and min(sizes) == max(sizes) > 0:  # equal groups: one bmm, no padding
                return padded_experts_forward(x, tokens_per_expert.to(x.device), self.weights,
                                              self.biases)
            return self._run(x, tokens_per_expert, lambda h, w: matmul_by_group(h, w, sizes))
        offsets = group_offsets(tokens_per_expert.to(x.device))
        return self._run(x, tokens_per_expert, lambda h, w: grouped_matmul(h, w, offsets))

    def _run(self, x: Tensor, tokens_per_expert: Tensor,
             product: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """The layers, each ``product(rows, stacked weight)`` then bias and ReLU."""
        row_expert = None
        if self.biases is not None:
            row_expert = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x.device), tokens_per_expert.to(x.device),
                output_size=x.shape[0])
        h = x
        last = len(self.weights) - 1
        for i, weight in enumerate(self.weights):
            h = product(h, weight.to(h.dtype))
            if row_expert is not None:
                h = h + self.biases[i].to(h.dtype).index_select(0, row_expert)
            if i < last:
                h = torch.relu_(h)  # h is a fresh GEMM output: no extra [A, d_hidden] buffer
        return h
