"""``sparse-moe-plan``: its counts against the real model and optimizer, its command line.

The references are independent of the planner's arithmetic: the parameters of the rank's
model as ``parallelize`` builds it for real, the state the real ``FactoredAdam`` allocates
for them, and the expert count written out from the preset (MoE-1024-h's 1024 experts of
512 x 1024 + 1024 x 512). Measured peaks are compared in ``tests/train/test_plan_vs_run.py``.
"""

from __future__ import annotations

import json

import pytest

from sparse_moe.parallel import ExpertLayout, ExpertParallelConfig, parallelize, rank_parameter_count
from sparse_moe.plan.cli import load_config, main, parse_size
from sparse_moe.plan.planner import plan_run
from sparse_moe.train.tasks import resolve_model_config


def _plan(*overrides: str, world: int, vocab: int = 1000, device: str = "cpu", memory=None):
    config = load_config(None, list(overrides))
    return plan_run(config, resolve_model_config(config, vocab), world, device, memory)


def test_a_rank_of_moe_1024_h_at_ep4_holds_a_quarter_of_the_experts():
    plan = _plan("model.preset=moe-1024-h", "parallel.ep_size=4", world=4)
    assert plan.params_detail["experts"] == 1024 * (512 * 1024 + 1024 * 512) // 4
    bytes_ = plan.bytes_per_rank
    assert bytes_["parameters"] == bytes_["gradients"] == 4 * plan.params_per_rank
    step = sum(v for k, v in bytes_.items() if k not in ("total", "checkpoint_save"))
    assert bytes_["total"] == max(step, bytes_["checkpoint_save"])
    assert plan.peak_phase == "training step"
    # saving: parameters, optimizer, one copy of the experts (no gradients), the framework
    assert bytes_["checkpoint_save"] == (bytes_["parameters"] + bytes_["optimizer"]
                                         + 4 * plan.params_detail["experts"]
                                         + bytes_["framework"])
    # DeepSpeed flattens the 268M expert gradients into one all-reduce bucket.
    assert bytes_["buffers"] == 4 * plan.params_detail["experts"]


@pytest.mark.parametrize("preset,ep", [("debug-moe", 2), ("debug-moe-h", 4),
                                       ("debug-translation", 2)])
def test_counts_equal_the_real_rank_model_and_its_optimizer_state(preset, ep):
    from sparse_moe.optim import FactoredAdam, optimizer_state_numel

    config = load_config(None, [f"model.preset={preset}", f"parallel.ep_size={ep}"])
    model_config = resolve_model_config(config, 64)
    plan = plan_run(config, model_config, 2 * ep, "cpu")
    model = parallelize(model_config, ExpertParallelConfig(ep_size=ep), ExpertLayout(ep, 1),
                        seed=3)
    real = rank_parameter_count(model)
    assert plan.params_detail == real
    optimizer = FactoredAdam(model.parameters())
    optimizer.initialize_state()
    assert plan.bytes_per_rank["optimizer"] == 4 * optimizer_state_numel(optimizer)


def test_half_precision_and_zero_partition_what_the_regime_says(tmp_path):
    fp32 = _plan("model.preset=moe-32", "parallel.ep_size=4", world=8)
    # bf16 without ZeRO and with bf16 gradient accumulation: a JSON that asks for it.
    bf16_zero0 = tmp_path / "bf16_zero0.json"
    bf16_zero0.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 0}}')
    bf16 = _plan("model.preset=moe-32", "parallel.ep_size=4", f"deepspeed.config={bf16_zero0}",
                 world=8)
    zero1 = _plan("model.preset=moe-32", "parallel.ep_size=4",
                  "deepspeed.config=ds_configs/zero1_bf16.json", world=8)
    # deepspeed.precision=bf16 on the fp32 JSON keeps fp32 accumulation: zero1_bf16's regime.
    overridden = _plan("model.preset=moe-32", "parallel.ep_size=4",
                       "deepspeed.config=ds_configs/cpu_fp32.json", "deepspeed.precision=bf16",
                       world=8)
    count = fp32.params_per_rank
    assert bf16.bytes_per_rank["parameters"] == 2 * count
    assert bf16.regime["optimizer_wrapper"] == "fp16_optimizer"
    assert zero1.regime["optimizer_wrapper"] == "bf16_optimizer"
    assert overridden.regime == zero1.regime
    # ZeRO-1 splits the fp32 masters: dense over 8 ranks, experts over 2. FactoredAdam's
    # moments on the partitions are rows + columns per matrix, well under one per element.
    shard = fp32.params_detail["dense"] / 8 + fp32.params_detail["experts"] / 2
    masters = 4 * shard
    assert masters < zero1.bytes_per_rank["optimizer"] < masters + 4 * 0.05 * shard
    # bf16 without ZeRO: fp32 copies in the parameters' shapes, the same factored moments.
    assert bf16.bytes_per_rank["optimizer"] == 4 * count + fp32.bytes_per_rank["optimizer"]


