"""The training run's configuration: one dataclass per component, one YAML section each.

    run:       run directory, seed, steps, logging/eval/checkpoint intervals, resume
    model:     a preset name plus LMConfig field overrides
    data:      corpus directory, tokenizer, micro-batch size, sequence length
    optimizer: sparse_moe.optim.OptimizerConfig
    schedule:  sparse_moe.optim.ScheduleConfig (warmup / hold / inverse square root)
    parallel:  sparse_moe.parallel.ExpertParallelConfig (ep_size, capacity factor...)
    deepspeed: the DeepSpeed JSON to start from and the fields the trainer sets in it
    tracking:  W&B and TensorBoard (driven by the trainer) and DeepSpeed's CSV monitor
    decode:    beam search settings for translation BLEU
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from sparse_moe.optim import OptimizerConfig, ScheduleConfig
from sparse_moe.parallel.config import ExpertParallelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # the run directory: config, checkpoints, metrics, summary
    seed: int = 1234  # initial weights, data order, dropout and gating noise
    steps: int = 100  # optimizer steps to train to (a resumed run continues to it)
    log_every: int = 10  # steps between logged metrics
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 0  # per split and rank; 0: the whole split
    save_every: int = 0  # steps between checkpoints; 0: by time only (or at the end)
    # minutes between checkpoints as well (whichever comes first); 0: off. Bounds the work a
    # node failure, an NCCL abort or an OOM kill loses; the Slurm templates set it.
    save_every_minutes: float = 0.0
    keep_last: int = 2  # committed checkpoints kept (older ones are deleted)
    resume: bool = False  # continue from the latest checkpoint of run.dir
    # start from an export's weights (sparse-moe-export; any layout); a resume takes precedence
    init_from: str | None = None
    # resuming on another layout: allow a global batch (micro x accumulation x world) other
    # than the checkpoint's (the rest of the epoch is re-split over the new ranks)
    allow_global_batch_change: bool = False
    progress: bool = True  # a progress bar on rank 0
    # A collective waiting longer than this ends the run with an error (a dead or hung rank).
    collective_timeout_minutes: float = 30.0
    # Steps in a row with a NaN/Inf loss or gradient (each skipped) before the run stops.
    max_nonfinite_steps: int = 10
    # Training on CPU: keep freed host memory for reuse (glibc malloc) instead of returning it
    # to the kernel and faulting it in again at the next step (train/host_memory.py).
    retain_host_memory: bool = True
    # Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS's fixed workspace,
    # cuDNN's deterministic algorithms): a GPU run then repeats bit for bit, as a CPU run
    # always does, and a resumed run reproduces the uninterrupted one; some kernels are slower.
    deterministic: bool = False
    # GPU: fp32 matrix products and convolutions on TF32 tensor cores (PyTorch's default is off)
    tf32: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "keep_last", "max_nonfinite_steps"):
            _positive(self, name)
        for name in ("eval_every", "eval_batches", "save_every"):
            _non_negative(self, name)
        timeout = self.collective_timeout_minutes
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"RunConfig.collective_timeout_minutes: expected a positive number "
                              f"of minutes, found {timeout!r}")
        minutes = self.save_every_minutes
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes < 0:
            raise ConfigError(f"RunConfig.save_every_minutes: expected a number of minutes >= 0 "
                              f"(0: off), found {minutes!r}")


@dataclass
class ModelSection:
    # a preset name (docs/models.md) or the path of a model YAML (configs/models/*.yaml)
    preset: str = "debug-moe"
    # fields of the model's config (LMConfig or TranslationConfig) that replace the preset's
    overrides: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward


@dataclass
class DataConfig:
    corpus: str = ""  # a corpus directory written by data_prep (with manifest.json)
    tokenizer: str | None = None  # its tokenizer file (checked against the manifest)
    micro_batch_size: int = 8  # sequences per rank and micro-step (language models)
    seq_len: int = 32  # tokens per sequence (language models)
    train_split: str = "train"  # the split trained on
    # the splits evaluated (perplexity; BLEU too for translation)
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    max_tokens: int = 2048  # translation: padded tokens per batch (rows x longest side)
    # translation: split -> the original target-side text (one line per pair) that BLEU is
    # scored against; without it, references are the decoded token ids (approximate: unknown
    # characters and normalisation change them).
    references: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ConfigError("data.corpus: expected the directory of a corpus written by "
                              "data_prep (with manifest.json), found nothing")
        _positive(self, "micro_batch_size")
        _positive(self, "seq_len")


@dataclass
class DecodeConfig:
    """Beam search for the translation model's BLEU evaluation."""

    beam_size: int = 4  # hypotheses kept per sentence
    max_length: int = 100  # tokens at most per translation
    length_penalty: float = 0.6  # GNMT's alpha

    def __post_init__(self) -> None:
        _positive(self, "beam_size")
        _positive(self, "max_length")


