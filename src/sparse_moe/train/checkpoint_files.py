"""The files of a DeepSpeed checkpoint, by what they hold: the one module that knows their names.

``engine.save_checkpoint(dir, tag)`` (no model or pipeline parallelism) writes into
``dir/tag/``:

- ``mp_rank_00_model_states.pt``: the dense weights, the client state (step, data position,
  config) and DeepSpeed's own records (``num_experts`` per MoE layer, the DeepSpeed config);
- ``layer_<l>_expert_<e>_mp_rank_00_model_states.pt``: expert ``e`` (global index) of MoE
  layer ``l``, written by the rank that owns it;
- ``expp_rank_<r>_mp_rank_00_optim_states.pt``: the optimizer state of expert-parallel rank
  ``r`` (without ZeRO);
- ``[bf16_]zero_pp_rank_<d>_mp_rank_00_optim_states.pt``: ZeRO's optimizer partition of
  data-parallel rank ``d``.

These are DeepSpeed's names (its engine's ``_get_*_ckpt_name`` methods, which are private);
``tests/train/test_checkpoint_files.py`` checks that they still agree with DeepSpeed's.
"""

from __future__ import annotations

from pathlib import Path

MP_RANK = "mp_rank_00"
MODEL_STATES = f"{MP_RANK}_model_states.pt"


def model_states_file(tag_dir: Path) -> Path:
    return tag_dir / MODEL_STATES


def expert_file(tag_dir: Path, layer: int, expert: int) -> Path:
    return tag_dir / f"layer_{layer}_expert_{expert}_{MP_RANK}_model_states.pt"


def expert_files(tag_dir: Path, experts_per_layer: list[int]) -> list[Path]:
    """One file per global expert of every MoE layer, layer by layer."""
    return [expert_file(tag_dir, layer, expert)
            for layer, count in enumerate(experts_per_layer) for expert in range(count)]


def expert_parallel_optimizer_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank}_{MP_RANK}_optim_states.pt"


def zero_optimizer_file(tag_dir: Path, dp_rank: int, bf16: bool) -> Path:
    return tag_dir / f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_{MP_RANK}_optim_states.pt"
