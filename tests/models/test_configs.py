"""configs/models/*.yaml load into the same configs as the presets they are named after."""

from pathlib import Path

import pytest

from sparse_moe.models import (
    LM_PRESETS,
    TRANSLATION_PRESETS,
    LMConfig,
    build_model,
    lm_preset,
    load_model_config,
    translation_preset,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.mark.parametrize("name", sorted(LM_PRESETS) + sorted(TRANSLATION_PRESETS))
def test_yaml_equals_preset(name):
    """Generated from the presets (the one source), and loading back to the same config."""
    from sparse_moe.models.preset_files import YAML_COMMAND, preset_yaml

    path = CONFIG_DIR / f"{name}.yaml"
    assert path.read_text(encoding="utf-8") == preset_yaml(name), (
        f"{path} differs from the preset {name!r}; regenerate with {YAML_COMMAND}")
    loaded = load_model_config(path)
    preset = lm_preset(name) if name in LM_PRESETS else translation_preset(name)
    assert loaded == preset


def test_no_yaml_without_a_preset():
    names = {path.stem for path in CONFIG_DIR.glob("*.yaml")}
    assert names == set(LM_PRESETS) | set(TRANSLATION_PRESETS)


def test_yaml_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: lm\nvocab_size: 10\nlayers: [{kind: lstm, hidden_size: 4}]\n"
                   "dropuot: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown LMConfig field\(s\) \['dropuot'\]"):
        load_model_config(bad)
    bad.write_text("type: transformer\n")
    with pytest.raises(ValueError, match="field 'type'"):
        load_model_config(bad)


def test_debug_yaml_builds_a_model():
    config = load_model_config(CONFIG_DIR / "debug-moe.yaml")
    assert isinstance(config, LMConfig)
    assert len(build_model(config).moe_layers) == 1


@pytest.mark.parametrize("values,message", [
    ({"vocab_size": "ten"}, r"src\.vocab_size: expected an integer, found 'ten' \(str\)"),
    ({"vocab_size": 10, "layers": [{"kind": "lstm", "hidden_size": 8.5}]},
     r"src\.layers\[0\]\.hidden_size: expected an integer, found 8\.5"),
    ({"vocab_size": 10, "layers": [{"kind": "moe", "moe": {"d_hidden": 8, "num_experts": "8"}}]},
     r"LayerConfig\.moe\.num_experts: expected an integer, found '8' \(str\)"),
    ({"vocab_size": 10, "layers": [{"kind": "lstm", "hidden_size": 8}], "dropout": True},
     r"src\.dropout: expected a number, found True"),
])
def test_types_are_checked_at_every_level_of_a_model_config(values, message):
    """One validation path (config_io.from_dict) for the model, its layers and their MoEs."""
    with pytest.raises(ValueError, match=message):
        LMConfig.from_dict(values, source="src")
