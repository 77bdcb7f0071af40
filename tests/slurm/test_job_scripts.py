"""The job scripts in slurm/, submitted with sbatch to a real local Slurm (two fake nodes).

Every training job runs the debug preset on CPU (gloo) with two ranks; its losses are
compared with the same run launched directly with torchrun outside Slurm.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import FINISHED, Job, read_metric, submit, train_overrides
from tests.train.conftest import REPO, run_training
from tests.wandb_files import offline_run_files, read_offline_run

STEPS = 10


def _user_config(wt_corpus) -> str:
    """A user's run YAML, outside the checkout (the templates have no default config)."""
    path = Path(wt_corpus["root"]) / "my_run.yaml"
    if not path.exists():
        path.write_text(f"# my run\ndata:\n  corpus: {wt_corpus['corpus']}\n"
                        f"  tokenizer: {wt_corpus['tokenizer']}\nmodel:\n  preset: debug-moe\n"
                        "optimizer:\n  name: adam\n  lr: 0.01\ntracking:\n  project: slurm-tests\n")
    return str(path)


@pytest.fixture(scope="module")
def direct_run(wt_corpus, tmp_path_factory) -> dict[int, float]:
    """The reference: the same configuration, two ranks, launched directly with torchrun."""
    run_dir = tmp_path_factory.mktemp("direct") / "run"
    run_training(["--config", _user_config(wt_corpus), f"run.dir={run_dir}",
                  *train_overrides(wt_corpus, STEPS)], nproc=2)
    losses = read_metric(run_dir, "train_loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _variables(wt_corpus, run_dir: Path, steps: int = STEPS, *extra: str) -> dict[str, str]:
    return {"CONFIG": _user_config(wt_corpus), "RUN_DIR": str(run_dir),
            "OVERRIDES": " ".join(train_overrides(wt_corpus, steps, *extra))}


def _assert_completed(job: Job, info: dict[str, str]) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job.job_id}: {info['JobState']} {info['ExitCode']}\n{job.text()[-5000:]}"


@pytest.mark.timeout(120)
def test_the_cluster_has_four_gpus_a_node_and_the_templates_count_them(slurm):
    """What a job sees of the nodes' GPUs (``Gres=gpu:4``): the count in ``SLURM_GPUS_ON_NODE``,
    which the templates read for the processes a node, and the devices in
    ``CUDA_VISIBLE_DEVICES``; a fifth GPU is refused at submission."""
    seen = slurm.command("srun", "--nodes=1", "--gpus-per-node=4", "bash", "-c",
                         "echo gpus=$SLURM_GPUS_ON_NODE visible=$CUDA_VISIBLE_DEVICES")
    assert seen.split() == ["gpus=4", "visible=0,1,2,3"], seen
    counted = slurm.command("srun", "--nodes=1", "--gpus-per-node=3", "bash", "-c",
                            f"source {REPO / 'slurm' / 'lib.sh'} && smoe_gpus_per_node")
    assert counted.split() == ["3"], counted
    refused = subprocess.run(["srun", "--nodes=1", "--gpus-per-node=5", "true"], env=slurm.env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Requested node configuration is not available" in \
        refused.stderr, refused.stderr


@pytest.mark.timeout(300)
def test_srun_two_tasks_match_the_direct_run(slurm, wt_corpus, direct_run, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, "train_srun.sbatch", tmp_path / "logs", "--nodes=1",
                 "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
                 **_variables(wt_corpus, run_dir))
    _assert_completed(job, job.wait())
    assert read_metric(run_dir, "train_loss") == direct_run
    assert _wandb_group(run_dir) == job.job_id  # W&B runs grouped by the job id
    # Each rank is bound to the one CPU of its task, a different one for each.
    bindings = _cpu_binding(job.text())
    assert [len(cpus) for cpus in bindings] == [1, 1] and bindings[0] != bindings[1], bindings


def _cpu_binding(log: str) -> list[list[int]]:
    """The CPUs of each rank, from the trainer's ``CPU binding:`` line (rank order)."""
    line = re.search(r"CPU binding: (.*)", log)
    assert line, log[-3000:]
    ranks = []
    for listed in re.findall(r"CPU\(s\) \[([^\]]*)\]", line.group(1)):
        cpus = []
        for part in listed.split(","):
            first, _, last = part.partition("-")
            cpus += list(range(int(first), int(last or first) + 1))
        ranks.append(cpus)
    return ranks


@pytest.mark.timeout(300)
def test_deepspeed_launcher_completes_and_matches(slurm, wt_corpus, direct_run, tmp_path):
    """One node: the launcher starts both processes itself (``deepspeed --module``)."""
    run_dir = tmp_path / "run"
    job = submit(slurm, "train_deepspeed.sbatch", tmp_path / "logs", "--nodes=1",
                 "--gpus-per-node=2", "--cpus-per-task=2", **_variables(wt_corpus, run_dir))
    _assert_completed(job, job.wait())
    assert (run_dir / "hostfile").read_text().split() == ["smoenode1", "slots=2"]
    assert read_metric(run_dir, "train_loss") == direct_run
    assert "1 threads per process" in job.text()  # 2 CPUs shared by 2 processes


@pytest.mark.timeout(200)
@pytest.mark.parametrize("script, sbatch_args, variables, message", [
    ("train_deepspeed.sbatch", ["--nodes=2"], {},
     "train_deepspeed.sbatch runs on one node, found --nodes=2; use slurm/train_torchrun.sbatch"),
    ("train_torchrun.sbatch", ["--nodes=1"], {"CONFIG": ""},
     "CONFIG is not set: expected the run's YAML"),
], ids=["deepspeed-two-nodes", "no-config"])
def test_templates_refuse_what_they_cannot_run(slurm, wt_corpus, tmp_path, script, sbatch_args,
                                               variables, message):
    run_dir = tmp_path / "run"
    job = submit(slurm, script, tmp_path / "logs", *sbatch_args, "--gpus-per-node=1",
                 "--cpus-per-task=1", **{**_variables(wt_corpus, run_dir), **variables})
    info = job.wait(timeout=120)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", job.text()[-3000:]
    assert message in job.text(), job.text()[-3000:]


def _wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 180) -> None:
    losses = run_dir / "metrics" / "train_loss.csv"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if losses.exists() and len(losses.read_text().splitlines()) > step:  # header + steps
            return
        if job.info().get("JobState") in FINISHED:
            break
        time.sleep(0.1)
    raise AssertionError(f"the job never reached step {step}:\n{job.text()[-4000:]}")


