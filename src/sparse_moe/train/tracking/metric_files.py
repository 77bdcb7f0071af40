"""Metric files that read as one run's, across resumes and kills.

DeepSpeed's CSV monitor appends to ``<run>/metrics/<name>.csv`` and writes the header row the
first time each process logs a name, whatever the file holds. A resumed run therefore put a
second header in the middle of every file, and the steps run after the last checkpoint by a
killed process appeared twice (once from each run). Before a run logs anything, rank 0 keeps
in every metrics file its header and the rows up to the step the run starts from, each step
once (its last value), and tells the monitor the header is written. The trainer's own
``expert_load.jsonl`` is cut back the same way, and so is the tracking journal
(``tracking/history.jsonl``, every record of each step up to the resumed one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_moe.atomic import atomic_write
from sparse_moe.parallel import deepspeed_internals as ds_internals

# What the tracker logged, one JSON record a line: the dashboards' history, replayed into the
# W&B run of a resumed job (tracker.py).
JOURNAL = "tracking/history.jsonl"


def continue_metrics(run_dir: Path, monitor: Any, step: int) -> None:
    """Prepares ``run_dir``'s metric files for a run that continues after ``step`` (0: anew)."""
    metrics = run_dir / "metrics"
    headers = ds_internals.csv_monitor_files(monitor)
    for path in sorted(metrics.glob("*.csv")) if metrics.is_dir() else []:
        keep_rows_up_to(path, step)
        if headers is not None and path.stem not in headers:
            headers.append(path.stem)  # its header is there already
    expert_load = run_dir / "expert_load.jsonl"
    if expert_load.is_file():
        keep_records_up_to(expert_load, step)
    journal = run_dir / JOURNAL
    if journal.is_file():
        keep_records_up_to(journal, step, last_per_step=False)


def keep_rows_up_to(path: Path, step: int) -> None:
    """One header (the file's first) and each step up to ``step`` once, with its last value."""
    header, rows = None, {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        first, _, _ = line.partition(",")
        if first == "step":
            header = header or line
            continue
        try:
            logged = int(first)
        except ValueError:  # a row cut short by a kill
            continue
        if logged <= step:
            rows[logged] = line
    if header is None:
        header = "step,value"
    atomic_write(path, "\n".join([header, *(rows[s] for s in sorted(rows))]) + "\n")


def keep_records_up_to(path: Path, step: int, last_per_step: bool = True) -> None:
    """The JSON lines with ``step`` up to ``step``: each step once (its last record), or with
    ``last_per_step=False`` every record of those steps, in the order written."""
    kept: list[tuple[int, str]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and int(record.get("step", step + 1)) <= step:
            kept.append((int(record["step"]), line))
    if last_per_step:
        kept = sorted(dict(kept).items())
    atomic_write(path, "".join(line + "\n" for _, line in kept))
