"""The scaling sweep's configurations: valid, compute-matched, and read alike by the Slurm array.

The sweep itself takes hours; these checks make sure that every line of ``sweep.txt`` is a
run ``sparse-moe-train`` accepts, that the models it names really do the same work per time
step (against a hand count), and that ``slurm/sweep.sbatch`` picks the same lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparse_moe.models import LMConfig, lm_preset, preset_budget
from sparse_moe.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
SCALING = ROOT / "benchmarks" / "scaling"
sys.path.insert(0, str(SCALING))
from sweep import read_sweep  # noqa: E402

CONFIGURATIONS = read_sweep(SCALING / "sweep.txt")
TINY = read_sweep(SCALING / "sweep_tiny.txt")
# 4xLSTM-d: four LSTMs, four gates each, d x (d + d) weights per gate.
SWEEPS = {"main": (SCALING / "base.yaml", 128), "tiny": (SCALING / "base_tiny.yaml", 32)}
CASES = [("main", *c) for c in CONFIGURATIONS] + [("tiny", *c) for c in TINY]


def test_the_sweep_has_the_papers_family_and_ablation():
    names = [name for name, _ in CONFIGURATIONS]
    assert len(names) == len(set(names))
    for name in ("4xlstm-128", "lstm-512-128", "moe-1-wide", "moe-4", "moe-16", "moe-64",
                 "moe-256", "moe-64-h", "moe-256-h"):
        assert name in names
    weights = set()
    for _, overrides in CONFIGURATIONS:
        config = _train_config(overrides)
        if config.model.preset == "small-moe-64":
            moe = config.model.overrides.get("moe_overrides", {})
            weights.add((moe.get("w_importance", 0.1), moe.get("w_load", 0.1)))
    assert weights == {(0, 0), (0.1, 0), (0, 0.1), (0.1, 0.1)}


@pytest.mark.parametrize("sweep,name,overrides", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_every_configuration_loads_and_is_compute_matched(sweep, name, overrides):
    base_yaml, width = SWEEPS[sweep]
    config = _train_config(overrides, base_yaml)
    base = lm_preset(config.model.preset, 1000).to_dict()
    model = LMConfig.from_dict({**base, **config.model.overrides})  # validates moe_overrides
    assert model.d_model == width
    hand_count = 4 * 4 * width * (width + width)
    ops = preset_budget(config.model.preset, 1000).ops_per_timestep
    assert hand_count <= ops <= 1.13 * hand_count


def test_slurm_array_task_reads_the_same_line():
    """sweep.sbatch's own line selection (grep + sed + read), task by task."""
    sbatch = (ROOT / "slurm" / "sweep.sbatch").read_text()
    assert 'line=$(grep -v \'^\\s*\\(#\\|$\\)\' "$SWEEP_FILE" | sed -n "$((task + 1))p")' in sbatch
    assert 'read -r name sweep_overrides <<<"$line"' in sbatch
    script = ('line=$(grep -v \'^\\s*\\(#\\|$\\)\' "$1" | sed -n "$(($2 + 1))p"); '
              'read -r name overrides <<<"$line"; echo "$name|$overrides"')
    for task, (name, overrides) in enumerate(CONFIGURATIONS):
        out = subprocess.run(["bash", "-c", script, "sweep", str(SCALING / "sweep.txt"),
                              str(task)], capture_output=True, text=True, check=True).stdout
        got_name, got_overrides = out.strip().split("|")
        assert (got_name, got_overrides.split()) == (name, overrides)


def _train_config(overrides, base_yaml=SCALING / "base.yaml"):
    return load_train_config(base_yaml, [*overrides, "data.corpus=corpus"])


TRANSLATION = read_sweep(SCALING / "sweep_translation.txt")


def test_the_translation_study_is_compute_matched_against_a_hand_count():
    """Every configuration loads on base_translation.yaml; the dense model and the MoEs do the
    same multiply-adds per time step: LSTMs the same, and each MoE's k experts of hidden h
    against one expert of hidden k x h (2 x d x hidden per expert), gates aside."""
    from sparse_moe.models import count_budget
    from sparse_moe.models.budget import meta_model
    from sparse_moe.models.translation import MoETranslationModel
    from sparse_moe.train.tasks import base_model_config

    assert [name for name, _ in TRANSLATION] == ["gnmt-dense", "gnmt-moe-32", "gnmt-moe-32-topk",
                                                 "gnmt-moe-32-topk-w0.1"]
    ops = {}
    for name, overrides in TRANSLATION:
        config = _train_config(overrides, SCALING / "base_translation.yaml")
        model = base_model_config(str(ROOT / config.model.preset) if config.model.preset.endswith(
            ".yaml") else config.model.preset, 8000)
        ops[name] = count_budget(meta_model(MoETranslationModel, model)).ops_per_timestep
        moe = model.moe_config()
        expert_ops = 2 * moe.experts_per_token * model.d_model * moe.d_hidden
        assert expert_ops == 2 * 4 * 128 * 256  # both MoE layers: 4 x 256 hidden, or 1 x 1024
    # The gates, two MoE layers each: strict balancing one d x 32 matrix, noisy top-k a gate and
    # a noise matrix (d x 32 each, d x 1 for the dense model's single expert).
    assert ops["gnmt-moe-32"] - ops["gnmt-dense"] == 2 * (128 * 32 - 2 * 128 * 1)
    assert ops["gnmt-moe-32-topk"] - ops["gnmt-dense"] == 2 * (2 * 128 * 32 - 2 * 128 * 1)
    assert ops["gnmt-moe-32-topk"] < 1.01 * ops["gnmt-dense"]
    assert ops["gnmt-moe-32-topk-w0.1"] == ops["gnmt-moe-32-topk"]  # only the weights differ
    weights = base_model_config(str(SCALING / "gnmt-moe-32-topk-w0.1.yaml"), 8000).moe
    assert (weights["w_importance"], weights["w_load"]) == (0.1, 0.1)
