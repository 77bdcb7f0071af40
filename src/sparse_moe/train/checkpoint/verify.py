"""A checkpoint checked against the run that will load it, before anything is loaded.

The loaders meet these problems too, but later and as a library's traceback (a state-dict size
mismatch, a bare ``AssertionError`` from DeepSpeed's checkpoint loader). Checked here, each is a
message that names the file, what was expected and what was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError, to_dict
from sparse_moe.models import LMConfig, TranslationConfig
from sparse_moe.parallel.parallelize_model import ExpertLayout, moe_configs, parallelize
from sparse_moe.train.checkpoint.errors import CheckpointError
from sparse_moe.train.checkpoint.files import (
    LATEST,
    check_zip,
    checkpoint_tags,
    expert_files,
    expert_parallel_optimizer_file,
    load_model_states,
    model_states_file,
    read_latest,
    zero_optimizer_file,
)
from sparse_moe.train.checkpoint.relayout import check_resume, saved_layout
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.ds_config import build_ds_config


def check_checkpoint(directory: Path, tag: str | None, config: TrainConfig,
                     model: LMConfig | TranslationConfig, resume: bool,
                     world_size: int = 1, ds_config: dict[str, Any] | None = None) -> str | None:
    """The tag that will be loaded, after checking its files fit the model; None: none saved.

    ``resume`` also checks what resuming needs beyond the weights: the optimizer state of
    every saved rank, and, on another layout, that it can be re-split (``relayout.py``).
    """
    tags = checkpoint_tags(directory)
    if tag is None:
        latest = directory / LATEST
        if not latest.exists():
            return None
        tag = read_latest(directory) or ""
        if tag not in tags:
            raise CheckpointError(
                f"{latest}: expected the tag of a checkpoint in {directory} "
                f"({', '.join(tags) or 'there are none'}), found {tag!r}; write the tag to "
                "resume from into it, or remove it to start from step 0")
    elif tag not in tags:
        raise CheckpointError(f"--tag: expected one of {tags or 'none'} in {directory}, "
                              f"found {tag!r}")
    saved = load_model_states(directory / tag)
    _check_same_model(model_states_file(directory / tag), saved, config, model)
    _check_expert_files(directory, tag, saved)
    if resume:
        _check_optimizer_files(directory / tag, saved, config, world_size, ds_config)
    return tag


def _check_same_model(path: Path, saved: dict[str, Any], config: TrainConfig,
                      model: LMConfig | TranslationConfig) -> None:
    """Every parameter of the checkpoint must have the shape this run's model gives it.

    The model is built on the meta device (shapes only, no memory), so the check costs the
    same for a debug model and a 4096-expert one. Settings that change no shape (dropout,
    activation checkpointing, balancing weights) may differ: resuming with them is allowed.
    Where shapes differ, the model settings that differ from the checkpoint's are named.
    """
    built = parallelize(model, config.parallel, ExpertLayout(config.parallel.ep_size),
                        seed=config.run.seed, device="meta").state_dict()
    expected = {k: tuple(v.shape) for k, v in saved["module"].items()}
    found = {k: tuple(v.shape) for k, v in built.items() if ".experts." not in k}
    mismatched = [f"{key}: expected {_shape(expected.get(key))} (as in the checkpoint), "
                  f"found {_shape(found.get(key))}"
                  for key in sorted(set(expected) | set(found))
                  if expected.get(key) != found.get(key)]
    experts = [layer.num_experts for layer in moe_configs(model)]
    if saved.get("num_experts") and experts != list(saved["num_experts"]):
        mismatched.append(f"experts per MoE layer: expected {saved['num_experts']} (as in the "
                          f"checkpoint), found {experts}")
    if not mismatched:
        return
    recorded = (saved.get("config") or {}).get("model")
    settings = _differences(recorded, to_dict(config)["model"], "model") if recorded else []
    hint = ("; this run's settings differ in " + ", ".join(
        f"{key} ({_shown(old)} in the checkpoint, {_shown(new)} now)"
        for key, old, new in settings[:4])) if settings else ""
    raise CheckpointError(
        f"{path}: written by a different model: " + "; ".join(mismatched[:3])
        + (f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else "") + hint
        + ". Use the checkpoint's model settings or another run.dir")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "no such parameter" if shape is None else str(list(shape))


def _shown(value: Any) -> str:
    return "not set" if value is None else repr(value)


def _differences(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [(prefix, old, new)]


def _check_expert_files(directory: Path, tag: str, saved: dict[str, Any]) -> None:
    """One file per global expert of every MoE layer, under DeepSpeed's own naming."""
    expected = expert_files(directory / tag, list(saved.get("num_experts") or []))
    missing = [p.name for p in expected if not p.is_file()]
    if not missing:
        for path in expected:
            check_zip(path)
    if missing:
        raise CheckpointError(
            f"{directory / tag}: expected {len(expected)} expert files (one per expert of "
            f"each MoE layer: {saved.get('num_experts')}), found {len(expected) - len(missing)}; "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")


def _check_optimizer_files(folder: Path, saved: dict[str, Any], config: TrainConfig,
                           world_size: int, ds_config: dict[str, Any] | None) -> None:
    """The optimizer state files the saved layout wrote, and a layout it can resume on
    (``ds_config``: the run's DeepSpeed config, when already built)."""
    layout = saved_layout(saved)
    if ds_config is None:
        ds_config = build_ds_config(config, world_size, Path(config.run.dir))
    try:
        check_resume(layout, ds_config,
                     world_size, config.parallel.ep_size, config.run.allow_global_batch_change,
                     folder)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    if not saved.get("num_experts"):
        return
    if layout.zero_stage:
        expected = [zero_optimizer_file(folder, r, layout.bf16) for r in range(layout.world)]
        what = f"ZeRO partitions of {layout.world} data-parallel rank(s)"
    else:
        expected = [expert_parallel_optimizer_file(folder, r) for r in range(layout.ep_size)]
        what = f"optimizer states of {layout.ep_size} expert-parallel rank(s)"
    missing = [p.name for p in expected if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: expected the {what}, found "
                              f"{len(expected) - len(missing)}; missing {missing}")
