"""What reaches the dashboards, read back with the readers users have: W&B's offline run file
(parsed with wandb's own protobuf classes, ``tests/wandb_files.py``), TensorBoard's
``EventAccumulator``, and the YAML ``--print-config`` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.train.conftest import REPO, read_metric, run_training
from tests.wandb_files import offline_run_files, read_offline_run

STEPS, LOG_EVERY, EVAL_EVERY = 12, 2, 6
# DeepSpeed's own CSV series (the learning rate against samples seen), not the trainer's.
DEEPSPEED_SERIES = {"Train_Samples_lr"}


def _overrides(wt_corpus, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={wt_corpus['tokenizer']}",
            f"run.dir={run_dir}", f"run.steps={STEPS}", f"run.log_every={LOG_EVERY}",
            f"run.eval_every={EVAL_EVERY}", "run.eval_batches=2", "run.progress=false",
            "data.micro_batch_size=4", "data.seq_len=16", "data.eval_splits=[valid]",
            "optimizer.name=adam", "optimizer.lr=0.01", "schedule.warmup_steps=3",
            "parallel.ep_size=2", *extra]


@pytest.fixture(scope="module")
def tracked_run(wt_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tracked") / "moe-ep2"
    run_training(_overrides(wt_corpus, run_dir, "tracking.tensorboard=true",
                            "tracking.group=study-1", "tracking.tags=[moe, ep2]",
                            "tracking.notes=a test run"), nproc=2, wandb=True)
    return run_dir


def _csv_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every metric the CSV files hold, under its logged name (``train_loss`` -> ``train/loss``)."""
    series = {}
    for path in sorted((run_dir / "metrics").glob("*.csv")):
        if path.stem not in DEEPSPEED_SERIES:
            section, _, name = path.stem.partition("_")
            series[f"{section}/{name}"] = read_metric(run_dir, path.stem)
    return series


def test_wandb_run_names_groups_and_configures_the_run(tracked_run, wt_corpus):
    files = offline_run_files(tracked_run)
    assert len(files) == 1, files
    run = read_offline_run(files[0])
    assert run.run.run_id == (tracked_run / "wandb_run_id").read_text().strip()
    assert run.run.display_name == "moe-ep2"  # the run directory's name
    assert (run.run.run_group, list(run.run.tags), run.run.job_type) == (
        "study-1", ["moe", "ep2"], "train")
    assert run.run.notes == "a test run"
    config = run.config
    # The resolved model: every field of the preset, at the corpus's vocabulary.
    from sparse_moe.models.presets import lm_preset

    manifest = yaml.safe_load((Path(wt_corpus["corpus"]) / "manifest.json").read_text())
    preset = lm_preset("debug-moe", manifest["tokenizer"]["vocab_size"]).to_dict()
    preset.pop("activation_checkpointing")
    assert config["model"]["preset"] == "debug-moe"
    assert config["model"]["overrides"] == yaml.safe_load(yaml.safe_dump(preset))
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 0.01
    assert config["layout"] == {"world_size": 2, "ep_size": 2, "expert_data_parallel_size": 1,
                                "data_parallel_size": 2}
    assert config["deepspeed_config"]["train_batch_size"] == 4 * 2
    assert config["parallel"]["ep_size"] == 2 and config["data"]["seq_len"] == 16
    # Every field of each MoE layer as built, defaults included (the paper's weights).
    (moe,) = config["moe_layers"]
    assert (moe["num_experts"], moe["k"], moe["d_model"]) == (8, 2, preset["d_model"])
    assert moe["w_importance"] == 0.1 and moe["gating"] == "noisy_topk"
    commit = config["code"]["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    # Every series is plotted against the optimizer step.
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in run.metrics)


def test_wandb_history_holds_every_metric_at_every_logged_step(tracked_run):
    run = read_offline_run(offline_run_files(tracked_run)[0])
    logged = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [row["_step"] for row in run.history] == logged  # one row per step, in order
    assert all(row["step"] == row["_step"] for row in run.history)
    series = _csv_series(tracked_run)
    for key in ("train/loss", "train/cross_entropy", "train/aux_loss", "train/lr",
                "train/grad_norm", "train/tokens_per_second", "train/model_flops_per_second",
                "train/skipped_steps", "moe0/cv_load", "moe0/cv_importance", "moe0/dead_experts",
                "moe0/max_over_mean", "valid/perplexity", "valid/perplexity_per_word",
                "system/peak_host_memory_mib"):
        assert key in series, f"{key} is not logged"
    for key, values in series.items():  # everything the CSV files hold, the same values
        assert run.values(key) == pytest.approx(values, rel=1e-12), key
    assert sorted(series["valid/perplexity"]) == [EVAL_EVERY, STEPS]
    for row in run.history:
        if row["_step"] in (EVAL_EVERY, STEPS):
            image = row["moe/expert_load"]
            assert image["_type"] == "image-file" and image["format"] == "png"
            assert (files_dir(run, tracked_run) / image["path"]).is_file()
        else:
            assert "moe/expert_load" not in row
    # The layer's balance figures agree with the tokens per expert the trainer records.
    loads = [yaml.safe_load(line) for line in
             (tracked_run / "expert_load.jsonl").read_text().splitlines()]
    counts = {record["step"]: np.array(record["layers"][0]) for record in loads}
    for step in logged:
        cv = counts[step].std() / counts[step].mean()
        assert run.values("moe0/cv_load")[step] == pytest.approx(cv, rel=1e-6)
        # An expert idle over the window is idle at its last step.
        assert 0 <= run.values("moe0/dead_experts")[step] <= int((counts[step] == 0).sum())
    # Model FLOP/s: 2 x the multiply-adds per token (3 x the forward's: the planner's count)
    # x tokens/s.
    flops = run.values("train/model_flops_per_second")
    tokens = run.values("train/tokens_per_second")
    ratio = {s: flops[s] / tokens[s] for s in logged}
    assert len({round(r, 6) for r in ratio.values()}) == 1
    assert run.summary["steps"] == STEPS
    assert run.summary["valid/perplexity"] == pytest.approx(series["valid/perplexity"][STEPS])


