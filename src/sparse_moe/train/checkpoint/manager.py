"""The trainer's one door to its checkpoints: save a step, name the latest, resume from it.

Saving goes through ``save.py`` (complete or invisible); resuming loads through DeepSpeed on
the layout that wrote the checkpoint, and through ``relayout.py`` on another one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sparse_moe.config_io import ConfigError
from sparse_moe.parallel import deepspeed_internals as ds_internals
from sparse_moe.train.checkpoint.files import LATEST, checkpoint_dir, read_latest
from sparse_moe.train.checkpoint.relayout import (
    check_resume,
    layout_changed,
    load_unwrapped_optimizer,
    load_wrapped_optimizer,
    read_saved_layout,
    resize_schedule,
    unwrapped_full_state,
    zero_full_state,
)
from sparse_moe.train.checkpoint.save import RecordingWriter, save_checkpoint
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import is_collective_failure
from sparse_moe.train.engine import RunEngine
from sparse_moe.train.errors import TrainingAborted
from sparse_moe.train.fault_injection import FaultHooks
from sparse_moe.train.host_memory import release_freed_host_memory


class CheckpointManager:
    """Checkpoints of one run directory, for the engine of one rank."""

    def __init__(self, run: RunEngine, run_dir: Path, config: TrainConfig, model_config: Any,
                 faults: FaultHooks, rank: int, world: int) -> None:
        self.run, self.config, self.model_config = run, config, model_config
        self.rank, self.world = rank, world
        self.directory = checkpoint_dir(run_dir)
        self.writer = RecordingWriter(run.engine, faults)
        self.pending = False  # agreed due, not saved yet (postponed while steps are skipped)
        self.saved_step, self.last_save_time = -1, time.monotonic()

    def due(self, step: int) -> bool:
        """Whether this rank asks for a checkpoint after ``step``: a postponed one, every
        ``run.save_every`` steps, or every ``run.save_every_minutes`` by rank 0's clock (the
        ranks' clocks need not agree: the trainer's all-reduce makes them). The last step is
        saved by the end of the run."""
        run = self.config.run
        by_steps = bool(run.save_every) and step % run.save_every == 0
        by_time = bool(run.save_every_minutes) and self.rank == 0 and (
            time.monotonic() - self.last_save_time >= 60 * run.save_every_minutes)
        return self.pending or (step < run.steps and (by_steps or by_time))

    def latest(self) -> str | None:
        """The tag of the last complete checkpoint, or None."""
        return read_latest(self.directory)

    def latest_path(self) -> Path | None:
        tag = self.latest()
        return self.directory / tag if tag else None

    def save(self, step: int, client_state: dict[str, Any]) -> None:
        """A checkpoint of ``step``, visible through ``latest`` only once complete on every rank."""
        save_checkpoint(self.run.engine, self.writer, self.directory, step, client_state,
                        self.config.run.keep_last)
        # DeepSpeed clones every local expert before writing them one file each: a copy of
        # the rank's experts in pieces small enough for the heap, which would otherwise stay
        # resident beside the next steps' buffers.
        release_freed_host_memory()
        self.pending = False
        self.saved_step, self.last_save_time = step, time.monotonic()

    def resume(self, batches: Any) -> int | None:
        """Loads the latest checkpoint (on another layout too) and the data position into
        ``batches``; returns its step, or None when there is none."""
        tag = self.latest()
        if tag is None:
            if self.rank == 0:
                print(f"run.resume: no checkpoint in {self.directory}; starting from step 0")
            return None
        saved, _ = read_saved_layout(self.directory / tag)
        ds_config, ep_size = self.run.ds_config, self.config.parallel.ep_size
        check_resume(saved, ds_config, self.world, ep_size,
                     self.config.run.allow_global_batch_change, self.directory / tag)
        relayout = layout_changed(saved, self.world, ep_size)
        regrouped = relayout or (saved.micro_batch, saved.accumulation) != (
            self.config.data.micro_batch_size, ds_config["gradient_accumulation_steps"])
        path, client = self._load(tag, saved, relayout)
        step = int(client["step"])
        batches.load_state_dict(client["data"], resplit=regrouped)
        release_freed_host_memory()  # the loaded files' blocks, freed in pieces
        if self.rank == 0:
            moved = (f", re-split from {saved.world} processes at ep_size={saved.ep_size}"
                     if relayout else "")
            print(f"resumed from {path} at step {step}{moved} "
                  f"(SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')})")
        return step

    def _load(self, tag: str, saved: Any, relayout: bool) -> tuple[Any, dict[str, Any]]:
        try:
            if relayout:
                path, client = self._load_on_new_layout(tag, saved)
            else:
                path, client = self.run.engine.load_checkpoint(str(self.directory), tag=tag)
        except ConfigError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
            if is_collective_failure(err):
                raise
            raise TrainingAborted(
                f"run.resume: could not load {self.directory / tag} (named by "
                f"{self.directory / LATEST}): expected a complete checkpoint of this "
                f"model and layout, found {type(err).__name__}: {err}") from err
        if path is None:
            raise TrainingAborted(f"run.resume: {self.directory / LATEST} names {tag}, but "
                                  f"{self.directory / tag} holds no loadable checkpoint")
        return path, client

    def _load_on_new_layout(self, tag: str, saved: Any) -> tuple[Any, dict[str, Any]]:
        """The checkpoint of another layout: module through DeepSpeed, optimizer state
        re-split from its files (``relayout.py``), then the schedule and the step counters."""
        tag_dir, engine = self.directory / tag, self.run.engine
        path, client = engine.load_checkpoint(str(self.directory), tag=tag,
                                              load_module_only=True, load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        if path is None:
            return None, {}
        if self.run.optimizer_wrapped:
            full, masters = zero_full_state(tag_dir, saved, self.model_config,
                                            self.config.parallel)
            load_wrapped_optimizer(engine, engine.module, full, masters, int(client["step"]))
        else:
            full, groups = unwrapped_full_state(tag_dir, saved, self.model_config,
                                                self.config.parallel)
            load_unwrapped_optimizer(self.run.optimizer, engine.module, full, groups)
        groups = len(self.run.optimizer.param_groups)
        engine.lr_scheduler.load_state_dict(resize_schedule(client["lr_scheduler"], groups))
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # the rate of the next step, which the scheduler set before saving
        ds_internals.set_step_counters(engine, client["global_steps"],
                                       client.get("global_samples", 0), client["skipped_steps"])
        return path, client
