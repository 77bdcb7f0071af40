"""Layers of the MoE-LSTM stacks: LSTM, MoE and dense FFN, each with dropout and a residual.

Every layer maps ``[B, T, d_in] -> [B, T, d_out]``. The MoE is applied to all time steps of
all sequences at once (the paper's "convolutional" application), optionally only to the
positions a mask keeps (padding never reaches the experts nor the balancing statistics).
Activation checkpointing wraps a whole layer: its activations are recomputed in the backward
pass, with the RNG state (dropout, gating noise) restored so the recomputation is exact.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparse_moe.moe import MoEConfig, MoEOutput, build_moe

LSTMState = tuple[Tensor, Tensor]

logger = logging.getLogger(__name__)


class ModelOutput(NamedTuple):
    """What every model's forward returns.

    ``aux_loss`` is the sum of the MoE layers' weighted balancing losses (add it to the
    cross-entropy); ``moe_outputs`` are the per-layer results, so a trainer can log
    importance, load and counts per layer; ``state`` is the recurrent state to carry on.
    A language model given its targets returns ``token_nll`` (per position, 0 where not
    counted) and no logits, so that no ``[tokens, vocab]`` tensor need exist
    (``models/softmax.py``).

    A named tuple, because DeepSpeed's engine finds the output tensors to hook its backward
    prologue on (timers, ZeRO's backward set-up) by walking tuples, lists and dicts only; with
    a dataclass its prologue never ran and ``wall_clock_breakdown`` failed on an unstarted
    timer.
    """

    logits: Tensor | None
    aux_loss: Tensor
    moe_outputs: list[MoEOutput]
    state: Any = None
    token_nll: Tensor | None = None


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)``, under non-reentrant activation checkpointing when enabled and useful.

    Non-reentrant checkpointing accepts any output structure (an ``MoEOutput``, LSTM states)
    and restores the RNG state for the recomputation, so gradients are the same with and
    without it.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)


def lstm_compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype an LSTM whose parameters and input are ``dtype`` computes in on ``device``.

    Only bf16 on CUDA can lack a kernel: PyTorch's own fused cell has no bf16 version
    (pytorch issues #116925, #88136) and cuDNN's RNNs take bf16 only from cuDNN 9.13 on, in
    the PyTorch builds that route bf16 to it. Whether this build can is found out once per
    GPU by running a small bf16 LSTM there; where it cannot, the LSTMs compute in fp32 on
    fp32 copies of their bf16 weights (the rest of the model stays bf16).
    """
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_bf16_lstm_works(device):
        return torch.float32
    return dtype


@functools.lru_cache(maxsize=None)
def _cuda_bf16_lstm_works(device: torch.device) -> bool:
    """Whether :func:`probe_bf16_lstm` runs on ``device``; logs the choice."""
    try:
        probe_bf16_lstm(device)
    except RuntimeError as err:
        logger.warning("LSTMs on %s: no bf16 kernel in this build (torch %s, cuDNN %s: %s); "
                       "they compute in fp32 on fp32 copies of their bf16 weights", device,
                       torch.__version__, torch.backends.cudnn.version(),
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        # cuDNN then copies the cast weights into one buffer at each call, as intended here
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
        return False
    logger.info("LSTMs on %s compute in bf16 (cuDNN %s)", device, torch.backends.cudnn.version())
    return True


def probe_bf16_lstm(device: torch.device) -> None:
    """A small bf16 LSTM (with a projection, plain and packed) forward and backward on
    ``device``; raises where it cannot run.

    Gradients are on whatever the caller's mode (the first LSTM may run in an evaluation),
    and the random number generators are left as they were: the trainer's draws (dropout,
    gating noise) must not depend on whether this process has probed yet, or a resumed run
    would differ from the uninterrupted one.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.enable_grad():
        lstm = nn.LSTM(8, 16, proj_size=8, batch_first=True).to(device, torch.bfloat16)
        x = torch.randn(2, 3, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
        (lstm(x)[0].sum() + lstm(packed)[0].data.sum()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class LSTMLayer(nn.Module):
    """An LSTM of ``hidden_size`` units (projected to ``proj_size`` when set), then dropout.

    The residual connection is added when the output size equals the input size.
    ``lengths`` packs the batch so padding never enters the recurrence (needed for the
    backward direction of a bidirectional encoder layer). Where the device has no LSTM kernel
    for the input's dtype (bf16 on some CUDA builds, :func:`lstm_compute_dtype`) the
    recurrence runs in fp32 and its output and state come back in the input's dtype.
    """

    def __init__(self, d_in: int, hidden_size: int, proj_size: int = 0, dropout: float = 0.0,
                 residual: bool = True, bidirectional: bool = False) -> None:
        super().__init__()
        proj = proj_size if proj_size and proj_size != hidden_size else 0
        self.lstm = nn.LSTM(d_in, hidden_size, proj_size=proj, batch_first=True,
                            bidirectional=bidirectional)
        self.d_out = (proj or hidden_size) * (2 if bidirectional else 1)
        self.residual = residual and self.d_out == d_in
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state: LSTMState | None = None,
                lengths: Tensor | None = None) -> tuple[Tensor, LSTMState]:
        compute = lstm_compute_dtype(x.device, x.dtype)
        if compute == x.dtype:
            out, new_state = self._recur(self.lstm, x, state, lengths)
        else:
            weights = {name: p.to(compute) for name, p in self.lstm.named_parameters()}
            out, new_state = self._recur(
                lambda *args: torch.func.functional_call(self.lstm, weights, args),
                x.to(compute), None if state is None else tuple(s.to(compute) for s in state),
                lengths)
            out = out.to(x.dtype)
            new_state = tuple(s.to(x.dtype) for s in new_state)
        out = self.dropout(out)
        if self.residual:
            out = out + x
        return out, new_state

    @staticmethod
    def _recur(lstm: Callable[..., Any], x: Tensor, state: LSTMState | None,
               lengths: Tensor | None) -> tuple[Tensor, LSTMState]:
        if lengths is None:
            return lstm(x, state)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, new_state = lstm(packed, state)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, new_state


# Builds the MoE of a model's ``index``-th MoE layer (0, 1, ... in model order) from its
# config. The default holds every expert; ``sparse_moe.parallel.parallelize`` passes one that
# builds this rank's experts only, wrapped for DeepSpeed, so the models never see processes.
MoEFactory = Callable[[MoEConfig, int], nn.Module]


def build_full_moe(config: MoEConfig, index: int) -> nn.Module:
    """Every expert in this process (the default ``MoEFactory``)."""
    moe = build_moe(config)
    moe.noise_stream = index
    return moe


class MoELayer(nn.Module):
    """The sparsely-gated MoE on every position of ``[B, T, d]``, then dropout and residual.

    With a ``mask`` (``[B, T]`` bool), only the kept positions are routed; the others get a
    zero MoE output (so just the residual). ``moe`` is the layer itself when it was built
    elsewhere (by a ``MoEFactory``); by default it holds all experts.
    """

    def __init__(self, config: MoEConfig, dropout: float = 0.0, residual: bool = True,
                 moe: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe if moe is not None else build_moe(config)
        self.d_out = config.d_out
        self.residual = residual and config.d_out == config.d_model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, MoEOutput]:
        if mask is None:
            out = self.moe(x)
            y = out.y
        else:
            out = self.moe(x[mask])
            y = x.new_zeros(*x.shape[:-1], self.d_out).masked_scatter(mask.unsqueeze(-1), out.y)
        y = self.dropout(y)
        if self.residual:
            y = y + x
        return y, out


class FFNLayer(nn.Module):
    """A dense ReLU network ``d -> hidden (x hidden_layers) -> d``: MoE-1-Wide / MoE-1-Deep.

    The paper's single-expert baselines are a MoE with one expert, whose gate is the constant
    1; a dense layer is the same function without the routing work, so it is the honest
    baseline for throughput. ``output_sigmoid`` mirrors the MoE's output sigmoid.
    """

    def __init__(self, d_model: int, hidden_size: int, hidden_layers: int = 1,
                 output_sigmoid: bool = False, dropout: float = 0.0, residual: bool = True) -> None:
        super().__init__()
        dims = [d_model] + [hidden_size] * hidden_layers + [d_model]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.output_sigmoid = output_sigmoid
        self.residual = residual
        self.d_out = d_model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, linear in enumerate(self.linears):
            h = linear(h)
            if i < len(self.linears) - 1:
                h = F.relu(h)
        if self.output_sigmoid:
            h = torch.sigmoid(h)
        h = self.dropout(h)
        return h + x if self.residual else h


def sum_aux_losses(outputs: list[MoEOutput], like: Tensor) -> Tensor:
    """Sum of the layers' weighted balancing losses (a zero scalar when there is no MoE)."""
    total = like.new_zeros((), dtype=torch.float32)
    for out in outputs:
        total = total + out.aux_loss.float()
    return total
