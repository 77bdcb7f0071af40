"""Checks of a run's inputs made before any process group, run directory or engine exists.

The trainer meets most of these problems too, but later: after it wrote the run directory,
after DeepSpeed started, and often as a library's traceback (a state-dict size mismatch, a
bare ``AssertionError`` from the checkpoint loader). Checked here first, each one is a message
that names the file or field, what was expected and what was found, and nothing is written.
Every rank runs the same checks on the same files, so all ranks stop with the same message.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError, to_dict
from sparse_moe.data import CorpusError, ShardFormatError, load_tokenizer, open_corpus
from sparse_moe.models import LMConfig, TranslationConfig
from sparse_moe.parallel.layout import check_world
from sparse_moe.parallel.parallelize_model import ExpertLayout, check_model_layout, moe_configs, parallelize
from sparse_moe.train.checkpoint_files import (
    expert_files,
    expert_parallel_optimizer_file,
    model_states_file,
    zero_optimizer_file,
)
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.ds_config import build_ds_config, check_precision_supported
from sparse_moe.train.tasks import make_task


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into this run as it is configured."""


def check_run(config: TrainConfig, source: str, world_size: int) -> None:
    """Everything ``Trainer(config)`` needs that can be checked in one process, cheaply.

    ``source`` names the config (its file, or "command line") in messages.
    """
    try:
        check_world(config.parallel.ep_size, world_size)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
    corpus = open_corpus(config.data.corpus, tokenizer=tokenizer)
    task = make_task(config, corpus, tokenizer, rank=0, world=world_size)
    model = task.model_config(f"{source}: model.overrides")
    try:
        check_model_layout(model, config.parallel.ep_size)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        task.train_reader()
    except (CorpusError, ShardFormatError):
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: data.train_split {config.data.train_split!r} of "
                          f"{corpus.directory}: {error}") from None
    if config.run.init_from:
        from sparse_moe.train.export import check_export

        check_export(Path(config.run.init_from), model)
    ds = build_ds_config(config, world_size, Path(config.run.dir))
    check_precision_supported(ds, config)
    if config.run.resume:
        from sparse_moe.train.trainer import CHECKPOINT_DIR

        check_checkpoint(Path(config.run.dir) / CHECKPOINT_DIR, None, config, model, resume=True,
                         world_size=world_size)


def checkpoint_tags(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def check_checkpoint(directory: Path, tag: str | None, config: TrainConfig,
                     model: LMConfig | TranslationConfig, resume: bool,
                     world_size: int = 1) -> str | None:
    """The tag that will be loaded, after checking its files fit the model; None: none saved.

    ``resume`` also checks what resuming needs beyond the weights: the optimizer state of
    every saved rank, and, on another layout, that it can be re-split (``relayout.py``).
    """
    tags = checkpoint_tags(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.exists():
            return None
        tag = latest.read_bytes().decode("utf-8", errors="replace").strip()
        if not tag or tag not in tags:
            raise CheckpointError(
                f"{latest}: expected the tag of a checkpoint in {directory} "
                f"({', '.join(tags) or 'there are none'}), found {tag!r}; write the tag to "
                "resume from into it, or remove it to start from step 0")
    elif tag not in tags:
        raise CheckpointError(f"--tag: expected one of {tags or 'none'} in {directory}, "
                              f"found {tag!r}")
    saved = _load_model_states(directory / tag)
    _check_same_model(model_states_file(directory / tag), saved, config, model)
    _check_expert_files(directory, tag, saved)
    if resume:
        _check_optimizer_files(directory / tag, saved, config, world_size)
    return tag


def _load_model_states(folder: Path) -> dict[str, Any]:
    import torch

    path = model_states_file(folder)
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{path}: expected DeepSpeed's model states file in every "
                              f"checkpoint, found only {present[:5] or 'an empty directory'}")
    _check_zip(path)
    try:
        # Memory-mapped: the tensors are not read, only the client state and the layout.
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"{path}: expected a DeepSpeed checkpoint file, found "
                              f"{path.stat().st_size} bytes that torch cannot load "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or "module" not in saved:
        raise CheckpointError(f"{path}: expected a DeepSpeed model states dict with 'module', "
                              f"found {type(saved).__name__}")
    return saved


def _check_zip(path: Path) -> None:
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
            _check_zip(path)
    if missing:
        raise CheckpointError(
            f"{directory / tag}: expected {len(expected)} expert files (one per expert of "
            f"each MoE layer: {saved.get('num_experts')}), found {len(expected) - len(missing)}; "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")


def _check_optimizer_files(folder: Path, saved: dict[str, Any], config: TrainConfig,
                           world_size: int) -> None:
    """The optimizer state files the saved layout wrote, and a layout it can resume on."""
    from sparse_moe.train.relayout import check_resume, saved_layout

    layout = saved_layout(saved)
    try:
        check_resume(layout, build_ds_config(config, world_size, Path(config.run.dir)),
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


def world_size_from_environment() -> int:
    """The world size the launcher set (1 for a plain ``python -m sparse_moe.train``)."""
    from sparse_moe.train.distributed import fill_launcher_environment

    fill_launcher_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))
