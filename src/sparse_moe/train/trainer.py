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
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from sparse_moe.atomic import atomic_write
from sparse_moe.config_io import ConfigError, to_dict
from sparse_moe.data import load_tokenizer, open_corpus
from sparse_moe.models import compose_loss
from sparse_moe.models.budget import training_multiply_adds
from sparse_moe.parallel import (
    check_world,
    expert_parallel_dispatchers,
)
from sparse_moe.train.checkpoint.export import load_export_into
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
from sparse_moe.train.distributed import (
    all_reduce_host,
    cpu_binding,
    describe_collective_failure,
    describe_cpu_binding,
    init_distributed,
    is_collective_failure,
    roll_call_key,
)
from sparse_moe.train.ds_config import describe_ds_choice
from sparse_moe.train.engine import build_engine
from sparse_moe.train.errors import CollectiveFailure, NonFiniteLimitError, TrainingAborted
from sparse_moe.train.fault_injection import FaultHooks, FaultInjection
from sparse_moe.train.host_memory import release_freed_host_memory, retain_freed_host_memory
from sparse_moe.train.rank_model import build_rank_model
from sparse_moe.train.step_metrics import StepMetrics, StepRecord, global_grad_norm
from sparse_moe.train.tasks import IGNORE, make_task
from sparse_moe.train.tracking import (
    ExpertWindow,
    NoTracker,
    Tracker,
    continue_metrics,
    dashboard_config,
    sample_translations,
)

# Exit status after a preemption signal was honoured (checkpoint saved): the Slurm templates
# requeue the job when they see it.
EXIT_PREEMPTED = 75
PREEMPTED_MARKER = "preempted.json"


