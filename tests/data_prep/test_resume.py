"""An encode killed mid-shard resumes to output identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from data_prep.encode import FAULT_ENV

from .helpers import REPO, manifest
from .megatron_reference import read_split


def _run(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_killed_encode_resumes_to_identical_output(tmp_path, wt_file, spm_model):
    common = ["encode", "-i", str(wt_file), "-t", spm_model, "--shard-size", "25K",
              "--no-progress"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert _run(common + ["-o", str(reference)]).returncode == 0

    # SIGKILL after 3 finished shards, while the 4th is half written (worker processes in
    # flight: they must not outlive the kill).
    killed = _run(common + ["-o", str(resumed), "--num-proc", "2", "--engine", "processes"],
                  {FAULT_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = manifest(resumed)["splits"]["train"]
    assert not state["complete"] and len(state["shards"]) == 3
    assert (resumed / "train_00003.bin.tmp").exists()
    # A shard renamed into place but never recorded must not survive either.
    (resumed / "train_00003.bin.tmp").rename(resumed / "train_00003.bin")

    done = _run(common + ["-o", str(resumed), "--num-proc", "2"])
    assert done.returncode == 0, done.stderr
    assert "resumed after" in done.stdout
    names = sorted(p.name for p in reference.iterdir() if p.suffix in (".bin", ".idx"))
    assert names == sorted(p.name for p in resumed.iterdir() if p.suffix in (".bin", ".idx"))
    assert not list(resumed.glob("*.tmp"))
    for name in names:
        assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    ref_docs = read_split(reference, manifest(reference), "train")["documents"]
    assert read_split(resumed, manifest(resumed), "train")["documents"] == ref_docs
    assert manifest(resumed)["splits"]["train"]["shards"] == \
        manifest(reference)["splits"]["train"]["shards"]


def test_resume_redoes_a_damaged_finished_shard(tmp_path, wt_file, spm_model):
    common = ["encode", "-i", str(wt_file), "-t", spm_model, "--shard-size", "25K",
              "--no-progress"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert _run(common + ["-o", str(reference)]).returncode == 0
    assert _run(common + ["-o", str(resumed)], {FAULT_ENV: "3"}).returncode == -signal.SIGKILL
    shard = resumed / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])               # truncated after the fact
    done = _run(common + ["-o", str(resumed)])
    assert done.returncode == 0 and "redoing from shard train_00001" in done.stderr
    for path in reference.glob("*.bin"):
        assert path.read_bytes() == (resumed / path.name).read_bytes()
