"""Configuration of the MoE-LSTM models: one dataclass per component, loadable from YAML.

A language model is a stack of layers between an embedding and a softmax; each layer is an
LSTM (optionally projected), a MoE, or a dense feed-forward network. The paper's models and
their compute-matched dense baselines are all such stacks (see ``presets.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sparse_moe.config_io import from_dict
from sparse_moe.models.softmax import SoftmaxConfig
from sparse_moe.moe import MoEConfig

LAYER_KINDS = ("lstm", "moe", "ffn")


@dataclass
class LayerConfig:
    """One layer of a stack.

    ``lstm``: ``hidden_size`` units, projected to ``proj_size`` when set (LSTM-2048-512);
    ``moe``: the MoE layer of ``moe`` (its ``d_model`` is filled in from the model);
    ``ffn``: a dense ReLU network ``d -> hidden_size (x hidden_layers) -> d``, with the MoE's
    output sigmoid when ``output_sigmoid`` (MoE-1-Wide / MoE-1-Deep without a gate).
    """

    kind: str  # lstm, moe or ffn
    hidden_size: int = 0  # lstm: units; ffn: hidden width
    proj_size: int = 0  # lstm: projection of its output (0: none)
    hidden_layers: int = 1  # ffn: hidden layers
    output_sigmoid: bool = False  # ffn: a sigmoid on the output, as the MoE's
    bidirectional: bool = False  # lstm: both directions (translation encoders only)
    moe: dict[str, Any] | None = None  # moe: MoEConfig fields (d_model comes from the model)

    def __post_init__(self) -> None:
        _require(self.kind in LAYER_KINDS, "LayerConfig.kind", f"one of {LAYER_KINDS}", self.kind)
        if self.kind in ("lstm", "ffn"):
            _require(self.hidden_size >= 1, "LayerConfig.hidden_size",
                     f"a positive integer for a {self.kind} layer", self.hidden_size)
        _require(self.proj_size >= 0, "LayerConfig.proj_size", "0 (none) or a positive integer",
                 self.proj_size)
        _require(self.hidden_layers >= 1, "LayerConfig.hidden_layers", "a positive integer",
                 self.hidden_layers)
        if self.kind == "moe":
            _require(isinstance(self.moe, Mapping), "LayerConfig.moe",
                     "a mapping of MoEConfig fields for a moe layer", self.moe)

    def moe_config(self, d_model: int, overrides: Mapping[str, Any] | None = None,
                   **defaults: Any) -> MoEConfig:
        """The layer's MoEConfig: ``defaults`` under the layer's own fields, ``overrides`` over
        them, and ``d_model`` filled in."""
        values = {**defaults, **dict(self.moe or {}), **dict(overrides or {}),
                  "d_model": d_model}
        return MoEConfig.from_dict(values, source="LayerConfig.moe")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "LayerConfig") -> "LayerConfig":
        return _from_dict(cls, values, source)


@dataclass
class LMConfig:
    """The language model: embedding (``d_model``) -> layers -> softmax over ``vocab_size``.

    ``dropout`` applies to the embedding and every layer's output (not the softmax);
    ``residual`` adds each layer's input to its output where the sizes match.
    ``moe_overrides`` holds MoEConfig fields that replace every MoE layer's own (an ablation
    of a preset: ``model.overrides.moe_overrides.w_load=0``). ``softmax`` chooses the exact
    or the sampled softmax for training (``model.overrides.softmax.kind=sampled``).
    """

    vocab_size: int  # set from the corpus by the trainer
    d_model: int = 512  # embedding width (and of every layer with a residual)
    layers: list[LayerConfig] = field(default_factory=list)  # the stack, bottom to top
    dropout: float = 0.1  # on the embedding and every layer's output
    residual: bool = True  # add each layer's input to its output where the widths match
    tie_embeddings: bool = False  # the softmax shares the embedding matrix
    activation_checkpointing: bool = False  # set from model.activation_checkpointing
    pad_id: int | None = None  # positions with this id are not routed (None: every position)
    moe_overrides: dict[str, Any] = field(default_factory=dict)  # MoEConfig fields, all layers
    softmax: SoftmaxConfig = field(default_factory=SoftmaxConfig)  # full or sampled (training)

    def __post_init__(self) -> None:
        if isinstance(self.softmax, Mapping):
            self.softmax = SoftmaxConfig.from_dict(self.softmax, "LMConfig.softmax")
        self.layers = [_layer(layer, f"LMConfig.layers[{i}]")
                       for i, layer in enumerate(self.layers)]
        _require(isinstance(self.moe_overrides, Mapping), "LMConfig.moe_overrides",
                 "a mapping of MoEConfig fields", self.moe_overrides)
        _require(self.vocab_size >= 2, "LMConfig.vocab_size", "an integer >= 2", self.vocab_size)
        _require(self.d_model >= 1, "LMConfig.d_model", "a positive integer", self.d_model)
        _require(len(self.layers) >= 1, "LMConfig.layers", "at least one layer", self.layers)
        _require(0.0 <= self.dropout < 1.0, "LMConfig.dropout", "a number in [0, 1)", self.dropout)
        for i, layer in enumerate(self.layers):
            if layer.kind == "lstm" and layer.bidirectional:
                raise ValueError(f"LMConfig.layers[{i}].bidirectional: expected false for a "
                                 "language model (it must not see the future), found true")
        for layer in self.layers:
            if layer.kind == "moe":  # fail now, naming the field, not when the model is built
                layer.moe_config(self.d_model, self.moe_overrides)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "LMConfig") -> "LMConfig":
        return _from_dict(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TranslationConfig:
    """The GNMT-style encoder-decoder (paper section 5.3, reduced GNMT).

    Encoder: ``encoder_layers`` LSTMs of ``hidden_size`` units projected to ``d_model`` (the
    first bidirectional), a MoE after encoder layer ``encoder_moe_after``. Decoder:
    ``decoder_layers`` LSTMs, a MoE after decoder layer ``decoder_moe_after``; the first
    decoder layer's output is the attention query, the context feeds every later layer and
    the softmax. ``moe`` holds the MoEConfig fields; unless overridden: strictly balanced
    gating, balancing weights 0.01 and a sigmoid on the MoE output (paper, appendix E). One
    shared vocabulary (and embedding) for source and target.
    """

    vocab_size: int  # set from the corpus by the trainer (one vocabulary for both sides)
    d_model: int = 512  # embedding width and the LSTMs' projections
    hidden_size: int = 2048  # LSTM units
    encoder_layers: int = 3  # encoder LSTMs
    decoder_layers: int = 2  # decoder LSTMs
    encoder_moe_after: int = 2  # the encoder's MoE follows this LSTM (0: none)
    decoder_moe_after: int = 1  # the decoder's MoE follows this LSTM (0: none)
    moe: dict[str, Any] = field(default_factory=lambda: {  # MoEConfig fields of both MoEs
        "d_hidden": 2048, "num_experts": 32, "k": 4})
    dropout: float = 0.4  # on the embedding and every layer's output
    bidirectional_first: bool = True  # the first encoder LSTM reads both directions
    tie_embeddings: bool = False  # the softmax shares the embedding matrix
    activation_checkpointing: bool = False  # set from model.activation_checkpointing
    pad_id: int = 0  # set from the corpus's tokenizer
    bos_id: int = 1  # set from the corpus's tokenizer
    eos_id: int = 2  # set from the corpus's tokenizer

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 4, "TranslationConfig.vocab_size", "an integer >= 4",
                 self.vocab_size)
        _require(self.encoder_layers >= 1, "TranslationConfig.encoder_layers",
                 "a positive integer", self.encoder_layers)
        _require(self.decoder_layers >= 1, "TranslationConfig.decoder_layers",
                 "a positive integer", self.decoder_layers)
        _require(0 <= self.encoder_moe_after <= self.encoder_layers,
                 "TranslationConfig.encoder_moe_after",
                 f"0 (no MoE) or a layer number in [1, {self.encoder_layers}]",
                 self.encoder_moe_after)
        _require(0 <= self.decoder_moe_after <= self.decoder_layers,
                 "TranslationConfig.decoder_moe_after",
                 f"0 (no MoE) or a layer number in [1, {self.decoder_layers}]",
                 self.decoder_moe_after)
        _require(0.0 <= self.dropout < 1.0, "TranslationConfig.dropout", "a number in [0, 1)",
                 self.dropout)
        if self.bidirectional_first:
            _require(self.d_model % 2 == 0, "TranslationConfig.d_model",
                     "an even number with a bidirectional first layer", self.d_model)
        self.moe_config()  # validate the MoE fields now, not at first use

    def moe_config(self) -> MoEConfig:
        defaults = {"gating": "strict_balanced", "w_importance": 0.01, "w_load": 0.01,
                    "output_sigmoid": True}
        values = {**defaults, **dict(self.moe), "d_model": self.d_model}
        return MoEConfig.from_dict(values, source="TranslationConfig.moe")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any],
                  source: str = "TranslationConfig") -> "TranslationConfig":
        return _from_dict(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model_config(path: str | Path) -> LMConfig | TranslationConfig:
    """Reads ``configs/models/*.yaml``: a mapping with ``type: lm`` or ``type: translation``."""
    path = Path(path)
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top level, "
                         f"found {type(values).__name__}")
    values = dict(values)
    kind = values.pop("type", "lm")
    if kind == "lm":
        return LMConfig.from_dict(values, source=str(path))
    if kind == "translation":
        return TranslationConfig.from_dict(values, source=str(path))
    raise ValueError(f"{path}: field 'type': expected 'lm' or 'translation', found {kind!r}")


def _layer(value: LayerConfig | Mapping[str, Any], source: str) -> LayerConfig:
    if isinstance(value, LayerConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: expected a mapping of LayerConfig fields, found {value!r}")
    return LayerConfig.from_dict(value, source)


def _from_dict(cls, values: Mapping[str, Any], source: str):
    """Every model config is built through ``sparse_moe.config_io.from_dict``: unknown fields
    and wrong types fail there, naming ``source`` and the field."""
    return from_dict(cls, values, source)


def _require(ok: bool, name: str, expected: str, found: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, found {found!r}")