@pytest.mark.timeout(400)
def test_torchrun_two_nodes_saved_on_usr1_requeue_and_match_the_direct_run(
        slurm, wt_corpus, direct_run, tmp_path):
    """Two nodes of torchrun, and USR1 to the batch shell (what --signal=B:USR1 does) once in
    the middle of the run: the job saves, requeues, resumes and ends with the losses of the
    direct run."""
    run_dir = tmp_path / "run"
    job = submit(slurm, "train_torchrun.sbatch", tmp_path / "logs", "--nodes=2",
                 "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=2",
                 **_variables(wt_corpus, run_dir))
    _wait_for_step(job, run_dir, 2)
    slurm.command("scancel", "--batch", "--signal=USR1", job.job_id)
    info = job.wait(timeout=300)
    _assert_completed(job, info)
    log = job.text()
    assert info["Restarts"] == "1", log[-5000:]
    preempted = re.search(r'preempted: (\{.*\}); requeueing job', log)
    assert preempted, log[-5000:]
    saved = json.loads(preempted.group(1))["step"]
    assert 2 <= saved < STEPS and json.loads(preempted.group(1))["signal"] == "SIGUSR1"
    assert f"at step {saved} (SLURM_RESTART_COUNT=1)" in log
    assert "SLURM_RESTART_COUNT=1 run_dir=" in log  # the requeued job's start-up line
    assert "torchrun: 2 nodes x 1 processes, rendezvous smoenode1:" in log
    assert read_metric(run_dir, "train_loss") == direct_run
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    # Each node's task has 2 CPUs, and so has its one worker (the inner srun is given the
    # job's --cpus-per-task; Slurm 22.05 would start the step with 1 CPU otherwise).
    assert [len(cpus) for cpus in _cpu_binding(log)] == [2, 2], log[-3000:]
    # W&B: one run id for both starts of the job; the requeued start's offline run, the one
    # left for wandb sync, holds every step once (the first start's is kept aside).
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = offline_run_files(run_dir)
    assert len(files) == 1 and files[0].parent.name.endswith(run_id), files
    superseded = list((run_dir / "wandb" / "superseded").glob(f"offline-run-*-{run_id}"))
    assert len(superseded) == 1, superseded
    assert read_offline_run(files[0]).values("train/loss") == direct_run


