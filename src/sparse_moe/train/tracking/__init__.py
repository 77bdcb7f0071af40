"""What a run logs and where users read it: W&B and TensorBoard (``tracker.py``), the CSV
files of DeepSpeed's monitor and the trainer's own JSON lines (``metric_files.py``), the
expert-load picture (``expert_load_image.py``), and the facts about the run that dashboards
group and filter by (``run_info.py``); ``run_log.py`` sends each step's and evaluation's figures
to all of them."""

from sparse_moe.train.tracking.metric_files import JOURNAL, continue_metrics
from sparse_moe.train.tracking.run_info import dashboard_config
from sparse_moe.train.tracking.run_log import RunLog, open_tracker
from sparse_moe.train.tracking.tracker import NoTracker, Tracker, read_journal
from sparse_moe.train.tracking.windows import ExpertWindow, sample_translations

__all__ = ["JOURNAL", "ExpertWindow", "NoTracker", "RunLog", "Tracker", "continue_metrics",
           "dashboard_config", "open_tracker", "read_journal", "sample_translations"]
