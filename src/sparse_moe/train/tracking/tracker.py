"""The run's dashboards: W&B and TensorBoard, driven by rank 0, each step's points once.

Why the trainer drives wandb itself instead of DeepSpeed's wandb monitor: that monitor calls
``wandb.init(project, group)`` only (no configuration, name, tags or step metric) and logs its
learning rate with the number of samples as the W&B step, so every row the trainer logged
with the optimizer step arrived "in the past" and wandb dropped it. Here every row is logged
with ``step=`` the optimizer step (W&B's ``_step`` is the optimizer step) and carries a
``step`` column that ``define_metric`` makes every series' x-axis.

Kills and resumes. Everything logged is also appended to a journal
(``<run>/tracking/history.jsonl``) that is cut back, like the CSV files, to the step a resumed
run starts from. wandb-core writes an offline run's file in 32 KiB blocks, so a killed
process loses its last records; and a resumed run re-runs the steps after its checkpoint.
So, offline (the default), a resumed run moves the earlier attempts' offline directories to
``wandb/superseded/`` and replays the journal into its own, under the same run id: the one
offline directory left under ``<run>/wandb/`` holds every step once, the re-run steps with
their resumed values, and is what ``wandb sync`` uploads. Online, W&B's server already holds
the earlier points and drops points below the resumed run's step; nothing is replayed.
TensorBoard gets ``purge_step``: its reader drops an earlier attempt's events from the
resumed step on. The writer is flushed and the journal synced at each checkpoint, so nothing
logged before a checkpoint is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sparse_moe.train.config import TrackingConfig
from sparse_moe.train.tracking.metric_files import JOURNAL

STEP_METRIC = "step"
EXPERT_LOAD_KEY = "moe/expert_load"
MEDIA_DIR = "tracking/media"


class Tracker:
    """Rank 0's W&B run and TensorBoard writer (either may be off), and their journal."""

    def __init__(self, tracking: TrackingConfig, run_dir: Path, run_id: str,
                 run_config: dict[str, Any], start_step: int) -> None:
        self.tracking, self.run_dir, self.run_id = tracking, run_dir, run_id
        self.journal = run_dir / JOURNAL
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        self.tensorboard = None
        if tracking.wandb and tracking.wandb_mode != "disabled":
            self.wandb_run = self._start_wandb(run_config, start_step)
        if tracking.tensorboard:
            self.tensorboard = self._start_tensorboard(run_config, start_step)

    # ------------------------------------------------------------------ set-up
    def _start_wandb(self, run_config: dict[str, Any], start_step: int):
        import wandb

        offline = self.tracking.wandb_mode == "offline"
        if offline:  # a run started anew in the directory supersedes the earlier one too
            self._supersede_offline_attempts()
        tracking = self.tracking
        run = wandb.init(
            project=tracking.project, entity=tracking.entity, id=self.run_id, resume="allow",
            name=tracking.name or self.run_dir.resolve().name, group=run_group(tracking),
            tags=list(tracking.tags), job_type=tracking.job_type, notes=tracking.notes,
            config=run_config, dir=str(self.run_dir), mode=tracking.wandb_mode,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        if offline and start_step > 0:
            self._replay(run)
        return run

    def _supersede_offline_attempts(self) -> None:
        """Earlier offline attempts of this run id go to ``wandb/superseded/`` (the journal
        replayed into the new attempt holds what they logged up to the checkpoint)."""
        wandb_dir = self.run_dir / "wandb"
        attempts = sorted(wandb_dir.glob(f"offline-run-*-{self.run_id}"))
        if not attempts:
            return
        superseded = wandb_dir / "superseded"
        superseded.mkdir(exist_ok=True)
        for attempt in attempts:
            shutil.move(str(attempt), str(superseded / attempt.name))
        latest = wandb_dir / "latest-run"
        if latest.is_symlink():
            latest.unlink()

    def _replay(self, run: Any) -> None:
        for record in read_journal(self.journal):
            run.log(self._wandb_values(record), step=record["step"])

    def _start_tensorboard(self, run_config: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                               purge_step=start_step + 1 if start_step > 0 else None)
        if start_step == 0:
            text = "```yaml\n" + json.dumps(run_config, indent=2, default=str) + "\n```"
            writer.add_text("config", text, 0)
        return writer

    # ------------------------------------------------------------------ logging
    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        self._record({"step": step, "scalars": metrics})

    def log_expert_load(self, counts: list[list[float]], step: int, since: int) -> None:
        """The expert-load picture of steps ``since + 1 .. step`` (per layer, per expert)."""
        if not counts or not (self.wandb_run or self.tensorboard):
            return
        # matplotlib is imported here, at the first picture, not with the trainer.
        from sparse_moe.train.tracking.expert_load_image import draw_expert_load

        path = draw_expert_load(counts, step, since,
                                self.run_dir / MEDIA_DIR / f"expert_load_{step:08d}.png")
        self._record({"step": step, "images": {EXPERT_LOAD_KEY: str(path.relative_to(
            self.run_dir))}})

    def log_table(self, key: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        if rows:
            self._record({"step": step, "tables": {key: {"columns": columns, "rows": rows}}})

    def _record(self, record: dict[str, Any]) -> None:
        with open(self.journal, "a", encoding="utf-8") as journal:
            journal.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(self._wandb_values(record), step=record["step"])
        if self.tensorboard is not None:
            self._write_tensorboard(record)

    def _wandb_values(self, record: dict[str, Any]) -> dict[str, Any]:
        import wandb

        values: dict[str, Any] = {STEP_METRIC: record["step"], **record.get("scalars", {})}
        for key, path in record.get("images", {}).items():
            values[key] = wandb.Image(str(self.run_dir / path))
        for key, table in record.get("tables", {}).items():
            values[key] = wandb.Table(columns=table["columns"], data=table["rows"])
        return values

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        step, writer = record["step"], self.tensorboard
        for key, value in record.get("scalars", {}).items():
            writer.add_scalar(key, value, step)
        for key, path in record.get("images", {}).items():
            import matplotlib.image

            pixels = matplotlib.image.imread(self.run_dir / path)[..., :3]
            writer.add_image(key, np.ascontiguousarray(pixels), step, dataformats="HWC")
        for key, table in record.get("tables", {}).items():
            header = "| " + " | ".join(table["columns"]) + " |"
            rule = "|" + "---|" * len(table["columns"])
            lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                     for row in table["rows"]]
            writer.add_text(key, "\n".join([header, rule, *lines]), step)

    # ------------------------------------------------------------------ checkpoints, end
    def checkpoint_saved(self) -> None:
        """Makes everything logged so far survive a kill (the journal and TensorBoard)."""
        if self.journal.exists():
            with open(self.journal, "a", encoding="utf-8") as journal:
                journal.flush()
                os.fsync(journal.fileno())
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(
                    {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class NoTracker:
    """What ranks other than 0 hold: every call does nothing."""

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_expert_load(self, counts: list[list[float]], step: int, since: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        pass

    def checkpoint_saved(self) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


def run_group(tracking: TrackingConfig) -> str | None:
    """``tracking.group``, else the Slurm job (an array's job id for all its tasks)."""
    group = tracking.group or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get(
        "SLURM_JOB_ID")
    return None if group is None else str(group)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records, in the order logged (a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records