@pytest.mark.timeout(500)
def test_term_with_a_save_longer_than_30_s_saves_requeues_and_resumes(slurm, wt_corpus,
                                                                      direct_run, tmp_path):
    """TERM to the batch shell while each checkpoint file takes 8 s to write (a save of over
    30 s, torchrun's default grace): the workers get the TERM, torchrun waits for them, the
    save completes, and the requeued job resumes from it to the same losses."""
    run_dir = tmp_path / "run"
    job = submit(slurm, "train_torchrun.sbatch", tmp_path / "logs", "--nodes=1",
                 "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-task=2",
                 SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY="8",
                 SPARSE_MOE_TRAIN_FAULT_SAVE_DELAY_RESTART="0",  # the requeued start saves fast
                 **_variables(wt_corpus, run_dir))
    _wait_for_step(job, run_dir, 2)
    slurm.command("scancel", "--batch", "--signal=TERM", job.job_id)
    info = job.wait(timeout=450)
    _assert_completed(job, info)
    log = job.text()
    # The node's task has 2 CPUs (the inner srun gets --cpus-per-task too): both workers see
    # both, and share them with one thread each.
    assert "threads per process: 1 (--cpus-per-task=2, 2 processes a node)" in log
    assert [len(cpus) for cpus in _cpu_binding(log)] == [2, 2], log[-3000:]
    assert info["Restarts"] == "1", log[-5000:]
    preempted = re.search(r"\[(\S+ \S+)\] .* preempted: (\{.*\}); requeueing job", log)
    received = re.search(r"\[(\S+ \S+)\] .* received SIGTERM", log)
    assert preempted and received, log[-5000:]
    marker = json.loads(preempted.group(2))
    # The batch shell forwards the TERM to srun as USR1 (srun would abort its step on a TERM).
    assert "received SIGTERM: forwarding it to the training processes as SIGUSR1" in log
    assert "forcing job termination" not in log, log[-5000:]
    assert marker["signal"] == "SIGUSR1" and 2 <= marker["step"] < STEPS
    seconds = (time.mktime(time.strptime(preempted.group(1), "%Y-%m-%d %H:%M:%S"))
               - time.mktime(time.strptime(received.group(1), "%Y-%m-%d %H:%M:%S")))
    assert seconds > 30, f"the save took {seconds} s: not longer than torchrun's default grace"
    assert f"at step {marker['step']} (SLURM_RESTART_COUNT=1)" in log
    assert read_metric(run_dir, "train_loss") == direct_run


def _wandb_group(run_dir: Path) -> str:
    (path,) = offline_run_files(run_dir)
    return read_offline_run(path).run.run_group


def _wait_for_state(job: Job, state: str, timeout: float = 120) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job.info()
        if info.get("JobState") == state:
            return info
        if info.get("JobState") in FINISHED:
            break
        time.sleep(0.2)
    raise AssertionError(f"job {job.job_id} never reached {state}: {job.info().get('JobState')}"
                         f"\n{job.text()[-4000:]}")


@pytest.mark.timeout(500)
def test_a_preempted_two_node_run_continues_on_one_node_with_the_same_global_batch(
        slurm, wt_corpus, tmp_path):
    """A 2-node job loses a node (drained) and is preempted: it saves and requeues, and waits
    for two nodes. It is cancelled and the run is submitted again on one node (``RESUME=1``,
    the same ``RUN_DIR``). With ``deepspeed.gradient_accumulation_steps=auto`` the global batch
    stays 16 sequences (8 x 1 x 2 processes, then 8 x 2 x 1), and the run resumes on the new
    layout to the end."""
    run_dir = tmp_path / "run"
    extra = ["parallel.ep_size=1", "deepspeed.train_batch_size=16",
             "deepspeed.gradient_accumulation_steps=auto"]
    variables = _variables(wt_corpus, run_dir, STEPS, *extra)
    first = submit(slurm, "train_torchrun.sbatch", tmp_path / "logs", "--nodes=2",
                   "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=2", **variables)
    try:
        _wait_for_step(first, run_dir, 2)
        slurm.command("scontrol", "update", "nodename=smoenode2", "state=drain",
                      "reason=elastic-test")
        slurm.command("scancel", "--batch", "--signal=USR1", first.job_id)
        _wait_for_state(first, "PENDING")  # requeued; two nodes are no longer there
        slurm.command("scancel", first.job_id)
        second = submit(slurm, "train_torchrun.sbatch", tmp_path / "logs", "--nodes=1",
                        "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                        **variables, RESUME="1")
        info = second.wait(timeout=300)
    finally:
        slurm.command("scontrol", "update", "nodename=smoenode2", "state=resume", check=False)
    saved = json.loads((run_dir / "preempted.json").read_text())["step"] \
        if (run_dir / "preempted.json").exists() else None
    _assert_completed(second, info)
    log = second.text()
    assert "torchrun: 1 nodes x 1 processes" in log, log[-5000:]
    assert re.search(r"at step \d+, re-split from 2 processes at ep_size=1", log), log[-5000:]
    assert saved is None  # the finished run removed the marker
    assert sorted(read_metric(run_dir, "train_loss")) == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "ds_config.json").read_text())[
        "gradient_accumulation_steps"] == 2


