"""Why a training run stopped early, as exceptions whose message is the whole story.

Each says what failed, where (rank, file, step, collective), and what state the run directory
is in (which checkpoint ``latest`` names), so that the last line of a job log is enough to
decide what to do next.
"""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """A run that cannot continue. ``exit_status`` is what the command line should return."""

    exit_status = 1


class CheckpointWriteError(TrainingAborted):
    """A checkpoint could not be written on some rank; ``latest`` still names the previous one."""

    exit_status = 74  # EX_IOERR


class NonFiniteLimitError(TrainingAborted):
    """Too many steps in a row had a NaN/Inf loss or gradient (``run.max_nonfinite_steps``)."""

    exit_status = 65  # EX_DATAERR


class CollectiveFailure(TrainingAborted):
    """A collective failed or timed out: another rank died, hung or became unreachable."""

    exit_status = 69  # EX_UNAVAILABLE
