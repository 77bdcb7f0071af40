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


def test_auto_picks_zero1_bf16_where_cuda_is_present_and_fp32_elsewhere(tmp_path, monkeypatch):
    import torch

    from sparse_moe.plan.memory import regime_of
    from sparse_moe.train.ds_config import describe_ds_choice, ds_json_path

    config = load_train_config(None, ["data.corpus=unused", "data.micro_batch_size=4"])
    assert config.deepspeed.config == "auto"  # the default
    for present, name, wrapper in ((True, "zero1_bf16.json", "bf16_optimizer"),
                                   (False, "cpu_fp32.json", "none")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda present=present: present)
        assert ds_json_path(config) == REPO / "ds_configs" / name
        ds = build_ds_config(config, data_parallel_size=1, run_dir=tmp_path)
        assert ds.get("bf16", {}).get("enabled", False) is present
        assert regime_of(ds).wrapper == wrapper
        DeepSpeedConfig(ds)
        assert describe_ds_choice(config, "cuda" if present else "cpu").startswith(
            f"deepspeed.config=auto: {name} (")
    # The trainer passes its own device; that wins over what this process sees.
    assert ds_json_path(config, "cuda").name == "zero1_bf16.json"


def test_bf16_override_keeps_fp32_gradient_accumulation(tmp_path):
    from sparse_moe.plan.memory import regime_of

    # On the fp32 JSON (ZeRO 0): raised to ZeRO-1 with fp32 accumulation, zero1_bf16's regime.
    cpu = REPO / "ds_configs" / "cpu_fp32.json"
    ds = build_ds_config(_train_config(cpu, "deepspeed.precision=bf16"), 1, tmp_path)
    parsed = DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and parsed.zero_optimization_stage == 1
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert regime_of(ds).wrapper == "bf16_optimizer"
    zero1 = build_ds_config(_train_config(REPO / "ds_configs" / "zero1_bf16.json"), 1, tmp_path)
    assert {k: ds[k] for k in ("bf16", "data_types")} == {k: zero1[k] for k in ("bf16", "data_types")}
    # ZeRO-2 stays ZeRO-2; fp16 drops the bf16 accumulation setting.
    zero2 = REPO / "ds_configs" / "zero2_bf16.json"
    ds = build_ds_config(_train_config(zero2, "deepspeed.precision=bf16"), 1, tmp_path)
    assert DeepSpeedConfig(ds).zero_optimization_stage == 2
    ds = build_ds_config(_train_config(zero2, "deepspeed.precision=fp16"), 1, tmp_path)
    assert "grad_accum_dtype" not in ds.get("data_types", {})
    assert DeepSpeedConfig(ds).float16_config.enabled
    with pytest.raises(ConfigError, match=r"deepspeed.precision=bf16 with deepspeed.zero_stage=0: "
                                          r"expected a ZeRO stage of 1 or 2"):
        build_ds_config(_train_config(cpu, "deepspeed.precision=bf16", "deepspeed.zero_stage=0"),
                        1, tmp_path)
