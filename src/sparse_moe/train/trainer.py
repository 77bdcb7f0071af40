"""Training the MoE-LSTM language model on a DeepSpeed engine.

One process per rank. Dense parameters are data-parallel over the whole world; each MoE
layer's experts are sharded over expert-parallel groups of ``parallel.ep_size`` ranks (the
paper's mix of data and model parallelism). DeepSpeed owns the optimizer step, gradient
reduction (experts over their expert-data-parallel group), clipping, precision, ZeRO,
checkpoint files and the CSV monitor; the trainer's tracker drives W&B and TensorBoard
(``train/tracking/``).

Exact resumption: every micro-step reseeds the RNG from (seed, step, micro-step, rank), and a
checkpoint records the step and the data reader's position, so a resumed run draws the same
batches, dropout masks and gating noise as a run that never stopped.

Faults (docs/reliability.md): checkpoints are committed atomically (checkpoint/save.py), steps
with a NaN/Inf loss or gradient are skipped and a run of them stops training (nonfinite.py), a
failed or timed-out collective ends every surviving rank with a message naming the phase and
the ranks that stopped answering, and a preemption signal to any rank saves at the next step
boundary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from sparse_moe.atomic import atomic_write
from sparse_moe.config_io import to_dict
from sparse_moe.models import compose_loss
from sparse_moe.models.budget import training_multiply_adds
from sparse_moe.parallel import expert_parallel_dispatchers
from sparse_moe.train.checkpoint.export import load_export_into
from sparse_moe.train.checkpoint.manager import CheckpointManager
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import (
    describe_collective_failure,
    is_collective_failure,
    report_cpu_binding,
    roll_call_key,
)
from sparse_moe.train.ds_config import describe_ds_choice
from sparse_moe.train.engine import build_engine
from sparse_moe.train.errors import CollectiveFailure, TrainingAborted
from sparse_moe.train.fault_injection import FaultHooks, FaultInjection
from sparse_moe.train.nonfinite import NonFiniteStreak
from sparse_moe.train.preemption import (
    EXIT_PREEMPTED,
    PreemptionFlag,
    clear_preempted,
    mark_preempted,
)
from sparse_moe.train.preflight import StartUp, check_run
from sparse_moe.train.rank_model import build_rank_model
from sparse_moe.train.run_dir import prepare_run_dir
from sparse_moe.train.runtime import start_process
from sparse_moe.train.step_metrics import StepMetrics, StepRecord, global_grad_norm
from sparse_moe.train.summary import peak_memory, peak_memory_over_ranks, print_summary
from sparse_moe.train.tasks import IGNORE
from sparse_moe.train.tracking import RunLog, open_tracker

__all__ = ["EXIT_PREEMPTED", "Trainer", "step_seed"]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A well-mixed seed for one micro-step of one rank (independent of history)."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


class Trainer:
    """Owns the engine, the data reader and the loop; ``run()`` trains, evaluates, saves.

    The task (language modelling or translation, chosen by the model preset) supplies the
    model, the readers, the model inputs and the evaluation. ``startup`` is what the start-up
    checks built (``preflight.check_run``); without it the trainer runs them itself.
    """

    def __init__(self, config: TrainConfig, startup: StartUp | None = None) -> None:
        self.config, self.phase = config, "start-up"
        self.preemption = PreemptionFlag()  # before start-up: a signal then is not lost
        self.device = start_process(config)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if startup is None:
            startup = check_run(config, "the run's config", self.world, self.rank)
        assert (startup.rank, startup.world) == (self.rank, self.world), "start-up of another rank"
        report_cpu_binding(self.rank, self.world)
        self.roll_call = roll_call_key()
        self.faults: FaultHooks = FaultInjection.from_environment(self.rank)
        self.run_dir = Path(config.run.dir)
        self.wandb_run_id = prepare_run_dir(self.run_dir, config, self.rank)
        self.task, self.batches = startup.task, startup.batches
        model = build_rank_model(self.task, config, self.device)
        if config.run.init_from:
            load_export_into(model, Path(config.run.init_from))  # replaced by a resume
        self.dispatchers = expert_parallel_dispatchers(model)
        self.run_engine = build_engine(model, config, self.world, self.run_dir,
                                       ds_config=startup.ds_config)
        self.engine, self.guard = self.run_engine.engine, self.run_engine.guard
        if self.rank == 0:
            atomic_write(self.run_dir / "ds_config.json", json.dumps(startup.ds_config, indent=2))
            print(describe_ds_choice(config, self.device.type), flush=True)
            clear_preempted(self.run_dir)
        self.checkpoints = CheckpointManager(self.run_engine, self.run_dir, config,
                                             startup.model_config, self.faults, self.rank,
                                             self.world)
        self.step = 0
        # fp16 overflows are the loss scaler's business; only a non-finite loss counts there.
        self.nonfinite = NonFiniteStreak(config.run.max_nonfinite_steps,
                                         self.engine.fp16_enabled(), self.rank)
        self.preemption.install()
        if config.run.resume:
            self.phase = "resuming"
            self.step = self.checkpoints.resume(self.batches) or 0
        self.log = RunLog(config, self.run_dir, self.engine.monitor, self.rank, self.step,
                          lambda: open_tracker(config, self.run_dir, self.wandb_run_id,
                                               startup.model_config, startup.ds_config,
                                               self.world, self.engine.module, self.rank,
                                               self.step))
        self.preemption.install()  # wandb may have replaced the handlers
        self.multiply_adds_per_token = training_multiply_adds(
            self.engine.module, startup.model_config, tokens=1)

    def run(self) -> dict[str, Any]:
        """Trains to ``run.steps``; a fault ends it with :class:`TrainingAborted` (see errors.py)."""
        try:
            return self._run()
        except TrainingAborted as err:
            self._report(err, every_rank=isinstance(err, CollectiveFailure))
            raise
        except Exception as err:
            if not is_collective_failure(err):
                raise
            failure = CollectiveFailure(describe_collective_failure(
                err, self.phase, self.config.run.collective_timeout_minutes, self.roll_call))
            self._report(failure, every_rank=True)
            raise failure from err

    def _report(self, err: TrainingAborted, every_rank: bool) -> None:
        """The error's message on stderr, before the traceback, once (or once per rank)."""
        if every_rank or self.rank == 0:
            print(f"sparse-moe-train: error: {err}", file=sys.stderr, flush=True)
        err.reported = True  # the command line prints nothing more

    def _run(self) -> dict[str, Any]:
        cfg = self.config.run
        batches, started = self._forever(), time.time()
        # Outside a terminal (Slurm logs, CI) a bar redrawn every 0.1 s floods the log file.
        progress = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                        desc="train", unit="step", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
        while self.step < cfg.steps:
            self.phase = (f"step {self.step + 1} (forward, MoE all-to-all, backward, gradient "
                          "all-reduce, optimizer step, metrics all-reduce)")
            record = self._train_step(batches)
            self.step += 1
            self.log.add_step(record.expert_counts, record.tokens)
            if self._logs(self.step):
                metrics = self.log.train(self.step, record.metrics, record.expert_counts,
                                         self.multiply_adds_per_token, peak_memory(self.device))
                progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     tok_s=f"{metrics['tokens_per_second']:.0f}")
            progress.update(1)
            self.nonfinite.add(self.step, record.metrics["loss"], not record.applied,
                               self.checkpoints.latest_path)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.log.evaluation(self.step, self.evaluate())
            if self._after_step():
                progress.close()
                return self._stop_for_preemption()
        progress.close()
        final = self.evaluate()
        self.log.evaluation(self.step, final)
        self.save()
        summary = {"steps": self.step, "seconds": time.time() - started, **final,
                   "train_loss": self.log.last_train.get("loss"),
                   **peak_memory_over_ranks(self.device, self.world)}
        self.log.tracker.finish(summary)
        if self.rank == 0:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            print_summary(summary, self.run_dir)
        return summary

    def _forever(self) -> Iterator[Any]:
        while True:
            yield from self.batches

    def _logs(self, step: int) -> bool:
        """Whether ``step`` is a logged one (every ``run.log_every`` steps, and the last)."""
        return step % self.config.run.log_every == 0 or step == self.config.run.steps

    def _after_step(self) -> bool:
        """A checkpoint when due (``CheckpointManager.due``), agreed over ranks with the
        preemption flag; returns whether a preemption signal reached some rank."""
        self.phase = f"the preemption and checkpoint agreement after step {self.step}"
        preempted, due = self.preemption.agreed(self.checkpoints.due(self.step))
        self.checkpoints.pending = due
        if due and self.nonfinite.count == 0:
            self.save()  # postponed while steps are being skipped: keep the last good one
        return preempted

    def _stop_for_preemption(self) -> dict[str, Any]:
        """Saves (unless this step was just saved), then marks the run preempted once every
        rank's files are written (``preemption.py``)."""
        if self.checkpoints.saved_step != self.step:
            self.save()
        self.log.tracker.finish()
        self.phase = "the barrier after the preemption save"
        if self.rank == 0:
            signame = self.preemption.signal_name()
            mark_preempted(self.run_dir, self.step, signame)
            print(f"preempted ({signame}): saved step {self.step} to {self.checkpoints.directory}; "
                  f"exiting with status {EXIT_PREEMPTED} for a requeue", flush=True)
        torch.distributed.barrier()
        return {"steps": self.step, "preempted": True}

    def _train_step(self, batches: Iterator[Any]) -> StepRecord:
        engine = self.engine
        step = StepMetrics(self.world, self.dispatchers, self.config.parallel)
        for micro in range(engine.gradient_accumulation_steps()):
            batch = next(batches)
            torch.manual_seed(step_seed(self.config.run.seed, self.step, micro, self.rank))
            inputs, targets = self.task.model_inputs(batch, self.device)
            with self.task.sample_noise(batch):  # forward, and its recomputation in backward
                output = self.task.forward(engine, inputs, targets)
                parts = compose_loss(output, targets, ignore_index=IGNORE)
                loss = self.faults.loss(parts.total, self.step + 1)
                self.guard.note_loss(loss)
                engine.backward(loss)
            if (engine.is_gradient_accumulation_boundary() and self._logs(self.step + 1)
                    and not self.run_engine.optimizer_wrapped):
                # DeepSpeed reports a gradient norm only from its wrappers (ZeRO, bf16, fp16).
                step.grad_norm = global_grad_norm(engine.module, self.world,
                                                  self.config.parallel.ep_size)
            engine.step()
            scalars = parts.scalars()
            if loss is not parts.total:
                scalars["loss"] = float("nan")  # the injected fault shows in the logged loss
            step.add_micro_step(scalars, [o.counts for o in output.moe_outputs],
                                float((targets != IGNORE).sum()),
                                [o.importance for o in output.moe_outputs])
        return step.finish(engine)

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation (perplexity; BLEU for translation) over every rank's share."""
        self.phase = f"evaluation after step {self.step}"
        self.engine.eval()
        results = self.task.evaluate(self.engine, self.device, self.run_dir)
        self.engine.train()
        return results

    def save(self) -> None:
        """A checkpoint of this step, visible through ``latest`` only once complete on every rank."""
        self.phase = f"saving the checkpoint of step {self.step}"
        self.checkpoints.save(self.step, {
            "step": self.step, "data": self.batches.state_dict(),
            "wandb_run_id": self.wandb_run_id, "seed": self.config.run.seed,
            "config": to_dict(self.config)})
        self.log.tracker.checkpoint_saved()
