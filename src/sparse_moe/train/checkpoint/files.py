"""A run's checkpoint files: the one module that knows their names and reads ``latest``.

``<run>/checkpoints/`` holds one directory per checkpoint, named by its tag (``step_<8 digits>``),
and ``latest``, which names the last complete one (``save.py`` writes it last, atomically).
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

import re
import zipfile
from pathlib import Path
from typing import Any

from sparse_moe.train.checkpoint.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"  # in the run directory
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
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


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(name: str) -> int | None:
    match = TAG_PATTERN.match(name)
    return int(match.group(1)) if match else None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_tags(directory: Path) -> list[str]:
    """Every checkpoint directory's name (committed or not), sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def read_latest(directory: Path) -> str | None:
    """The tag ``latest`` names, or None when there is no committed checkpoint."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    return tag or None


def load_model_states(tag_dir: Path) -> dict[str, Any]:
    """A checkpoint's ``mp_rank_00_model_states.pt``: the client state, DeepSpeed's records and
    the dense weights, memory-mapped (a tensor is read from disk only when used).

    Fails with :class:`CheckpointError` naming the file on a missing, truncated or foreign one.
    """
    import torch

    path = model_states_file(tag_dir)
    if not path.is_file():
        present = sorted(p.name for p in tag_dir.iterdir()) if tag_dir.is_dir() else []
        raise CheckpointError(f"{path}: expected DeepSpeed's model states file in every "
                              f"checkpoint, found only {present[:5] or 'an empty directory'}")
    check_zip(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"{path}: expected a DeepSpeed checkpoint file, found "
                              f"{path.stat().st_size} bytes that torch cannot load "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or "module" not in saved:
        raise CheckpointError(f"{path}: expected a DeepSpeed model states dict with 'module', "
                              f"found {type(saved).__name__}")
    return saved


def check_zip(path: Path) -> None:
    """torch.save writes a zip archive; a truncated or overwritten file is not one any more.

    The message says which (a file's size depends on the paths recorded in it, so it is not
    quoted: the same damage reads the same wherever the run directory lives).
    """
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        found = "an empty file"
    elif head == b"PK\x03\x04":
        found = "one whose end (the archive's directory) is missing: truncated?"
    else:
        found = "a file that does not begin like one: overwritten?"
    raise CheckpointError(f"{path}: expected a checkpoint file saved by torch (a zip "
                          f"archive), found {found}")
