"""The paper's models: the MoE-LSTM language model, its dense baselines, the GNMT-style
translation model, their budgets (ops per time step, parameters) and decoding."""

from sparse_moe.models.budget import Budget, count_budget, preset_budget
from sparse_moe.models.config import LayerConfig, LMConfig, TranslationConfig, load_model_config
from sparse_moe.models.decoding import Hypothesis, beam_search, greedy_decode, sample_lm, sample_text
from sparse_moe.models.layers import ModelOutput, MoEFactory, build_full_moe
from sparse_moe.models.lm import MoELSTMLanguageModel
from sparse_moe.models.loss import LossParts, compose_loss, perplexity
from sparse_moe.models.presets import (
    LM_PRESETS,
    PAPER_LM_TABLE,
    TRANSLATION_PRESETS,
    lm_preset,
    translation_preset,
)
from sparse_moe.models.translation import MoETranslationModel


def build_model(config: LMConfig | TranslationConfig, moe_factory: MoEFactory = build_full_moe
                ) -> MoELSTMLanguageModel | MoETranslationModel:
    """The model a config describes; ``moe_factory`` builds its MoE layers (all experts by
    default; ``sparse_moe.parallel.parallelize`` builds one rank's share)."""
    if isinstance(config, TranslationConfig):
        return MoETranslationModel(config, moe_factory)
    return MoELSTMLanguageModel(config, moe_factory)


__all__ = [
    "Budget", "count_budget", "preset_budget", "LayerConfig", "LMConfig", "TranslationConfig",
    "load_model_config", "Hypothesis", "beam_search", "greedy_decode", "sample_lm",
    "sample_text",
    "ModelOutput", "MoELSTMLanguageModel", "LossParts", "compose_loss", "perplexity",
    "LM_PRESETS", "PAPER_LM_TABLE", "TRANSLATION_PRESETS", "lm_preset", "translation_preset",
    "MoETranslationModel", "build_model", "MoEFactory", "build_full_moe",
]
