"""The DeepSpeed config of a run: the JSON from ``ds_configs/`` completed by the trainer.

Batch sizes come from the training config, never from the JSON, so there is one source of
truth: ``train_batch_size = micro_batch x gradient_accumulation x data_parallel_size``. A
JSON or config that states something else fails before any model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError
from sparse_moe.train.config import TrainConfig


def accumulation_steps(config: TrainConfig, data_parallel_size: int) -> int:
    """``deepspeed.gradient_accumulation_steps``, resolving ``auto`` from the global batch."""
    section = config.deepspeed
    if section.gradient_accumulation_steps != "auto":
        return int(section.gradient_accumulation_steps)
    per_step = config.data.micro_batch_size * data_parallel_size
    if section.train_batch_size % per_step:
        raise ConfigError(
            f"deepspeed.gradient_accumulation_steps=auto: expected deepspeed.train_batch_size "
            f"({section.train_batch_size}) to be a multiple of data.micro_batch_size "
            f"({config.data.micro_batch_size}) x {data_parallel_size} processes = {per_step}; "
            "choose a micro-batch that divides it")
    return section.train_batch_size // per_step


def load_ds_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: expected a DeepSpeed JSON file (see ds_configs/), "
                          f"found no file {path}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: expected a DeepSpeed JSON config, found text that is not "
                          f"valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of DeepSpeed settings, found "
                          f"{type(values).__name__}")
    return values


def build_ds_config(config: TrainConfig, data_parallel_size: int, run_dir: Path) -> dict[str, Any]:
    """The dict passed to ``deepspeed.initialize``."""
    section = config.deepspeed
    ds = load_ds_json(section.config)
    micro = config.data.micro_batch_size
    accumulation = accumulation_steps(config, data_parallel_size)
    expected = micro * accumulation * data_parallel_size
    for key, value in (("train_batch_size", ds.get("train_batch_size")),
                       ("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu")),
                       ("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"))):
        if value not in (None, "auto"):
            raise ConfigError(f"{section.config}: {key}={value} is set in the DeepSpeed JSON; batch "
                              "sizes belong to the training config (data.micro_batch_size, "
                              "deepspeed.gradient_accumulation_steps); remove it")
    if section.train_batch_size is not None and section.train_batch_size != expected:
        raise ConfigError(
            f"deepspeed.train_batch_size: expected micro batch {micro} x gradient accumulation "
            f"{accumulation} x data-parallel size {data_parallel_size} = {expected}, "
            f"found {section.train_batch_size}")
    ds.update(train_batch_size=expected, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=accumulation)
    if section.gradient_clipping is not None:
        ds["gradient_clipping"] = section.gradient_clipping
    if section.wall_clock_breakdown is not None:
        ds["wall_clock_breakdown"] = section.wall_clock_breakdown
    if section.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = section.zero_stage
    if section.precision is not None:
        ds["bf16"] = {"enabled": section.precision == "bf16"}
        fp16 = ds.get("fp16", {}) if section.precision == "fp16" else {}
        ds["fp16"] = {**fp16, "enabled": section.precision == "fp16"}
    ds.setdefault("zero_allow_untested_optimizer", True)  # the paper's factored Adam
    _add_monitors(ds, config, run_dir)
    return ds


def _add_monitors(ds: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """DeepSpeed's CSV monitor only: W&B and TensorBoard are the trainer's (train/tracking/),
    since DeepSpeed's would log with the number of samples as their step."""
    if config.tracking.csv:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(run_dir), "job_name": "metrics"}
    for monitor in ("wandb", "tensorboard", "comet"):
        if isinstance(ds.get(monitor), dict) and ds[monitor].get("enabled"):
            raise ConfigError(f"{config.deepspeed.config}: {monitor}.enabled is set in the "
                              "DeepSpeed JSON; the trainer drives W&B and TensorBoard itself "
                              "(tracking.wandb, tracking.tensorboard); remove that section")


def check_precision_supported(ds: dict[str, Any], config: TrainConfig) -> None:
    """Refuses a precision this machine's accelerator lacks, before anything is written.

    DeepSpeed finds out only inside ``deepspeed.initialize``, after the run directory was
    written, with a message that names neither the setting nor where it came from. Kept
    apart from ``build_ds_config`` so a GPU job's config can still be built on a CPU host.
    """
    section = config.deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name, supported in (("fp16", accelerator.is_fp16_supported),
                            ("bf16", accelerator.is_bf16_supported)):
        enabled = isinstance(ds.get(name), dict) and ds[name].get("enabled") is True
        if enabled and not supported():
            where = ("deepspeed.precision" if section.precision is not None
                     else f"{section.config}: {name}.enabled")
            raise ConfigError(
                f"{where}: {name} is not supported on the {accelerator.device_name()} "
                f"accelerator; expected fp32 or a precision it supports, found {name}")
