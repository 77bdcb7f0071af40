"""Data prep under faults: killed at any moment it resumes to the same bytes; a disk that
fills up or a directory that cannot be written gives an error naming the path and keeps the
shards finished before it.

The reference is an uninterrupted run of the same command. Kill points are named places in
the write path (``SPARSE_MOE_DATA_FAULT_AT``) plus SIGKILLs at random moments of a longer
run. A full disk is simulated by a file object whose ``write`` raises ENOSPC (a real small
filesystem needs privileges CI does not have); an unwritable directory is a real
``chmod 555`` directory, written without the power to override permissions when the tests
run as root (root otherwise ignores them).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_prep.encode import FAULT_ENV, EncodeOptions
from data_prep.jobs import encode_corpus
from data_prep.sources import DataPrepError, SourceSpec
from sparse_moe.data import indexed, verify_corpus
from sparse_moe.data.indexed import FAULT_AT_ENV, FAULT_POINTS

from .helpers import REPO, SHARED, manifest


def _encode_command(text: Path, model: str, out: Path, shard_size: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", "encode", "-i", str(text), "-t", model, "-o",
            str(out), "--shard-size", shard_size, "--no-progress"]


def _run(command: list[str], env_extra: dict | None = None, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          **kwargs)


def _shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix in (".bin", ".idx")}


def _assert_same_corpus(reference: Path, resumed: Path) -> None:
    assert not list(resumed.glob("*.tmp")), sorted(p.name for p in resumed.glob("*.tmp"))
    ref, got = _shard_files(reference), _shard_files(resumed)
    assert sorted(got) == sorted(ref)
    for name, data in ref.items():
        assert got[name] == data, name
    assert manifest(resumed)["splits"]["train"]["shards"] == \
        manifest(reference)["splits"]["train"]["shards"]
    assert manifest(resumed)["splits"]["train"]["complete"]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory, wt_file, spm_model) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    done = _run(_encode_command(wt_file, spm_model, out, "25K"))
    assert done.returncode == 0, done.stderr
    assert len(manifest(out)["splits"]["train"]["shards"]) >= 5
    return out


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_killed_at_each_point_of_the_write_path_resumes_to_identical_shards(
        point, tmp_path, wt_file, spm_model, small_reference):
    out = tmp_path / "out"
    command = _encode_command(wt_file, spm_model, out, "25K")
    killed = _run(command, {FAULT_AT_ENV: f"{point}:train_00002"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    recorded = manifest(out)["splits"]["train"]
    assert not recorded["complete"]
    assert [s["name"] for s in recorded["shards"]] == ["train_00000", "train_00001"]
    done = _run(command)
    assert done.returncode == 0, done.stderr
    _assert_same_corpus(small_reference, out)


def test_killed_at_random_moments_resumes_to_identical_shards(tmp_path, spm_model):
    """SIGKILL at moments drawn at random over the run: writes, fsyncs, renames, manifest."""
    text = tmp_path / "wt.txt"
    data = (SHARED / "wikitext-2" / "train.txt").read_bytes()[:3_000_000]
    text.write_bytes(data[: data.rfind(b"\n") + 1])
    reference = tmp_path / "reference"
    started = time.perf_counter()
    assert _run(_encode_command(text, spm_model, reference, "64K")).returncode == 0
    duration = time.perf_counter() - started
    rng = random.Random(20240607)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        command = _encode_command(text, spm_model, out, "64K")
        # Killed once or twice (the second time while resuming), then resumed to the end.
        fractions = ([rng.uniform(0.2, 0.6)] if attempt != 1 else
                     [rng.uniform(0.2, 0.4), rng.uniform(0.05, 0.2)])
        for fraction in fractions:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(fraction * duration)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
        done = _run(command)
        assert done.returncode == 0, done.stderr
        _assert_same_corpus(reference, out)


class _FullDisk:
    """Stands in for ``open`` in the shard writer: a disk with ``room`` bytes left.

    Once the bytes written through it pass ``room``, ``write`` fails with ENOSPC, as a real
    full disk does, without a file name (the writer must add it).
    """

    def __init__(self, room: int, only_suffix: str = "") -> None:
        self.room, self.only_suffix = room, only_suffix

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "w" not in mode or not str(path).endswith(self.only_suffix):
            return handle
        disk = self

        class Handle:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                disk.room -= len(data)
                if disk.room < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return handle.write(data)

        return Handle()


@pytest.mark.parametrize("where", ["tokens", "index"])
def test_disk_full_names_the_file_keeps_finished_shards_and_resumes(
        where, tmp_path, wt_file, spm_model, small_reference, monkeypatch):
    out = tmp_path / "out"
    reference = manifest(small_reference)["splits"]["train"]["shards"]
    # Room for the first two shards' files of that kind and a little of the third's.
    if where == "tokens":
        disk = _FullDisk(sum(s["bin_bytes"] for s in reference[:2]) + 1000, ".bin.tmp")
    else:
        disk = _FullDisk(sum(s["idx_bytes"] for s in reference[:2]) + 10, ".idx.tmp")
    monkeypatch.setattr(indexed, "open", disk, raising=False)
    options = EncodeOptions(tokenizer=spm_model, output=str(out), shard_bytes=25 * 1024,
                            progress=False)
    with pytest.raises(DataPrepError) as raised:
        encode_corpus(SourceSpec([str(wt_file)]), options, command=["test"])
    failed = f"train_00002.{'bin' if where == 'tokens' else 'idx'}.tmp"
    assert f"{out / failed}: cannot write (No space left on device)" in str(raised.value)
    assert "2 finished shard(s) of split 'train' are kept" in str(raised.value)
    assert [s["name"] for s in manifest(out)["splits"]["train"]["shards"]] == [
        "train_00000", "train_00001"]
    assert not list(out.glob("*.tmp"))
    report = verify_corpus(out)
    assert report["train/train_00000"] == [] and report["train/train_00001"] == []
    monkeypatch.undo()
    encode_corpus(SourceSpec([str(wt_file)]), options, command=["test"])
    _assert_same_corpus(small_reference, out)


def _unprivileged(command: list[str]) -> list[str]:
    """The command without the power to override file permissions, when the tests run as root.

    Root keeps its user id but loses ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH`` (from
    the bounding set, so the command never gains them): a folder's mode bits then bind it as
    they bind its owner. It still reads the checkout and its virtual environment as their
    owner, whatever they grant others, so the test does not depend on where the checkout
    lives or with what permissions.
    """
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root needs util-linux's setpriv to drop capabilities"
    dropped = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    _assert_runs_without_override(dropped)
    return [*dropped, *command]


def _assert_runs_without_override(dropped: list[str]) -> None:
    """data_prep must start under the dropped capabilities; otherwise say why, instead of
    failing on the command's output for a reason that has nothing to do with the test."""
    probe = subprocess.run([*dropped, sys.executable, "-c", "import data_prep.cli"],
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=120, cwd="/")
    if probe.returncode != 0:
        detail = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode
        pytest.fail(f"this test runs data_prep as root without CAP_DAC_OVERRIDE (setpriv "
                    f"--bounding-set), which could not import it from {REPO} with "
                    f"{sys.executable}: {detail}. The checkout must be owned by, or readable "
                    f"to, the user running the tests", pytrace=False)


def test_unwritable_output_names_the_path_and_keeps_finished_shards(wt_file, spm_model,
                                                                     small_reference):
    root = Path(tempfile.mkdtemp(prefix="sparse-moe-ro-"))
    try:
        root.chmod(0o755)
        text, model = root / "wt.txt", root / "wt.model"
        shutil.copy(wt_file, text)
        shutil.copy(spm_model, model)
        out = root / "out"
        command = _encode_command(text, str(model), out, "25K")
        killed = _run(command, {FAULT_ENV: "2"})   # two shards done, the third half written
        assert killed.returncode == -signal.SIGKILL
        for path in [root, text, model, *out.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        before = _shard_files(out)
        out.chmod(0o555)
        refused = _run(_unprivileged(command))
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        assert f"{out}/train_00002.bin.tmp: cannot write (Permission denied)" in refused.stderr
        assert "2 finished shard(s) of split 'train' are kept" in refused.stderr
        assert _shard_files(out) == before
        out.chmod(0o755)
        done = _run(command)
        assert done.returncode == 0, done.stderr
        _assert_same_corpus(small_reference, out)
    finally:
        for path in root.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(root)