@dataclass
class DeepSpeedSection:
    # the DeepSpeed JSON to start from (ds_configs/); auto: zero1_bf16.json where the process
    # sees a GPU, cpu_fp32.json where it does not (the choice is logged)
    config: str = "auto"
    # micro-steps per optimizer step; auto: train_batch_size / (micro-batch x world), so that a
    # job keeps its global batch on any number of processes (a requeue on other nodes)
    gradient_accumulation_steps: int | str = 1
    train_batch_size: int | None = None  # checked against micro x accumulation x data-parallel
    gradient_clipping: float | None = None  # overrides the JSON when set
    # overrides the JSON's bf16/fp16 sections when set; bf16 keeps fp32 gradient accumulation
    # (raising a stage-0 JSON to ZeRO-1, the only stages where DeepSpeed offers it)
    precision: str | None = None
    zero_stage: int | None = None  # overrides the JSON's ZeRO stage (0, 1, 2) when set
    wall_clock_breakdown: bool | None = None  # DeepSpeed's per-phase timers, when set

    def __post_init__(self) -> None:
        if self.gradient_accumulation_steps == "auto":
            if self.train_batch_size is None:
                raise ConfigError("deepspeed.gradient_accumulation_steps: auto needs "
                                  "deepspeed.train_batch_size (the global batch to keep); "
                                  "found none")
        else:
            _positive(self, "gradient_accumulation_steps")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"deepspeed.precision: expected one of {PRECISIONS}, "
                              f"found {self.precision!r}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"deepspeed.zero_stage: expected 0, 1 or 2, found {self.zero_stage!r}")


@dataclass
class TrackingConfig:
    """Dashboards (W&B, TensorBoard) and metric files; docs/training.md, "Tracking"."""

    wandb: bool = True  # a W&B run, driven by rank 0 (train/tracking/tracker.py)
    wandb_mode: str = "offline"  # offline (sync later with wandb sync), online or disabled
    project: str = "sparse-moe"  # the wandb project
    entity: str | None = None  # the W&B team or user; default: the account's default entity
    name: str | None = None  # the run's display name; default: the run directory's name
    group: str | int | None = None  # default: the Slurm job id (an array's job id), if any
    tags: list[str] = field(default_factory=list)  # W&B tags, to filter runs by
    job_type: str = "train"  # W&B job type, to tell training from evaluation runs
    notes: str | None = None  # a description shown on the run's W&B page
    tensorboard: bool = False  # the same scalars, pictures and tables in <run>/tensorboard
    csv: bool = True  # one CSV per metric under <run>/metrics/ (DeepSpeed's CSV monitor)
    translation_samples: int = 8  # translation: sample translations per split in a table

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"tracking.wandb_mode: expected one of {WANDB_MODES}, "
                              f"found {self.wandb_mode!r}")
        if not isinstance(self.tags, list) or not all(isinstance(t, str) for t in self.tags):
            raise ConfigError(f"tracking.tags: expected a list of strings, found {self.tags!r}")
        _non_negative(self, "translation_samples")


@dataclass
class TrainConfig:
    data: DataConfig
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The run's config from a YAML file (or none) and ``section.field=value`` overrides."""
    values = load_yaml(path) if path else {}
    values = apply_overrides(values, overrides or [])
    if "data" not in values:
        raise ConfigError(f"{path or 'command line'}: expected a 'data' section with "
                          "data.corpus, found none")
    return from_dict(TrainConfig, values, str(path or "command line"))


def _positive(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{type(obj).__name__}.{name}: expected a positive integer, "
                          f"found {value!r}")


def _non_negative(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"{type(obj).__name__}.{name}: expected a non-negative integer, "
                          f"found {value!r}")