def test_dead_experts_are_those_without_a_token_over_the_whole_window():
    from sparse_moe.train.tracking import ExpertWindow

    rng = np.random.default_rng(0)
    steps = [[list(rng.integers(0, 3, size=6) * rng.integers(0, 2, size=6)) for _ in range(2)]
             for _ in range(5)]
    window = ExpertWindow(since=10)
    for counts in steps:
        window.add(counts)
    for layer in range(2):
        idle = sum(all(step[layer][e] == 0 for step in steps) for e in range(6))
        assert window.dead_experts()[f"moe{layer}/dead_experts"] == idle
    assert window.counts == [list(np.sum([s[i] for s in steps], axis=0)) for i in range(2)]


def files_dir(run, run_dir: Path) -> Path:
    return offline_run_files(run_dir)[0].parent / "files"


def test_tensorboard_reads_the_same_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    series = _csv_series(tracked_run)
    assert set(series) <= set(events.Tags()["scalars"])
    for key, values in series.items():
        got = {e.step: e.value for e in events.Scalars(key)}
        # TensorBoard stores float32: each value is the float32 nearest the logged one.
        assert got == {s: float(np.float32(v)) for s, v in values.items()}, key
    assert "moe/expert_load" in events.Tags()["images"]
    assert [e.step for e in events.Images("moe/expert_load")] == [EVAL_EVERY, STEPS]


def _print_config(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sparse_moe.train", "--print-config", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_print_config_shows_the_resolved_model_and_loads_back_as_the_same_model(wt_corpus,
                                                                                 tmp_path):
    from sparse_moe.train.config import load_train_config
    from sparse_moe.train.tasks import resolve_model_config

    args = [f"data.corpus={wt_corpus['corpus']}", "model.preset=configs/models/debug-moe.yaml",
            "model.overrides={d_model: 48, dropout: 0.1}"]
    printed = _print_config(*args)
    assert printed.startswith("# model: model YAML configs/models/debug-moe.yaml")
    values = yaml.safe_load(printed)
    model = values["model"]["overrides"]
    assert model["d_model"] == 48 and model["dropout"] == 0.1
    assert model["layers"][1]["moe"]["num_experts"] == 8  # from the YAML, not the overrides
    vocab = yaml.safe_load((Path(wt_corpus["corpus"]) / "manifest.json").read_text())[
        "tokenizer"]["vocab_size"]
    assert model["vocab_size"] == vocab
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    original = resolve_model_config(load_train_config(None, args), vocab)
    reloaded = resolve_model_config(load_train_config(saved), vocab)
    assert reloaded == original
    # Without a corpus the preset's vocabulary is used, and the header says so.
    printed = _print_config("data.corpus=no-such-corpus", "model.preset=debug-moe")
    assert "vocab_size=256 (from preset debug-moe)" in printed.splitlines()[0]


def test_plan_prints_the_same_resolved_config(wt_corpus):
    args = [f"data.corpus={wt_corpus['corpus']}", "model.preset=debug-moe-h"]
    done = subprocess.run([sys.executable, "-m", "sparse_moe.plan.cli", "--print-config", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == _print_config(*args)


def test_a_deepspeed_json_that_enables_its_own_wandb_monitor_is_refused(tmp_path):
    import json

    from sparse_moe.config_io import ConfigError
    from sparse_moe.train.config import load_train_config
    from sparse_moe.train.ds_config import build_ds_config

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                   "wandb": {"enabled": True, "project": "x"}}))
    config = load_train_config(None, ["data.corpus=c", f"deepspeed.config={ds_json}"])
    with pytest.raises(ConfigError, match=r"ds\.json: wandb\.enabled is set in the DeepSpeed "
                                          r"JSON; the trainer drives W&B"):
        build_ds_config(config, 1, tmp_path / "run")
    ds = build_ds_config(load_train_config(None, ["data.corpus=c"]), 1, tmp_path / "run")
    assert "wandb" not in ds and ds["csv_monitor"]["enabled"] is True
