"""Every DeepSpeed JSON in ds_configs/, completed by the trainer, parsed by DeepSpeed itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from sparse_moe.config_io import ConfigError
from sparse_moe.train.config import load_train_config
from sparse_moe.train.ds_config import build_ds_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
# What each regime must turn on, read back from DeepSpeed's parsed config.
EXPECTED = {
    "cpu_fp32.json": {"stage": 0, "bf16": False, "fp16": False},
    "zero1_bf16.json": {"stage": 1, "bf16": True, "fp16": False},
    "zero2_bf16.json": {"stage": 2, "bf16": True, "fp16": False},
    "zero1_fp16.json": {"stage": 1, "bf16": False, "fp16": True},
}


def _train_config(json_path: Path, *extra: str):
    return load_train_config(None, ["data.corpus=unused", f"deepspeed.config={json_path}",
                                    "data.micro_batch_size=4",
                                    "deepspeed.gradient_accumulation_steps=3", *extra])


def test_every_json_is_listed_and_documented():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)
    readme = (REPO / "ds_configs" / "README.md").read_text()
    for path in CONFIGS:
        assert f"`{path.name}`" in readme, f"{path.name} is not documented in ds_configs/README.md"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_json_builds_and_deepspeed_parses_it(path: Path, tmp_path):
    raw = json.loads(path.read_text())
    batch_keys = {"train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps"}
    assert not batch_keys & set(raw), "batch sizes belong to the training config"
    assert raw["wall_clock_breakdown"] is False  # present, so that it is a one-word switch
    ds = build_ds_config(_train_config(path), data_parallel_size=1, run_dir=tmp_path)
    parsed = DeepSpeedConfig(ds)  # outside a process group: a world of one
    want = EXPECTED[path.name]
    assert parsed.zero_optimization_stage == want["stage"]
    assert parsed.bfloat16_config.enabled is want["bf16"]
    assert parsed.float16_config.enabled is want["fp16"]
    if want["fp16"]:
        assert parsed.float16_config.loss_scale == 0  # 0: dynamic loss scaling
    assert parsed.gradient_clipping == 1.0
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
            parsed.gradient_accumulation_steps) == (12, 4, 3)
    assert parsed.monitor_config.csv_monitor.enabled
    assert parsed.monitor_config.csv_monitor.output_path == str(tmp_path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_batch_identity_is_checked_for_every_json(path: Path, tmp_path):
    config = _train_config(path, "deepspeed.train_batch_size=16")
    with pytest.raises(ConfigError, match=r"micro batch 4 x gradient accumulation 3 x "
                                          r"data-parallel size 2 = 24, found 16"):
        build_ds_config(config, data_parallel_size=2, run_dir=tmp_path)
