"""The paper's model configurations (appendix C, Table 7) and tiny debug versions.

Full-size language models use the 1B-word benchmark's 793,471-word vocabulary by default;
pass ``vocab_size`` to match a tokenizer. The ``debug-*`` presets keep the same structure at
a size that trains in seconds on a CPU (tests and the demo).
"""

from __future__ import annotations

from typing import Any, Callable

from sparse_moe.models.config import LayerConfig, LMConfig, TranslationConfig

LM1B_VOCAB = 793_471
PAPER_D = 512
PAPER_EXPERT_HIDDEN = 1024


def _lstm(hidden: int, proj: int = 0) -> LayerConfig:
    return LayerConfig(kind="lstm", hidden_size=hidden, proj_size=proj)


def _moe(num_experts: int, d_hidden: int, k: int = 4, num_groups: int = 0,
         **extra: Any) -> LayerConfig:
    values: dict[str, Any] = {"d_hidden": d_hidden, "num_experts": num_experts, "k": k}
    if num_groups:
        values.update(num_groups=num_groups, k_primary=k)
    values.update(extra)
    return LayerConfig(kind="moe", moe=values)


def _lstm_moe_lstm(moe: LayerConfig, d: int = PAPER_D) -> list[LayerConfig]:
    return [_lstm(d), moe, _lstm(d)]


def _lm(layers: list[LayerConfig], vocab_size: int | None, d: int = PAPER_D,
        dropout: float = 0.1) -> LMConfig:
    return LMConfig(vocab_size=vocab_size or LM1B_VOCAB, d_model=d, layers=layers,
                    dropout=dropout)


def _paper_lm(layers: Callable[[], list[LayerConfig]],
              dropout: float = 0.1) -> Callable[[int | None], LMConfig]:
    """DropProb is 0.1 in Table 7 except for MoE-1024-h and MoE-4096-h (0.2)."""
    return lambda vocab_size=None: _lm(layers(), vocab_size, dropout=dropout)


D = PAPER_D
H = PAPER_EXPERT_HIDDEN

# name -> factory(vocab_size) -> LMConfig. Flat MoEs use k=4; hierarchical ones 16 groups
# and k=2 at each level (4 experts per token), as in the paper.
LM_PRESETS: dict[str, Callable[..., LMConfig]] = {
    "4xlstm-512": _paper_lm(lambda: [_lstm(D) for _ in range(4)]),
    "lstm-2048-512": _paper_lm(lambda: [_lstm(2048, D)]),
    "moe-1-wide": _paper_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=4096, output_sigmoid=True))),
    "moe-1-deep": _paper_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=H, hidden_layers=4, output_sigmoid=True))),
    "moe-4": _paper_lm(lambda: _lstm_moe_lstm(_moe(4, H))),
    "moe-32": _paper_lm(lambda: _lstm_moe_lstm(_moe(32, H))),
    "moe-256": _paper_lm(lambda: _lstm_moe_lstm(_moe(256, H))),
    "moe-256-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(256, H, k=2, num_groups=16))),
    "moe-1024-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(1024, H, k=2, num_groups=16)), 0.2),
    "moe-4096-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(4096, H, k=2, num_groups=16)), 0.2),
}

# The 100B-word Google News family (appendix D, Table 8): the same stack with more experts and
# a wider primary level (branching 128 and 256). The paper does not give their dropout; 0.1 as
# for the Table 7 models of the same compute (a single epoch over 100B words hardly overfits).
LM_PRESETS.update({
    "moe-16384-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(16384, H, k=2, num_groups=128))),
    "moe-65536-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(65536, H, k=2, num_groups=256))),
    "moe-131072-h": _paper_lm(lambda: _lstm_moe_lstm(_moe(131072, H, k=2, num_groups=256))),
})

# Debug presets: d=32, experts 32 -> 64 -> 32, same structure.
DEBUG_D, DEBUG_H = 32, 64


def _debug_lm(layers: Callable[[], list[LayerConfig]]) -> Callable[[int | None], LMConfig]:
    return lambda vocab_size=None: _lm(layers(), vocab_size or 256, d=DEBUG_D, dropout=0.0)


LM_PRESETS.update({
    "debug-moe": _debug_lm(lambda: _lstm_moe_lstm(_moe(8, DEBUG_H, k=2), DEBUG_D)),
    "debug-moe-h": _debug_lm(lambda: _lstm_moe_lstm(_moe(16, DEBUG_H, k=2, num_groups=4),
                                                    DEBUG_D)),
    # Same ops per step as debug-moe (2 experts of 64 hidden = one layer of 128 hidden).
    "debug-dense": _debug_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=2 * DEBUG_H, output_sigmoid=True), DEBUG_D)),
    "debug-4xlstm": _debug_lm(lambda: [_lstm(DEBUG_D) for _ in range(4)]),
})

# Demo presets (make demo): d=64, 16 experts of hidden 128 with k=2 against one dense layer
# of hidden 256 (the same multiply-adds per time step, 1/8 of the expert parameters).
DEMO_D, DEMO_H = 64, 128


