"""``parallelize``: every preset at its paper layout, initialisation independent of the
layout, and start-up that allocates this rank's experts only.

References: the per-expert parameter count written out from the paper's expert shape
(``d_model x d_hidden + d_hidden x d_out``), the paper's Tables 7 and 8, a single-process
(``ep_size=1``) build, and the process's own memory counters.
"""

from __future__ import annotations

import pytest
import torch

from sparse_moe.models import LM_PRESETS, TRANSLATION_PRESETS, build_model
from sparse_moe.models.presets import PAPER_GPUS, paper_layout, preset_config
from sparse_moe.parallel import (
    ExpertLayout,
    ExpertParallelConfig,
    expert_parallel_layers,
    moe_configs,
    parallelize,
    rank_parameter_count,
)
from tests.parallel.harness import run_distributed
from tests.parallel.parallelize_workers import built_shard_worker, startup_memory_worker

# Parameters excluding embedding and softmax, in millions: Table 7 (1B words) and, for the
# 100B-word family, Table 8 (17.2B, 68.8B and 137.6B).
PAPER_PARAMS_M = {
    "4xlstm-512": 8.4, "lstm-2048-512": 9.4, "moe-1-wide": 8.4, "moe-1-deep": 8.4,
    "moe-4": 8.4, "moe-32": 37.8, "moe-256": 272.9, "moe-256-h": 272.9, "moe-1024-h": 1079.0,
    "moe-4096-h": 4303.4, "moe-16384-h": 17_200.0, "moe-65536-h": 68_800.0,
    "moe-131072-h": 137_600.0,
}
# Ops per time step (millions) of the 100B-word family, Table 8.
PAPER_100B_OPS_M = {"moe-16384-h": 8.8, "moe-65536-h": 9.2, "moe-131072-h": 9.7}


def _one_expert(config) -> int:
    dims = [config.d_model] + [config.d_hidden] * config.expert_hidden_layers + [config.d_out]
    weights = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return weights + (sum(dims[1:]) if config.expert_bias else 0)


def _layout(name: str) -> int:
    """The paper's expert-parallel size, or for the CPU presets up to 4 ranks."""
    if name in PAPER_GPUS:
        return paper_layout(name)[1]
    units = [c.num_groups or c.num_experts for c in moe_configs(preset_config(name))]
    return min([4, *units]) if units else 1


def _embedding_and_softmax(model: torch.nn.Module) -> int:
    unique = {id(p): p.numel() for name in ("embedding", "output")
              for p in getattr(model, name).parameters()}  # tied weights once
    return sum(unique.values())


