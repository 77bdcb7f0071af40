"""Bad training configurations fail before any model is built, naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_moe.config_io import ConfigError, apply_overrides
from sparse_moe.train.config import load_train_config
from sparse_moe.train.ds_config import build_ds_config
from tests.train.conftest import run_training


def test_overrides_parse_yaml_scalars_and_nest():
    values = apply_overrides({"run": {"steps": 3}}, ["run.steps=10", "optimizer.lr=3e-4",
                                                      "run.resume=true", "model.overrides={dropout: 0.2}"])
    assert values == {"run": {"steps": 10, "resume": True}, "optimizer": {"lr": 3e-4},
                      "model": {"overrides": {"dropout": 0.2}}}
    with pytest.raises(ConfigError, match="expected the form section.field=value"):
        apply_overrides({}, ["run.steps"])


def test_unknown_field_names_file_and_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {corpus: x}\nrun: {stpes: 10}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml\.run: unknown RunConfig field\(s\) \['stpes'\]"):
        load_train_config(path)


def test_missing_corpus_and_bad_values():
    with pytest.raises(ConfigError, match="expected a 'data' section"):
        load_train_config(None, ["run.steps=3"])
    with pytest.raises(ConfigError, match=r"RunConfig\.steps: expected a positive integer, found 0"):
        load_train_config(None, ["data.corpus=x", "run.steps=0"])
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: expected one of"):
        load_train_config(None, ["data.corpus=x", "deepspeed.precision=fp8"])
    with pytest.raises(ConfigError, match=r"OptimizerConfig\.name: expected one of"):
        load_train_config(None, ["data.corpus=x", "optimizer.name=sgd"])


def test_batch_identity_is_checked(tmp_path):
    config = load_train_config(None, ["data.corpus=x", "data.micro_batch_size=4",
                                      "deepspeed.gradient_accumulation_steps=2",
                                      "deepspeed.train_batch_size=20"])
    with pytest.raises(ConfigError, match=r"expected micro batch 4 x gradient accumulation 2 x "
                                          r"data-parallel size 2 = 16, found 20"):
        build_ds_config(config, data_parallel_size=2, run_dir=tmp_path)
    ok = load_train_config(None, ["data.corpus=x", "data.micro_batch_size=4",
                                  "deepspeed.gradient_accumulation_steps=2"])
    assert build_ds_config(ok, 2, tmp_path)["train_batch_size"] == 16


def test_batch_sizes_in_the_deepspeed_json_are_refused(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 64}))
    config = load_train_config(None, ["data.corpus=x", f"deepspeed.config={ds_json}"])
    with pytest.raises(ConfigError, match=r"ds\.json: train_batch_size=64 is set in the DeepSpeed "
                                          r"JSON; batch sizes belong to the training config"):
        build_ds_config(config, 1, tmp_path)


def test_vocabulary_mismatch_with_the_corpus_fails_clearly(wt_corpus, tmp_path):
    from data_prep.cli import main as data_prep

    other = tmp_path / "other"
    assert data_prep(["tokenizer", "-i", f"{wt_corpus['root']}/valid.txt", "--model-prefix",
                      str(other), "--vocab-size", "300"]) == 0
    proc = run_training([f"data.corpus={wt_corpus['corpus']}", f"data.tokenizer={other}.model",
                         f"run.dir={tmp_path / 'run'}", "run.steps=1"], check=False)
    assert proc.returncode != 0
    assert "corpus was encoded with tokenizer" in proc.stderr and "other.model" in proc.stderr


def test_command_line_reports_config_errors_with_exit_code_2(tmp_path):
    proc = run_training(["data.corpus=x", "run.stpes=3"], check=False)
    assert proc.returncode == 2
    assert "configuration error: command line.run: unknown RunConfig field(s) ['stpes']" in proc.stderr


def test_help_lists_every_section_and_field_with_type_default_and_doc(capsys):
    import dataclasses
    import typing

    from sparse_moe.config_io import field_docs
    from sparse_moe.train.cli import parse_args
    from sparse_moe.train.config import TrainConfig

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        docs = field_docs(cls)
        for item in dataclasses.fields(cls):
            assert f"  {section.name}.{item.name}: " in shown, f"{section.name}.{item.name}"
            assert item.name in docs, f"{cls.__name__}.{item.name} has no documentation"
    assert "  run.steps: int = 100\n      optimizer steps to train to" in shown
    assert "  model.overrides.d_model: int = 512" in shown
    assert "  num_experts: int (required)" in shown  # the MoE fields
    assert "lm_debug.yaml" not in shown and "lm_moe256.yaml" not in shown


def test_print_config_prints_the_effective_yaml_and_trains_nothing(tmp_path, capsys):
    import yaml

    from sparse_moe.train.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("run:\n  steps: 7\nmodel:\n  preset: moe-32\n")
    assert main(["--config", str(config), "--print-config", "data.corpus=corpora/x",
                 "optimizer.lr=3e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["steps"] == 7 and printed["run"]["seed"] == 1234  # a default
    assert printed["model"]["preset"] == "moe-32" and printed["optimizer"]["lr"] == 3e-4
    assert printed["data"]["corpus"] == "corpora/x"
    assert not (tmp_path / "runs").exists()


def test_model_preset_may_be_the_path_of_a_model_yaml(tmp_path):
    """A user's own model without Python: a copy of configs/models/debug-moe.yaml, changed."""
    from sparse_moe.train.tasks import base_model_config, resolve_model_config

    repo_yaml = Path(__file__).resolve().parents[2] / "configs" / "models" / "debug-moe.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text(repo_yaml.read_text().replace("num_experts: 8", "num_experts: 12"))
    config = load_train_config(None, [f"model.preset={mine}", "data.corpus=c",
                                      "model.overrides.d_model=48"])
    model = resolve_model_config(config, vocab_size=300)
    assert model.vocab_size == 300 and model.d_model == 48
    assert model.layers[1].moe["num_experts"] == 12
    with pytest.raises(ConfigError, match=r"model.preset: expected a model YAML file .*found no "
                                          r"file .*nope\.yaml"):
        base_model_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"model.preset: expected one of .* or the path of a "
                                          r"model YAML, found 'moe-33'"):
        base_model_config("moe-33")
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: lm\nvocab_size: 10\nlayers: [{kind: lstm, hidden_size: eight}]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.layers\[0\]\.hidden_size: expected an "
                                          r"integer, found 'eight'"):
        base_model_config(str(bad))


def test_auto_accumulation_keeps_the_global_batch_on_any_world(tmp_path):
    config = load_train_config(None, ["data.corpus=c", "data.micro_batch_size=4",
                                      "deepspeed.train_batch_size=32",
                                      "deepspeed.gradient_accumulation_steps=auto"])
    for world, accumulation in ((1, 8), (2, 4), (8, 1)):
        ds = build_ds_config(config, world, tmp_path)
        assert ds["gradient_accumulation_steps"] == accumulation
        assert ds["train_batch_size"] == 32
    with pytest.raises(ConfigError, match=r"train_batch_size \(32\) to be a multiple of "
                                          r"data.micro_batch_size \(4\) x 3 processes = 12"):
        build_ds_config(config, 3, tmp_path)
    with pytest.raises(ConfigError, match="auto needs deepspeed.train_batch_size"):
        load_train_config(None, ["data.corpus=c", "deepspeed.gradient_accumulation_steps=auto"])