def _demo_lm(layers: Callable[[], list[LayerConfig]]) -> Callable[[int | None], LMConfig]:
    return lambda vocab_size=None: _lm(layers(), vocab_size or 1000, d=DEMO_D, dropout=0.1)


LM_PRESETS.update({
    "demo-moe": _demo_lm(lambda: _lstm_moe_lstm(_moe(16, DEMO_H, k=2), DEMO_D)),
    "demo-dense": _demo_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=2 * DEMO_H, output_sigmoid=True), DEMO_D)),
})

# The scaling family (benchmarks/scaling): Table 7's models at a quarter of the width
# (d=128, expert hidden 256), so that each trains on a 2-core CPU in minutes. Every member
# does ~0.52M multiply-adds per time step outside the embedding and softmax, as each
# paper model does ~8.4M. No dropout: the runs see each training token about once.
SMALL_D, SMALL_H = 128, 256


def _small_lm(layers: Callable[[], list[LayerConfig]]) -> Callable[[int | None], LMConfig]:
    return lambda vocab_size=None: _lm(layers(), vocab_size or 8000, d=SMALL_D, dropout=0.0)


LM_PRESETS.update({
    "small-4xlstm": _small_lm(lambda: [_lstm(SMALL_D) for _ in range(4)]),
    "small-lstm-512-128": _small_lm(lambda: [_lstm(4 * SMALL_D, SMALL_D)]),
    "small-moe-1-wide": _small_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=4 * SMALL_H, output_sigmoid=True), SMALL_D)),
    **{f"small-moe-{n}": _small_lm(lambda n=n: _lstm_moe_lstm(_moe(n, SMALL_H), SMALL_D))
       for n in (4, 16, 64, 256)},
    # Hierarchical: k=2 groups of k=2 experts each, 4 experts per token like the flat k=4.
    "small-moe-64-h": _small_lm(lambda: _lstm_moe_lstm(_moe(64, SMALL_H, k=2, num_groups=8),
                                                       SMALL_D)),
    "small-moe-256-h": _small_lm(lambda: _lstm_moe_lstm(
        _moe(256, SMALL_H, k=2, num_groups=16), SMALL_D)),
})

# The capacity-limited family (benchmarks/scaling, second sweep): a sixteenth of the paper's
# width (d=32, expert hidden 64), ~33K multiply-adds per time step, so that a few million
# tokens are many per dense parameter -- the regime where the paper's dense models stop
# improving and experts add capacity at no extra compute.
TINY_D, TINY_H = 32, 64


def _tiny_lm(layers: Callable[[], list[LayerConfig]]) -> Callable[[int | None], LMConfig]:
    return lambda vocab_size=None: _lm(layers(), vocab_size or 1000, d=TINY_D, dropout=0.0)


LM_PRESETS.update({
    "tiny-4xlstm": _tiny_lm(lambda: [_lstm(TINY_D) for _ in range(4)]),
    "tiny-moe-1-wide": _tiny_lm(lambda: _lstm_moe_lstm(
        LayerConfig(kind="ffn", hidden_size=4 * TINY_H, output_sigmoid=True), TINY_D)),
    **{f"tiny-moe-{n}": _tiny_lm(lambda n=n: _lstm_moe_lstm(_moe(n, TINY_H), TINY_D))
       for n in (4, 16, 64, 256)},
    # At d=32 a flat gate over 256 experts costs half the per-step budget; hierarchical gates
    # stay within it.
    "tiny-moe-64-h": _tiny_lm(lambda: _lstm_moe_lstm(_moe(64, TINY_H, k=2, num_groups=8),
                                                     TINY_D)),
    "tiny-moe-256-h": _tiny_lm(lambda: _lstm_moe_lstm(_moe(256, TINY_H, k=2, num_groups=16),
                                                      TINY_D)),
})

# The paper's compute-matched comparison (Table 7), in its order.
PAPER_LM_TABLE = ("4xlstm-512", "lstm-2048-512", "moe-1-wide", "moe-1-deep", "moe-4", "moe-32",
                  "moe-256", "moe-256-h", "moe-1024-h", "moe-4096-h")


PAPER_LM_100B_TABLE = ("moe-16384-h", "moe-65536-h", "moe-131072-h")

# GPUs the paper trained each model on: 16 K40s for the 1B-word models (appendix C), 32 for
# the 100B-word family except the two largest (64 and 128, "so as to have enough memory for
# all the parameters", appendix D), 64 for translation (appendix E).
PAPER_GPUS: dict[str, int] = {
    **{name: 16 for name in PAPER_LM_TABLE}, **{name: 32 for name in PAPER_LM_100B_TABLE},
    "moe-65536-h": 64, "moe-131072-h": 128, "gnmt-moe-32": 64, "gnmt-moe-2048-h": 64,
}