@pytest.mark.timeout(300)
def test_sweep_array_writes_one_run_per_configuration(slurm, wt_corpus, tmp_path):
    sweep_file = tmp_path / "sweep.txt"
    sweep_file.write_text("# name overrides\nlr-low optimizer.lr=0.001\n\n"
                          "lr-high optimizer.lr=0.02\n")
    sweep_dir = tmp_path / "sweep"
    variables = _variables(wt_corpus, tmp_path / "unused", 3, "parallel.ep_size=1")
    job = submit(slurm, "sweep.sbatch", tmp_path / "logs", "--array=0-1",
                 "--gpus-per-node=1", "--cpus-per-task=1", CONFIG=_user_config(wt_corpus),
                 OVERRIDES=variables["OVERRIDES"], SWEEP_FILE=str(sweep_file),
                 SWEEP_DIR=str(sweep_dir))
    deadline = time.time() + 240
    while time.time() < deadline:
        text = slurm.command("scontrol", "show", "job", "-o", job.job_id)
        states = re.findall(r"JobState=(\S+)", text)
        if len(states) == 2 and all(s in FINISHED for s in states):
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert states == ["COMPLETED", "COMPLETED"], logs[-5000:]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["lr-high", "lr-low"]
    for name, lr in (("lr-low", 0.001), ("lr-high", 0.02)):
        summary = json.loads((sweep_dir / name / "summary.json").read_text())
        assert summary["steps"] == 3
        assert f"lr: {lr}" in (sweep_dir / name / "config.yaml").read_text()
        assert _wandb_group(sweep_dir / name) == f"moe-sweep-{job.job_id}"  # the array's job


@pytest.mark.timeout(200)
def test_invalid_configuration_fails_fast_with_its_error_in_the_log(slurm, wt_corpus, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, "train_srun.sbatch", tmp_path / "logs", "--nodes=1",
                 "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
                 **_variables(wt_corpus, run_dir, STEPS, "run.keep_last=0"))
    info = job.wait(timeout=120)
    log = job.text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert "configuration error" in log and "RunConfig.keep_last" in log, log[-3000:]
    assert not (run_dir / "checkpoints").exists()
    minutes, seconds = info["RunTime"].split(":")[-2:]
    assert int(minutes) * 60 + int(seconds) < 60, f"took {info['RunTime']} to fail"


@pytest.mark.timeout(400)
def test_prep_builds_one_corpus_from_several_shards_and_training_follows_it(slurm, wt_corpus,
                                                                           tmp_path):
    """prep.sbatch encodes a glob of train shards into one corpus (two encoding processes);
    a training job chained on it with --dependency=afterok reads that corpus."""
    text = (Path(wt_corpus["root"]) / "train.txt").read_text(encoding="utf-8").splitlines()
    shards = tmp_path / "raw"
    shards.mkdir()
    half = len(text) // 2
    for i, part in enumerate((text[:half], text[half:])):
        (shards / f"news.en-{i:05d}-of-00002").write_text("\n".join(part) + "\n")
    valid = Path(wt_corpus["root"]) / "valid.txt"
    corpus = tmp_path / "corpus"
    prep = submit(slurm, "prep.sbatch", tmp_path / "logs", "--cpus-per-task=2",
                  TRAIN_TEXT=f"{shards}/news.en-*", VALID_TEXT=str(valid), OUTPUT=str(corpus),
                  VOCAB_SIZE="300")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  corpus: {corpus}\n  tokenizer: {corpus}/tokenizer/sp.model\n"
                      "  eval_splits: [valid]\nmodel:\n  preset: debug-moe\n")
    run_dir = tmp_path / "run"
    train = submit(slurm, "train_srun.sbatch", tmp_path / "logs", f"--dependency=afterok:{prep.job_id}",
                   "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
                   CONFIG=str(config), RUN_DIR=str(run_dir),
                   OVERRIDES="run.steps=3 run.log_every=1 run.eval_batches=1 run.progress=false "
                             "data.micro_batch_size=4 data.seq_len=16 parallel.ep_size=2")
    _assert_completed(prep, prep.wait(timeout=300))
    assert "encoding train: 2 file(s), 2 processes" in prep.text()
    train_split = json.loads((corpus / "manifest.json").read_text())["splits"]["train"]
    assert len(train_split["settings"]["source"]["inputs"]) == 2
    # A document per non-blank line of both shards, in the one corpus.
    assert sum(shard["documents"] for shard in train_split["shards"]) == sum(
        1 for line in text if line.strip())
    _assert_completed(train, train.wait(timeout=300))
    assert sorted(read_metric(run_dir, "train_loss")) == [1, 2, 3]
