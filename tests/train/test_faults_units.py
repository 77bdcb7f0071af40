"""The pieces of fault handling that need no processes: pruning, the pointer, the writer, the guard."""

from __future__ import annotations

import errno

import pytest
import torch

from sparse_moe.train.checkpoint.files import read_latest
from sparse_moe.train.checkpoint.save import (
    RecordingWriter,
    prune_checkpoints,
    remove_uncommitted,
    write_latest,
)
from sparse_moe.train.distributed import is_collective_failure
from sparse_moe.train.fault_injection import FaultInjection
from sparse_moe.train.nonfinite import NonFiniteGuard


def _tags(directory, steps):
    for step in steps:
        (directory / f"step_{step:08d}").mkdir()
        (directory / f"step_{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_pruning_keeps_the_newest_committed_and_never_latest(tmp_path):
    _tags(tmp_path, [1, 2, 3, 4, 5, 6])
    (tmp_path / "latest").write_text("step_00000004")
    (tmp_path / ".latest.123.tmp").write_text("step_0000")  # a pointer write that was killed
    prune_checkpoints(tmp_path, keep_last=2)
    # 5 and 6 were never committed (interrupted saves); 1 and 2 are older than the kept two.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003",
                                                          "step_00000004"]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004"]


def test_pruning_without_a_pointer_deletes_nothing(tmp_path):
    _tags(tmp_path, [1, 2, 3])
    prune_checkpoints(tmp_path, keep_last=1)
    assert len(list(tmp_path.iterdir())) == 3


def test_an_interrupted_save_is_removed_but_never_the_committed_one(tmp_path):
    _tags(tmp_path, [2, 4])
    (tmp_path / "latest").write_text("step_00000002\n")
    remove_uncommitted(tmp_path, "step_00000004")
    remove_uncommitted(tmp_path, "step_00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_latest_is_replaced_whole(tmp_path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, "step_00000008")
    write_latest(tmp_path, "step_00000012")
    assert (tmp_path / "latest").read_text() == "step_00000012"
    assert read_latest(tmp_path) == "step_00000012"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temporary file left


class _CheckpointEngine:
    """DeepSpeed's checkpoint-engine interface: save(state_dict, path)."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class _Engine:
    """What the writer wraps: the engine's ``checkpoint_engine``."""

    def __init__(self):
        self.checkpoint_engine = _CheckpointEngine()


def test_writer_records_files_and_turns_a_full_disk_into_a_report(tmp_path):
    engine = _Engine()
    writer = RecordingWriter(engine, FaultInjection(enospc_save=2))
    save = engine.checkpoint_engine.save  # what DeepSpeed calls for each file
    writer.begin()
    save({"a": torch.ones(2)}, str(tmp_path / "one" / "a.pt"))  # directory created
    writer.flush()
    assert writer.error is None and writer.written == [tmp_path / "one" / "a.pt"]
    assert torch.equal(torch.load(tmp_path / "one" / "a.pt")["a"], torch.ones(2))
    writer.begin()  # the second save: ENOSPC on its first file, nothing after it is written
    save({"b": torch.ones(2)}, str(tmp_path / "two" / "b.pt"))
    save({"c": torch.ones(2)}, str(tmp_path / "two" / "c.pt"))
    assert writer.error.startswith(f"writing {tmp_path / 'two' / 'b.pt'}: [Errno {errno.ENOSPC}]")
    assert (tmp_path / "two" / "b.pt").stat().st_size == 4096  # half written, as a full disk
    assert not (tmp_path / "two" / "c.pt").exists()


def test_fault_variables_are_checked(monkeypatch):
    monkeypatch.setenv("SPARSE_MOE_TRAIN_FAULT_RANKS", "1")
    monkeypatch.setenv("SPARSE_MOE_TRAIN_FAULT_NAN_STEPS", "3, 5")
    assert FaultInjection.from_environment(rank=0) == FaultInjection()
    assert FaultInjection.from_environment(rank=1).nan_steps == {3, 5}
    monkeypatch.setenv("SPARSE_MOE_TRAIN_FAULT_NAN_STEPS", "three")
    with pytest.raises(ValueError, match="SPARSE_MOE_TRAIN_FAULT_NAN_STEPS: expected comma-"):
        FaultInjection.from_environment(rank=1)


def _sgd_with_guard():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    return weight, optimizer, NonFiniteGuard(optimizer)


def test_guard_skips_a_step_with_a_nan_gradient():
    weight, optimizer, _ = _sgd_with_guard()
    weight.grad = torch.tensor([0.1, float("nan")])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.tensor([1.0, 2.0]))
    weight.grad = torch.tensor([0.2, 0.4])
    optimizer.step()
    assert not optimizer.overflow  # SGD by hand: w - lr * g
    assert torch.equal(weight.detach(), torch.tensor([1.0 - 0.5 * 0.2, 2.0 - 0.5 * 0.4]))


def test_guard_skips_a_step_whose_loss_was_not_finite_even_with_finite_gradients():
    weight, optimizer, guard = _sgd_with_guard()
    guard.note_loss(torch.tensor(float("inf")))
    weight.grad = torch.tensor([0.2, 0.4])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.tensor([1.0, 2.0]))
    guard.disable()
    optimizer.step()
    assert not hasattr(optimizer, "overflow") and weight[0].item() == pytest.approx(0.9)


def test_collective_failures_are_told_from_other_errors():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                        "by peer [127.0.0.1]:4242")
    assert is_collective_failure(gloo)
    assert is_collective_failure(RuntimeError("Timed out waiting 1800000ms for recv operation"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("Connection closed by peer"))


@pytest.mark.parametrize("error,status", [("CheckpointWriteError", 74), ("NonFiniteLimitError", 65),
                                          ("CollectiveFailure", 69)])
def test_command_line_returns_the_faults_status_with_one_message(error, status, monkeypatch,
                                                                  capsys):
    """No traceback after the trainer's own message; the status tells the job script why."""
    from sparse_moe.train import cli, errors, trainer

    class FailingTrainer:
        def __init__(self, config, startup):
            pass

        def run(self):
            raise getattr(errors, error)(f"{error} at step 7")

    monkeypatch.setattr(trainer, "Trainer", FailingTrainer)
    monkeypatch.setattr(cli, "check_inputs", lambda config, source: None)
    assert cli.main(["data.corpus=x"]) == status
    assert capsys.readouterr().err == f"sparse-moe-train: error: {error} at step 7\n"


def test_save_delay_can_be_limited_to_one_job_start(monkeypatch):
    from sparse_moe.train.fault_injection import FaultInjection

    monkeypatch.setenv("SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY", "8")
    assert FaultInjection.from_environment(0).save_delay == 8.0
    monkeypatch.setenv("SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY_RESTART", "0")
    assert FaultInjection.from_environment(0).save_delay == 8.0  # SLURM_RESTART_COUNT unset: 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert FaultInjection.from_environment(0).save_delay == 0.0
