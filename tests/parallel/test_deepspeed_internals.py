"""What ``parallel/deepspeed_internals.py`` relies on, pinned against the installed DeepSpeed
(and PyTorch): a real engine with ZeRO-1 on one gloo rank, each private name used once, and
each result compared with what the public side says (the model's parameters, the files on
disk, the optimizer's groups). An upgrade that changes one of them fails here, by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("_deepspeed_internals_probe.py")


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("internals")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(PROBE), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FOUND ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[-1][len("FOUND "):])


def test_expert_parallel_groups_are_created_and_found_by_name(found):
    groups = found["groups"]
    assert groups["exists"] and not groups["absent"], "groups._get_expert_parallel_group_dict"
    assert groups["same"] == [True, True, True], (
        "groups._get_expert_parallel_group / _get_expert_data_parallel_group / "
        "_get_data_parallel_group return other groups than the ones created")


def test_zero_fragments_cover_the_partitions_and_the_model(found):
    zero = found["zero"]
    assert zero["partition_numel"] == zero["fragment_numel"] == zero["model_numel"], (
        "single_partition_of_fp32_groups / bit16_groups / param._hp_mapping", zero)
    assert zero["named"], "the wrapper's param_names"
    assert zero["group_size"] == 1, "real_dp_process_group"
    assert zero["client"], "the wrapper's .optimizer is no longer the client optimizer"
    assert zero["linked"], "_lazy_init_hp_params_optimizer_state is gone"
    assert zero["fp16_without_zero"] is False, "runtime.fp16 optimizer classes"


def test_zero_checkpoint_files_hold_the_partitions_by_parameter(found):
    saved = found["checkpoint"]
    assert saved["written"] == saved["on_disk"], (
        "checkpoint_engine.save no longer writes every file of save_checkpoint", saved)
    assert saved["dense_written"] == saved["dense_on_disk"] and saved["dense_written"], (
        "checkpoint_engine.save: a model without MoE layers is saved another way", saved)
    assert saved["masters_numel"] == saved["slices_numel"] == found["zero"]["model_numel"], (
        "optimizer_state_dict: single_partition_of_fp32_groups / param_slice_mappings", saved)
    assert saved["slice_names"], "param_slice_mappings is no longer keyed by parameter name"
    assert {"exp_avg", "exp_avg_sq"} <= set(saved["state_keys"]), (
        "base_optimizer_state['state'] of the partition", saved)


def test_engine_counters_csv_headers_and_lambda_lr_state(found):
    engine = found["engine"]
    assert engine["skipped_before"] == 0
    assert (engine["global_steps"], engine["global_samples"], engine["skipped"]) == (8, 72, 3), (
        "engine.global_steps / global_samples / skipped_steps", engine)
    assert engine["csv_monitor"], "DeepSpeed's monitor is off: csv_monitor not configured"
    assert found["csv"] == {"list": True, "after_write": True}, (
        "monitor.csv_monitor.filenames no longer lists the metrics with a header", found["csv"])
    assert all(found["lambda_lr"].values()), ("LambdaLR.state_dict per-group keys",
                                              found["lambda_lr"])


def test_jit_op_lookups(found):
    assert found["ops"] == {"compatible_is_bool": True, "build_dir": "extensions/probe_op"}, (
        "deepspeed.ops.__compatible_ops__ / cpp_extension._get_build_directory", found["ops"])