class PreemptionFlag:
    """Remembers a SIGUSR1/SIGTERM; ranks agree on it at step boundaries (an all-reduce MAX).

    Acting only at a step boundary, and only when every rank has seen the agreement, keeps the
    ranks in lockstep: no rank leaves a collective that the others are still inside.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.install()

    def install(self) -> None:
        """(Re)installs the handlers; libraries started later (wandb) may replace them."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(a signal reached some rank, some rank asks for a checkpoint): one all-reduce MAX
        for both, so every rank acts on the same answers at the same step."""
        flags = torch.tensor([1 if self.received is not None else 0, int(save_due)],
                             dtype=torch.int32)
        all_reduce_host(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A well-mixed seed for one micro-step of one rank (independent of history)."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def allow_tf32() -> None:
    """``run.tf32``: fp32 matrix products and convolutions on the GPU's TF32 tensor cores (a
    10-bit mantissa for the products, fp32 accumulation), which fp32 runs (and the fp32 parts
    of bf16 runs: the LSTMs' fallback, the gates) otherwise do on the slower fp32 units."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def use_deterministic_kernels() -> None:
    """``run.deterministic``: kernels that give the same bits every run.

    On a GPU, atomic additions (the backward of the dispatch's row gather, which adds each
    token's k gradients with ``index_add``) and cuBLAS's split reductions otherwise sum in an
    order that changes between runs. Kernels with no deterministic version warn instead of
    failing (``warn_only``).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Trainer:
    """Owns the engine, the data reader and the loop; ``run()`` trains, evaluates, saves.

    The task (language modelling or translation, chosen by the model preset) supplies the
    model, the readers, the model inputs and the evaluation.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.preemption = PreemptionFlag()  # before start-up: a signal then is not lost
        self.phase = "start-up"
        if config.run.deterministic:
            use_deterministic_kernels()  # before CUDA starts: cuBLAS reads its workspace then
        self.device = init_distributed(config.run.collective_timeout_minutes)
        if self.device.type == "cuda" and config.run.tf32:
            allow_tf32()
        if self.device.type == "cpu" and config.run.retain_host_memory:
            retain_freed_host_memory()  # before the model, engine and buffers are allocated
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._report_cpu_binding()
        self.roll_call = roll_call_key()
        self.faults: FaultHooks = FaultInjection.from_environment(self.rank)
        self.run_dir = Path(config.run.dir)
        self.checkpoint_dir = checkpoint_dir(self.run_dir)
        try:
            check_world(config.parallel.ep_size, self.world)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._prepare_run_dir()
        self.tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
        self.corpus = open_corpus(config.data.corpus, tokenizer=self.tokenizer)
        self.task = make_task(config, self.corpus, self.tokenizer, self.rank, self.world)
        self.model = build_rank_model(self.task, config, self.device)
        if config.run.init_from:
            load_export_into(self.model, Path(config.run.init_from))  # replaced by a resume
        self.dispatchers = expert_parallel_dispatchers(self.model)
        self.engine = self._initialize_engine()
        if self.rank == 0:
            print(describe_ds_choice(config, self.device.type), flush=True)
        self.writer = RecordingWriter(self.engine.checkpoint_engine, self.faults)
        self.batches = self.task.train_reader()
        self.step = 0
        self.saved_step = -1
        self.last_save_time = time.monotonic()
        self.nonfinite_streak = 0
        self.save_due = False
        # The last logged training metrics, for the summary (a list of every log would grow
        # without bound over a long run).
        self.last_train: dict[str, float] = {}
        self.preemption.install()
        if self.rank == 0:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        if config.run.resume:
            self._resume()
        if self.rank == 0:  # one header and each step once in the metric files, after resumes
            continue_metrics(self.run_dir, self.engine.monitor, self.step)
        self.tracker = self._start_tracker()
        self.preemption.install()  # wandb may have replaced the handlers
        # Tokens per expert since the last log (idle experts) and the last evaluation (picture).
        self.window = ExpertWindow()
        self.eval_window = ExpertWindow(since=self.step)
        self.multiply_adds_per_token = training_multiply_adds(
            self.engine.module, self.task.model_config(), tokens=1)

    # ------------------------------------------------------------------ set-up
    def _prepare_run_dir(self) -> None:
        if self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            id_file = self.run_dir / "wandb_run_id"
            if not id_file.exists():
                atomic_write(id_file, uuid.uuid4().hex[:12])
            atomic_write(self.run_dir / "config.yaml",
                         yaml.safe_dump(to_dict(self.config), sort_keys=False))
        dist.barrier()
        self.wandb_run_id = (self.run_dir / "wandb_run_id").read_text().strip()

    def _report_cpu_binding(self) -> None:
        bindings: list[Any] = [None] * self.world
        dist.all_gather_object(bindings, cpu_binding())
        if self.rank == 0:
            print(describe_cpu_binding(bindings), flush=True)

    def _start_tracker(self) -> Tracker | NoTracker:
        """Rank 0's dashboards, started at the step the run continues from (after a resume)."""
        if self.rank != 0:
            return NoTracker()
        run_config = dashboard_config(self.config, self.task.model_config(),
                                      self.run_engine.ds_config, self.world,
                                      self.config.parallel.ep_size, self.engine.module)
        return Tracker(self.config.tracking, self.run_dir, self.wandb_run_id, run_config,
                       start_step=self.step)

    def _initialize_engine(self):
        run = self.run_engine = build_engine(self.model, self.config, self.world, self.run_dir)
        if self.rank == 0:
            atomic_write(self.run_dir / "ds_config.json", json.dumps(run.ds_config, indent=2))
        self.guard = run.guard
        # fp16 overflows are the loss scaler's business; only a non-finite loss counts there.
        self.fp16 = run.engine.fp16_enabled()
        return run.engine

    def _resume(self) -> None:
        self.phase = "resuming"
        tag = read_latest(self.checkpoint_dir)
        if tag is None:
            if self.rank == 0:
                print(f"run.resume: no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return
        saved, _ = read_saved_layout(self.checkpoint_dir / tag)
        check_resume(saved, self.run_engine.ds_config, self.world, self.config.parallel.ep_size,
                     self.config.run.allow_global_batch_change, self.checkpoint_dir / tag)
        relayout = layout_changed(saved, self.world, self.config.parallel.ep_size)
        regrouped = relayout or (saved.micro_batch, saved.accumulation) != (
            self.config.data.micro_batch_size,
            self.run_engine.ds_config["gradient_accumulation_steps"])
        try:
            if relayout:
                path, client = self._load_on_new_layout(tag, saved)
            else:
                path, client = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        except ConfigError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
            if is_collective_failure(err):
                raise
            raise TrainingAborted(
                f"run.resume: could not load {self.checkpoint_dir / tag} (named by "
                f"{self.checkpoint_dir / LATEST}): expected a complete checkpoint of this "
                f"model and layout, found {type(err).__name__}: {err}") from err
        if path is None:
            raise TrainingAborted(f"run.resume: {self.checkpoint_dir / LATEST} names {tag}, but "
                                  f"{self.checkpoint_dir / tag} holds no loadable checkpoint")
        self.step = int(client["step"])
        self.batches.load_state_dict(client["data"], resplit=regrouped)
        release_freed_host_memory()  # the loaded files' blocks, freed in pieces
        if self.rank == 0:
            moved = (f", re-split from {saved.world} processes at ep_size={saved.ep_size}"
                     if relayout else "")
            print(f"resumed from {path} at step {self.step}{moved} "
                  f"(SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')})")

    def _load_on_new_layout(self, tag: str, saved: Any) -> tuple[Any, dict[str, Any]]:
        """The checkpoint of another layout: module through DeepSpeed, optimizer state
        re-split from its files (``relayout.py``), then the schedule and the step counters."""
        tag_dir = self.checkpoint_dir / tag
        engine = self.engine
        path, client = engine.load_checkpoint(str(self.checkpoint_dir), tag=tag,
                                              load_module_only=True, load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        if path is None:
            return None, {}
        model_config = self.task.model_config()
        if self.run_engine.optimizer_wrapped:
            full, masters = zero_full_state(tag_dir, saved, model_config, self.config.parallel)
            load_wrapped_optimizer(engine, engine.module, full, masters, int(client["step"]))
        else:
            full, groups = unwrapped_full_state(tag_dir, saved, model_config,
                                                self.config.parallel)
            load_unwrapped_optimizer(self.run_engine.optimizer, engine.module, full, groups)
        groups = len(self.run_engine.optimizer.param_groups)
        engine.lr_scheduler.load_state_dict(resize_schedule(client["lr_scheduler"], groups))
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # the rate of the next step, which the scheduler set before saving
        engine.global_steps = client["global_steps"]
        engine.global_samples = client.get("global_samples", 0)
        engine.skipped_steps = client["skipped_steps"]
        return path, client

    # ------------------------------------------------------------------ training
    def _forever(self) -> Iterator[Any]:
        while True:
            yield from self.batches

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
        batches = self._forever()
        # Outside a terminal (Slurm logs, CI) a bar redrawn every 0.1 s floods the log file.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        progress = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                        desc="train", unit="step", dynamic_ncols=True, mininterval=interval)
        started, window_start, window_tokens = time.time(), time.time(), 0.0
        while self.step < cfg.steps:
            self.phase = (f"step {self.step + 1} (forward, MoE all-to-all, backward, gradient "
                          "all-reduce, optimizer step, metrics all-reduce)")
            record = self._train_step(batches)
            self.step += 1
            metrics, skipped = record.metrics, not record.applied
            window_tokens += record.tokens
            self.window.add(record.expert_counts)
            self.eval_window.add(record.expert_counts)
            if self._logs(self.step):
                elapsed = time.time() - window_start
                metrics["tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                metrics["model_flops_per_second"] = (2 * self.multiply_adds_per_token
                                                     * metrics["tokens_per_second"])
                metrics.update(self.window.dead_experts())
                metrics.update({f"system/{k}": v for k, v in peak_memory(self.device).items()})
                self.window = ExpertWindow(since=self.step)
                self._log(metrics)
                self._append_expert_load(record.expert_counts)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     tok_s=f"{metrics['tokens_per_second']:.0f}")
                window_start, window_tokens = time.time(), 0.0
            progress.update(1)
            self._count_nonfinite(metrics["loss"], skipped)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._log_evaluation(self.evaluate())
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_due = True
            self.phase = f"the preemption and checkpoint agreement after step {self.step}"
            preempted, time_due = self.preemption.agreed(self._checkpoint_time_due())
            if time_due and self.step < cfg.steps:
                self.save_due = True
            if self.save_due and self.nonfinite_streak == 0:
                self.save()  # postponed while steps are being skipped: keep the last good one
            if preempted:
                progress.close()
                return self._stop_for_preemption()
        progress.close()
        final = self.evaluate()
        self._log_evaluation(final)
        self.save()
        last_train = self.last_train
        summary = {"steps": self.step, "seconds": time.time() - started, **final,
                   "train_loss": last_train.get("loss"), **self._peak_memory_over_ranks()}
        self.tracker.finish(summary)
        if self.rank == 0:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            print_summary(summary, self.run_dir)
        return summary

    def _logs(self, step: int) -> bool:
        """Whether ``step`` is a logged one (every ``run.log_every`` steps, and the last)."""
        return step % self.config.run.log_every == 0 or step == self.config.run.steps

    def _checkpoint_time_due(self) -> bool:
        """``run.save_every_minutes`` have passed since the last checkpoint (or the start), by
        rank 0's clock: the ranks' clocks need not agree, the all-reduce makes them."""
        minutes = self.config.run.save_every_minutes
        return bool(minutes) and self.rank == 0 and (
            time.monotonic() - self.last_save_time >= 60 * minutes)

    def _peak_memory_over_ranks(self) -> dict[str, Any]:
        """The largest peak of any rank under each key, and every rank's in ``..._per_rank``."""
        peaks: list[Any] = [None] * self.world
        dist.all_gather_object(peaks, peak_memory(self.device))
        out: dict[str, Any] = {}
        for key in peaks[0]:
            values = [p[key] for p in peaks]
            out[key], out[f"{key}_per_rank"] = max(values), values
        return out

    def _stop_for_preemption(self) -> dict[str, Any]:
        """Saves (unless this step was just saved), then marks the run preempted once every
        rank's files are written.

        Launchers report exit statuses differently (torchrun turns any failure into 1), so
        ``<run>/preempted.json`` is what job scripts test to requeue; the status is 75 too.
        """
        if self.saved_step != self.step:
            self.save()
        self.tracker.finish()
        self.phase = "the barrier after the preemption save"
        if self.rank == 0:
            signame = (signal.Signals(self.preemption.received).name
                       if self.preemption.received else "a signal on another rank")
            atomic_write(self.run_dir / PREEMPTED_MARKER, json.dumps(
                {"step": self.step, "signal": signame, "time": time.time()}))
            print(f"preempted ({signame}): saved step {self.step} to {self.checkpoint_dir}; "
                  f"exiting with status {EXIT_PREEMPTED} for a requeue", flush=True)
        dist.barrier()
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

    def _count_nonfinite(self, loss: float, skipped: bool) -> None:
        """Counts steps in a row with a non-finite loss or a skipped update; stops at the limit.

        The loss is averaged over ranks, so a NaN on any rank is a NaN on all: every rank
        counts the same. Under fp16 a skipped update is the loss scaler's overflow, which is
        routine and handled by DeepSpeed, so only a non-finite loss counts there.
        """
        bad = not math.isfinite(loss) or (skipped and not self.fp16)
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        limit = self.config.run.max_nonfinite_steps
        if bad and self.rank == 0:
            print(f"step {self.step}: non-finite loss or gradient (loss {loss}); the "
                  f"update was {'skipped' if skipped else 'applied'} "
                  f"({self.nonfinite_streak} in a row, limit {limit})", file=sys.stderr, flush=True)
        if self.nonfinite_streak >= limit:
            first = self.step - self.nonfinite_streak + 1
            latest = read_latest(self.checkpoint_dir)
            kept = (f"the last checkpoint, {self.checkpoint_dir / latest}, was saved before them"
                    if latest else "no checkpoint was saved")
            raise NonFiniteLimitError(
                f"steps {first} to {self.step}: {self.nonfinite_streak} steps in a row had a "
                f"non-finite loss or gradient (run.max_nonfinite_steps={limit}); each was skipped, "
                f"so the parameters are those after step {first - 1}, and {kept}. Lower the "
                "learning rate or check the data, then resume with run.resume=true")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """The task's evaluation (perplexity; BLEU for translation) over every rank's share."""
        self.phase = f"evaluation after step {self.step}"
        self.engine.eval()
        results = self.task.evaluate(self.engine, self.device, self.run_dir)
        self.engine.train()
        return results

    # ------------------------------------------------------------------ logging, checkpoints
    def _log(self, metrics: dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if "loss" in metrics:
            self.last_train = {"step": self.step, **metrics}
        named = {(f"train/{k}" if "/" not in k else k): v for k, v in metrics.items()}
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(k, v, self.step) for k, v in named.items()])
        self.tracker.log_scalars(named, self.step)

    def _log_evaluation(self, results: dict[str, float]) -> None:
        """Evaluation metrics, the expert-load picture since the previous evaluation and,
        for translation, a table of sample translations."""
        self._log(results)
        self.tracker.log_expert_load(self.eval_window.counts, self.step, self.eval_window.since)
        self.eval_window = ExpertWindow(since=self.step)
        samples = self.config.tracking.translation_samples
        for split in self.config.data.eval_splits:
            rows = sample_translations(self.run_dir, split, samples) if samples else []
            self.tracker.log_table(f"{split}/translations", ["reference", "hypothesis"], rows,
                                   self.step)

    def _append_expert_load(self, counts: list[list[float]]) -> None:
        """Tokens per expert of every MoE layer at this step (the load heatmap's data)."""
        if self.rank == 0 and counts:
            with open(self.run_dir / "expert_load.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, "layers": counts}) + "\n")

    def save(self) -> None:
        """A checkpoint of this step, visible through ``latest`` only once complete on every rank."""
        self.phase = f"saving the checkpoint of step {self.step}"
        client = {"step": self.step, "data": self.batches.state_dict(),
                  "wandb_run_id": self.wandb_run_id, "seed": self.config.run.seed,
                  "config": to_dict(self.config)}
        save_checkpoint(self.engine, self.writer, self.checkpoint_dir, self.step, client,
                        self.config.run.keep_last)
        self.tracker.checkpoint_saved()
        # DeepSpeed clones every local expert before writing them one file each: a copy of
        # the rank's experts in pieces small enough for the heap, which would otherwise stay
        # resident beside the next steps' buffers.
        release_freed_host_memory()
        self.save_due = False
        self.saved_step, self.last_save_time = self.step, time.monotonic()


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak host memory (VmHWM) and, on GPUs, the caching allocator's peaks
    (what tensors held, and what it reserved from the driver for them), in MiB.

    The run's ``summary.json`` holds the largest over ranks, and each rank's."""
    peaks = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peaks["peak_host_memory_mib"] = int(line.split()[1]) / 1024
    if device.type == "cuda":
        peaks["peak_device_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peaks["peak_device_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peaks


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    lines = [f"run directory: {run_dir}", f"steps: {summary['steps']}",
             f"time: {summary['seconds']:.1f} s"]
    if summary.get("train_loss") is not None:
        lines.append(f"final training loss: {summary['train_loss']:.4f}")
    for key, value in summary.items():
        if key.endswith(("/perplexity", "/bleu")):
            lines.append(f"{key}: {value:.2f}")
    width = max(len(line) for line in lines)
    print("+" + "-" * (width + 2) + "+")
    for line in lines:
        print(f"| {line.ljust(width)} |")
    print("+" + "-" * (width + 2) + "+")
