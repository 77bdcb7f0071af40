"""The configuration a run actually uses, written out in full.

A run's config names a model by preset (or model YAML) plus overrides; what gets built is the
preset's every field at the corpus's vocabulary with the overrides applied. ``--print-config``,
``sparse-moe-plan --print-config`` and the W&B run's configuration show that resolved model:
``model.overrides`` holds every field of it, so the printed YAML, loaded back as a config,
builds the same model whatever the preset becomes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sparse_moe.config_io import to_dict
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.tasks import base_model_config, resolve_model_config


def corpus_vocabulary(config: TrainConfig, vocab_size: int | None = None) -> tuple[int, str]:
    """The vocabulary size a model is built at, and where it came from: ``vocab_size`` when
    given, else the corpus manifest when it exists, else the preset's own."""
    from sparse_moe.data.corpus import MANIFEST_NAME, load_manifest

    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    corpus = Path(config.data.corpus)
    if (corpus / MANIFEST_NAME).is_file():
        return int(load_manifest(corpus)["tokenizer"]["vocab_size"]), f"{corpus / MANIFEST_NAME}"
    return base_model_config(config.model.preset).vocab_size, f"preset {config.model.preset}"


def run_model_config(config: TrainConfig) -> Any:
    """The model exactly as a run builds it (a translation model's special ids come from its
    corpus and tokenizer), or None when the corpus or tokenizer cannot be read."""
    from sparse_moe.data import CorpusError, TokenizerError, load_tokenizer, open_corpus
    from sparse_moe.train.tasks import make_task

    try:
        tokenizer = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
        corpus = open_corpus(config.data.corpus, tokenizer=tokenizer)
        return make_task(config, corpus, tokenizer, rank=0, world=1).model_config()
    except (CorpusError, TokenizerError, OSError):
        return None


def resolved_model_section(config: TrainConfig, model_config: Any) -> dict[str, Any]:
    """``model``: the preset it came from and every field of the built model as overrides."""
    fields = model_config.to_dict()
    fields.pop("activation_checkpointing", None)  # the section's own field says it
    return {"preset": config.model.preset, "overrides": fields,
            "activation_checkpointing": config.model.activation_checkpointing}


def resolved_config_dict(config: TrainConfig, model_config: Any) -> dict[str, Any]:
    """Every section of ``config`` with the model resolved (see the module docstring)."""
    values = to_dict(config)
    values["model"] = resolved_model_section(config, model_config)
    return values


def printable_config(config: TrainConfig, vocab_size: int | None = None) -> str:
    """The YAML ``--print-config`` prints: a comment saying where the model came from, then
    every section with the resolved model."""
    vocabulary, source = corpus_vocabulary(config, vocab_size)
    model_config = run_model_config(config) if source.endswith("manifest.json") else None
    model_config = model_config or resolve_model_config(config, vocabulary)
    kind = "preset" if Path(config.model.preset).suffix not in (".yaml", ".yml") else "model YAML"
    header = (f"# model: {kind} {config.model.preset} with model.overrides applied, resolved at "
              f"vocab_size={vocabulary} (from {source}); every field below is what a run builds\n")
    return header + yaml.safe_dump(resolved_config_dict(config, model_config), sort_keys=False)