def test_the_sampled_softmax_keeps_candidates_not_the_vocabulary():
    full = _plan("model.preset=moe-32", world=1, vocab=793_471)
    sampled = _plan("model.preset=moe-32", "model.overrides.softmax.kind=sampled",
                    "model.overrides.softmax.num_samples=8192", world=1, vocab=793_471)
    assert any("sampled softmax" in note for note in full.notes) and not sampled.notes
    tokens = full.tokens_per_micro_batch
    saved = full.activations["without_checkpointing"] - sampled.activations["without_checkpointing"]
    # logits, log-probabilities and their gradients over 793,471 - 8,193 fewer columns (fp32),
    # less the gathered candidate and target rows and the accidental-hit mask
    expected = tokens * (793_471 - 8_193) * 12 - (8_192 + tokens) * 512 * 4 - tokens * 8_192
    assert saved == expected
    assert sampled.multiply_adds_per_step < full.multiply_adds_per_step


def test_activation_checkpointing_keeps_less_and_more_tokens_keep_more():
    small = _plan("model.preset=moe-32", "data.micro_batch_size=8", "data.seq_len=20",
                  world=1)
    large = _plan("model.preset=moe-32", "data.micro_batch_size=32", "data.seq_len=20",
                  world=1)
    assert large.activations["without_checkpointing"] == pytest.approx(
        4 * small.activations["without_checkpointing"], rel=0.01)
    assert large.activations["with_checkpointing"] < large.activations["without_checkpointing"]
    checkpointed = _plan("model.preset=moe-32", "model.activation_checkpointing=true",
                         world=1)
    assert checkpointed.bytes_per_rank["activations"] == \
        checkpointed.activations["with_checkpointing"]


def test_all_to_all_and_work_scale_with_the_layout():
    one = _plan("model.preset=moe-32", "parallel.ep_size=1", world=4)
    four = _plan("model.preset=moe-32", "parallel.ep_size=4", world=4)
    assert one.all_to_all_bytes_per_step == 0
    # 3/4 of 4 rows a token leave the rank, forward and backward, out and back: 4 x 3/4 x 2 x 2
    tokens = four.tokens_per_micro_batch
    assert four.all_to_all_bytes_per_step == int(tokens * 4 * 3 / 4 * 2 * (512 + 512) * 4)
    assert one.multiply_adds_per_step == four.multiply_adds_per_step


def test_json_and_fit_on_the_command_line(capsys):
    assert main(["model.preset=moe-1024-h", "parallel.ep_size=4", "--world", "4",
                 "--vocab-size", "1000", "--device-memory", "80GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["bytes_per_rank"]) >= {"parameters", "gradients", "optimizer",
                                           "activations", "total"}
    assert plan["fits"] is True and plan["params_per_rank"] > 2.6e8
    assert main(["model.preset=moe-1024-h", "parallel.ep_size=4", "--world", "4",
                 "--vocab-size", "1000", "--device-memory", "2GiB"]) == 1
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out and "--device-memory" in captured.err


@pytest.mark.parametrize("text,size", [("80GiB", 80 * 2**30), ("12GB", 12 * 10**9),
                                       ("512 MiB", 512 * 2**20), ("1000", 1000),
                                       ("1.5GiB", 3 * 2**29)])
def test_sizes(text, size):
    assert parse_size(text) == size