@pytest.mark.parametrize("name", sorted(LM_PRESETS) + sorted(TRANSLATION_PRESETS))
def test_every_preset_builds_at_its_layout_with_its_share_of_the_experts(name):
    config = preset_config(name)
    ep = _layout(name)
    experts_total = sum(c.num_experts * _one_expert(c) for c in moe_configs(config))
    full = rank_parameter_count(parallelize(config, ExpertParallelConfig(ep_size=1),
                                            ExpertLayout(1), seed=1, device="meta"))
    assert full["experts"] == experts_total
    for rank in sorted({0, ep - 1}):
        model = parallelize(config, ExpertParallelConfig(ep_size=ep), ExpertLayout(ep, rank),
                            seed=1, device="meta")
        counts = rank_parameter_count(model)
        assert counts == {"dense": full["dense"], "experts": experts_total // ep}, (name, rank)
        firsts = [layer.experts.first_expert for layer in expert_parallel_layers(model)]
        assert firsts == [rank * c.num_experts // ep for c in moe_configs(config)]
    if name in PAPER_PARAMS_M:
        with torch.device("meta"):
            plain = build_model(config)
        outside = full["dense"] - _embedding_and_softmax(plain) + experts_total
        # The paper counts weight matrices; biases add up to 0.6% (LSTM-2048-512's).
        assert outside / 1e6 == pytest.approx(PAPER_PARAMS_M[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(PAPER_100B_OPS_M))
def test_the_100b_word_family_matches_table_8(name):
    from sparse_moe.models import preset_budget

    budget = preset_budget(name)
    assert budget.ops_per_timestep / 1e6 == pytest.approx(PAPER_100B_OPS_M[name], abs=0.051)
    assert budget.matrix_params / 1e6 == pytest.approx(PAPER_PARAMS_M[name], rel=0.005)
    gpus, ep = paper_layout(name)
    assert (gpus, ep) == {"moe-16384-h": (32, 32), "moe-65536-h": (64, 64),
                          "moe-131072-h": (128, 128)}[name]


SEED = 4321


def _gathered(name: str, ep: int, vocab: int = 50):
    """Experts of every rank of an ``ep`` build, concatenated; and each rank's dense weights."""
    config = preset_config(name, vocab)
    experts, dense = None, []
    for rank in range(ep):
        model = parallelize(config, ExpertParallelConfig(ep_size=ep), ExpertLayout(ep, rank),
                            seed=SEED)
        mine = [[p.detach() for p in layer.experts.parameters()]
                for layer in expert_parallel_layers(model)]
        experts = mine if experts is None else [
            [torch.cat([a, b]) for a, b in zip(have, new)] for have, new in zip(experts, mine)]
        dense.append({n: p.detach() for n, p in model.named_parameters()
                      if getattr(p, "allreduce", True) is not False})
    return experts, dense


@pytest.mark.parametrize("name,ep", [("debug-moe", 4), ("debug-moe-h", 4), ("debug-moe-h", 2),
                                     ("debug-translation", 4)])
def test_an_expert_parallel_build_gathered_equals_a_single_process_build(name, ep):
    reference_experts, (reference_dense,) = _gathered(name, 1)
    experts, dense = _gathered(name, ep)
    for layer, (mine, ref) in enumerate(zip(experts, reference_experts)):
        for a, b in zip(mine, ref):
            assert torch.equal(a, b), f"{name} layer {layer}: experts differ at ep_size={ep}"
    for rank, weights in enumerate(dense):
        assert weights.keys() == reference_dense.keys()
        for key, value in weights.items():
            assert torch.equal(value, reference_dense[key]), f"rank {rank}: {key}"
    # and the seed matters: another run seed gives other experts
    other = parallelize(preset_config(name, 50), ExpertParallelConfig(ep_size=1),
                        ExpertLayout(1), seed=1)
    first = next(expert_parallel_layers(other)[0].experts.parameters())
    assert not torch.equal(first, reference_experts[0][0])


@pytest.mark.timeout(180)
def test_ranks_on_real_process_groups_build_the_single_process_experts():
    results = run_distributed(built_shard_worker, 2, "debug-moe-h", 2, SEED, timeout=150)
    reference, (dense,) = _gathered("debug-moe-h", 1)
    for rank, result in enumerate(results):
        assert result["finite"]
        assert result["first"] == [rank * 8]
        for mine, ref in zip(result["experts"][0], reference[0]):
            assert torch.equal(mine, ref[rank * 8:(rank + 1) * 8]), f"rank {rank}"
        for key, value in result["dense"].items():
            assert torch.equal(value, dense[key]), f"rank {rank}: {key}"


def test_a_layout_that_splits_a_group_fails_before_building():
    config = preset_config("debug-moe-h")  # 16 experts in 4 groups
    with pytest.raises(ValueError, match=r"MoE layer 0.*num_groups=4.*found 8"):
        parallelize(config, ExpertParallelConfig(ep_size=8), ExpertLayout(8), seed=1,
                    device="meta")
    with pytest.raises(ValueError, match="expected 2 \\(the groups' size\\), found 4"):
        parallelize(config, ExpertParallelConfig(ep_size=4), ExpertLayout(2), seed=1)


def test_a_planning_build_refuses_to_run():
    model = parallelize(preset_config("debug-moe", 50), ExpertParallelConfig(ep_size=2),
                        ExpertLayout(2, 1), seed=1)
    with pytest.raises(RuntimeError, match="built for an ExpertLayout"):
        model(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.timeout(240)
def test_startup_allocates_only_this_ranks_experts():
    """MoE-256-h at ep_size=2: each rank's start-up grows host memory by its share (half the
    experts, 512 MiB, and the dense part), not by the whole layer (1 GiB)."""
    results = run_distributed(startup_memory_worker, 2, "moe-256-h", 1000, timeout=200)
    whole_layer = 256 * 2 * 512 * 1024 * 4 / 2**20
    for rank, result in enumerate(results):
        assert result["expert_mib"] == pytest.approx(whole_layer / 2)
        grown = result["peak"] - result["before"]
        share = result["expert_mib"] + result["dense_mib"]
        assert share <= grown + 16, f"rank {rank}: {grown:.0f} MiB grown for {share:.0f} MiB held"
        assert grown <= 1.1 * share, (f"rank {rank}: start-up grew host memory by {grown:.0f} "
                                      f"MiB for a share of {share:.0f} MiB (the whole layer is "
                                      f"{whole_layer:.0f} MiB)")
