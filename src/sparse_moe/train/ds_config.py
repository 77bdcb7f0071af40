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


# deepspeed.config=auto: the regime for real runs on GPUs (bf16 with fp32 gradient
# accumulation, ZeRO-1), and plain fp32 on CPUs (which have no fast bf16 path).
AUTO_CONFIGS = {"cuda": "zero1_bf16.json", "cpu": "cpu_fp32.json"}
DS_CONFIG_DIR = Path(__file__).resolve().parents[3] / "ds_configs"


def ds_json_path(config: TrainConfig, device_type: str | None = None) -> Path:
    """``deepspeed.config``, with ``auto`` resolved for ``device_type`` (``cuda`` or ``cpu``;
    None: CUDA when this process sees a GPU)."""
    name = config.deepspeed.config
    if name != "auto":
        return Path(name)
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = AUTO_CONFIGS["cuda" if device_type == "cuda" else "cpu"]
    shipped = DS_CONFIG_DIR / chosen
    return shipped if shipped.is_file() else Path("ds_configs") / chosen


def describe_ds_choice(config: TrainConfig, device_type: str) -> str:
    """The line a run logs about its DeepSpeed JSON (why that one, for ``auto``)."""
    path = ds_json_path(config, device_type)
    if config.deepspeed.config != "auto":
        return f"deepspeed.config: {path}"
    why = "a GPU: bf16, fp32 gradient accumulation, ZeRO-1" if device_type == "cuda" else (
        "no GPU: fp32 without ZeRO")
    return f"deepspeed.config=auto: {path.name} ({why})"


def build_ds_config(config: TrainConfig, data_parallel_size: int, run_dir: Path,
                    device_type: str | None = None) -> dict[str, Any]:
    """The dict passed to ``deepspeed.initialize`` (``device_type``: see ``ds_json_path``)."""
    section = config.deepspeed
    source = ds_json_path(config, device_type)
    ds = load_ds_json(source)
    micro = config.data.micro_batch_size
    accumulation = accumulation_steps(config, data_parallel_size)
    expected = micro * accumulation * data_parallel_size
    for key, value in (("train_batch_size", ds.get("train_batch_size")),
                       ("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu")),
                       ("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"))):
        if value not in (None, "auto"):
            raise ConfigError(f"{source}: {key}={value} is set in the DeepSpeed JSON; batch "
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
        _override_precision(ds, section.precision, section.zero_stage)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the paper's factored Adam
    _add_monitors(ds, config, run_dir)
    return ds


def _override_precision(ds: dict[str, Any], precision: str, zero_stage: int | None) -> None:
    """``deepspeed.precision``. bf16 keeps gradients accumulated and reduced in fp32 (the
    regime of ``zero1_bf16.json``, which resumes on another layout); DeepSpeed has that
    optimizer from ZeRO stage 1 on, so a stage-0 JSON is raised to stage 1."""
    ds["bf16"] = {"enabled": precision == "bf16"}
    fp16 = ds.get("fp16", {}) if precision == "fp16" else {}
    ds["fp16"] = {**fp16, "enabled": precision == "fp16"}
    data_types = {k: v for k, v in (ds.get("data_types") or {}).items() if k != "grad_accum_dtype"}
    if precision != "bf16":
        if data_types:
            ds["data_types"] = data_types
        else:
            ds.pop("data_types", None)
        return
    ds["data_types"] = {**data_types, "grad_accum_dtype": "fp32"}
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 0:
        if zero_stage == 0:
            raise ConfigError("deepspeed.precision=bf16 with deepspeed.zero_stage=0: expected a "
                              "ZeRO stage of 1 or 2 (bf16 accumulates gradients in fp32, which "
                              "DeepSpeed offers from stage 1 on), found 0")
        zero["stage"] = 1


def _add_monitors(ds: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """DeepSpeed's CSV monitor only: W&B and TensorBoard are the trainer's (train/tracking/),
    since DeepSpeed's would log with the number of samples as their step."""
    if config.tracking.csv:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(run_dir), "job_name": "metrics"}
    for monitor in ("wandb", "tensorboard", "comet"):
        if isinstance(ds.get(monitor), dict) and ds[monitor].get("enabled"):
            raise ConfigError(f"{ds_json_path(config)}: {monitor}.enabled is set in the "
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
                     else f"{ds_json_path(config)}: {name}.enabled")
            raise ConfigError(
                f"{where}: {name} is not supported on the {accelerator.device_name()} "
                f"accelerator; expected fp32 or a precision it supports, found {name}")