def lm_preset(name: str, vocab_size: int | None = None) -> LMConfig:
    """The LMConfig of a named preset (``moe-256``, ``4xlstm-512``, ``debug-moe``...)."""
    if name not in LM_PRESETS:
        raise ValueError(f"lm_preset: unknown preset {name!r}; expected one of "
                         f"{sorted(LM_PRESETS)}")
    return LM_PRESETS[name](vocab_size)


def _translation(num_experts: int, num_groups: int = 0, vocab_size: int = 32_000,
                 **overrides: Any) -> TranslationConfig:
    k = 2 if num_groups else 4
    moe: dict[str, Any] = {"d_hidden": 2048, "num_experts": num_experts, "k": k}
    if num_groups:
        # Strict balancing is defined for flat layers; hierarchical ones use noisy top-k.
        moe.update(num_groups=num_groups, k_primary=2, gating="noisy_topk")
    values: dict[str, Any] = {"vocab_size": vocab_size, "moe": moe, **overrides}
    return TranslationConfig(**values)


TRANSLATION_PRESETS: dict[str, Callable[..., TranslationConfig]] = {
    "gnmt-moe-32": lambda vocab_size=None: _translation(32, vocab_size=vocab_size or 32_000),
    "gnmt-moe-2048-h": lambda vocab_size=None: _translation(2048, 32,
                                                            vocab_size=vocab_size or 32_000),
    "debug-translation": lambda vocab_size=None: TranslationConfig(
        vocab_size=vocab_size or 64, d_model=32, hidden_size=64,
        moe={"d_hidden": 64, "num_experts": 4, "k": 2}, dropout=0.0),
}


# CPU-sized translation study (Multi30k, docs/translation.md): d=128, LSTMs of 256 units, the
# paper's layout (bidirectional first encoder layer, a MoE after encoder layer 2 and decoder
# layer 1). MoE: 32 experts of hidden 256, k=4; the compute-matched dense model is one expert
# of hidden 4 x 256, the same multiply-adds per time step (as MoE-1-Wide for the LM).
SMALL_MT_D, SMALL_MT_H, SMALL_MT_EXPERT = 128, 256, 256


def _small_translation(moe: dict[str, Any], vocab_size: int | None) -> TranslationConfig:
    return TranslationConfig(vocab_size=vocab_size or 8000, d_model=SMALL_MT_D,
                             hidden_size=SMALL_MT_H, encoder_layers=3, decoder_layers=2,
                             encoder_moe_after=2, decoder_moe_after=1, moe=moe, dropout=0.3)


SMALL_TRANSLATION_PRESETS: dict[str, Callable[..., TranslationConfig]] = {
    "small-gnmt-moe-32": lambda vocab_size=None: _small_translation(
        {"d_hidden": SMALL_MT_EXPERT, "num_experts": 32, "k": 4}, vocab_size),
    "small-gnmt-moe-32-topk": lambda vocab_size=None: _small_translation(
        {"d_hidden": SMALL_MT_EXPERT, "num_experts": 32, "k": 4, "gating": "noisy_topk"},
        vocab_size),
    "small-gnmt-dense": lambda vocab_size=None: _small_translation(
        {"d_hidden": 4 * SMALL_MT_EXPERT, "num_experts": 1, "k": 1, "gating": "noisy_topk",
         "w_importance": 0.0, "w_load": 0.0}, vocab_size),
}
TRANSLATION_PRESETS.update(SMALL_TRANSLATION_PRESETS)


def translation_preset(name: str, vocab_size: int | None = None) -> TranslationConfig:
    if name not in TRANSLATION_PRESETS:
        raise ValueError(f"translation_preset: unknown preset {name!r}; expected one of "
                         f"{sorted(TRANSLATION_PRESETS)}")
    return TRANSLATION_PRESETS[name](vocab_size)


def preset_config(name: str, vocab_size: int | None = None) -> LMConfig | TranslationConfig:
    """The config of any preset, language model or translation."""
    if name in TRANSLATION_PRESETS:
        return translation_preset(name, vocab_size)
    return lm_preset(name, vocab_size)


def paper_layout(name: str) -> tuple[int, int]:
    """(GPUs, expert-parallel size) of a paper preset as the paper trained it.

    The expert-parallel size is the GPU count, or the number of units that may not be split
    when smaller: experts of a flat MoE, groups of a hierarchical one (each group lives on one
    device, as in the paper). Dense models have no experts to split (1).
    """
    if name not in PAPER_GPUS:
        raise ValueError(f"paper_layout: {name!r} is not one of the paper's models; expected "
                         f"one of {sorted(PAPER_GPUS)}")
    gpus = PAPER_GPUS[name]
    units = [moe.get("num_groups") or moe["num_experts"] for moe in _moe_sections(name)]
    return gpus, min([gpus, *units]) if units else 1


def _moe_sections(name: str) -> list[dict[str, Any]]:
    config = preset_config(name)
    if isinstance(config, TranslationConfig):
        return [config.moe] if config.encoder_moe_after or config.decoder_moe_after else []
    return [layer.moe for layer in config.layers if layer.kind == "moe" and layer.moe]


