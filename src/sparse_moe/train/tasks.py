"""What differs between training a language model and a translation model.

A task builds its model from the config and the corpus, makes the readers, turns a batch into
model inputs and targets, and evaluates. The trainer owns everything else (engine, loop,
checkpoints, tracking), so both tasks get the same resumption and parallelism.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sparse_moe.atomic import atomic_write
from sparse_moe.config_io import ConfigError, check_field_types
from sparse_moe.data import Corpus, LMBatches, TranslationBatches
from sparse_moe.models import (
    LMConfig,
    ModelOutput,
    TranslationConfig,
    beam_search,
    lm_preset,
    load_model_config,
    translation_preset,
)
from sparse_moe.models.presets import LM_PRESETS, TRANSLATION_PRESETS
from sparse_moe.moe.noise import keyed_noise
from sparse_moe.train.config import TrainConfig
from sparse_moe.train.distributed import all_reduce_host

IGNORE = -100
SPECIALISATION_BATCHES = 50


class Task(Protocol):
    def model_config(self, source: str = "model.overrides") -> LMConfig | TranslationConfig: ...

    def train_reader(self) -> Any: ...

    def model_inputs(self, batch: Any, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]: ...

    def sample_noise(self, batch: Any) -> ContextManager[None]: ...

    def forward(self, engine: Any, inputs: tuple[Tensor, ...], targets: Tensor) -> ModelOutput: ...

    def evaluate(self, engine: Any, device: torch.device, run_dir: Path) -> dict[str, float]: ...


def batch_to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A batch's array as a tensor on ``device``.

    On a GPU the copy starts from pinned memory without blocking the host, so the host goes on
    to queue the forward pass while it runs (PyTorch's pinned-memory pool keeps the buffer until
    the copy is done). On the CPU the tensor shares the array's memory.
    """
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def make_task(config: TrainConfig, corpus: Corpus, tokenizer: Any, rank: int, world: int) -> Task:
    if isinstance(base_model_config(config.model.preset), TranslationConfig):
        return TranslationTask(config, corpus, tokenizer, rank, world)
    return LanguageModelTask(config, corpus, tokenizer, rank, world)


def base_model_config(preset: str, vocab_size: int | None = None
                      ) -> LMConfig | TranslationConfig:
    """``model.preset``: a preset's config, or the model YAML it names (``configs/models/``
    holds one per preset to start from); ``vocab_size`` replaces the file's or preset's."""
    if preset in TRANSLATION_PRESETS:
        return translation_preset(preset, vocab_size)
    if preset in LM_PRESETS:
        return lm_preset(preset, vocab_size)
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        raise ConfigError(f"model.preset: expected one of {sorted(LM_PRESETS)} (language models), "
                          f"{sorted(TRANSLATION_PRESETS)} (translation) or the path of a model "
                          f"YAML, found {preset!r}")
    if not path.is_file():
        raise ConfigError(f"model.preset: expected a model YAML file (as in configs/models/), "
                          f"found no file {path}")
    try:
        config = load_model_config(path)
    except ValueError as error:
        raise ConfigError(f"model.preset: {error}") from None
    if vocab_size is None:
        return config
    return type(config).from_dict({**config.to_dict(), "vocab_size": vocab_size},
                                  source=str(path))


def _model_values(config: TrainConfig, base: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    return {**base, **config.model.overrides, **fixed,
            "activation_checkpointing": config.model.activation_checkpointing}


def resolve_model_config(config: TrainConfig, vocab_size: int, source: str = "model.overrides",
                         **special_ids: int) -> LMConfig | TranslationConfig:
    """The model a run builds: its preset at ``vocab_size``, then ``model.overrides``.

    ``special_ids`` (translation: ``pad_id``, ``bos_id``, ``eos_id``) come from the corpus and
    its tokenizer; the planner, which reads no tokenizer, passes the presets' own.
    """
    base = base_model_config(config.model.preset, vocab_size)
    if isinstance(base, TranslationConfig):
        values = _model_values(config, base.to_dict(), vocab_size=vocab_size, **special_ids)
        return _checked_model_config(TranslationConfig, values, source)
    values = _model_values(config, base.to_dict(), vocab_size=vocab_size)
    return _checked_model_config(LMConfig, values, source)


def _checked_model_config(cls: type, values: dict[str, Any], source: str):
    """The preset's config with ``model.overrides`` applied, every problem a ConfigError
    naming ``source`` (the config file and section)."""
    try:
        check_field_types(cls, values, source)
        return cls.from_dict(values, source=source)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from None


class LanguageModelTask:
    """Next-token prediction on contiguous token streams; per-token perplexity."""

    def __init__(self, config: TrainConfig, corpus: Corpus, tokenizer: Any, rank: int,
                 world: int) -> None:
        self.config, self.corpus, self.tokenizer = config, corpus, tokenizer
        self.rank, self.world = rank, world

    def model_config(self, source: str = "model.overrides") -> LMConfig:
        """The model to build: the preset at the corpus's vocabulary, then the overrides."""
        return resolve_model_config(self.config, self.corpus.vocab_size, source)

    def reader(self, split: str, shuffle: bool = True) -> LMBatches:
        data = self.config.data
        return LMBatches(self.corpus.split(split), data.micro_batch_size, data.seq_len,
                         rank=self.rank, world_size=self.world, seed=self.config.run.seed,
                         shuffle=shuffle)

    def train_reader(self) -> LMBatches:
        return self.reader(self.config.data.train_split)

    def model_inputs(self, batch: Any, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
        inputs = batch_to_device(batch.inputs, device)
        return (inputs,), batch_to_device(batch.targets, device)

    def forward(self, engine: Any, inputs: tuple[Tensor, ...], targets: Tensor) -> ModelOutput:
        """The model scores its own targets: the softmax it trains with may be sampled, and
        no ``[tokens, vocab]`` logits need exist (``models/softmax.py``)."""
        return engine(*inputs, targets=targets)

    def sample_noise(self, batch: Any) -> ContextManager[None]:
        """Gating noise keyed by each row's sample, so that any layout routes it the same
        (``moe/noise.py``); carry-mode streams have no sample ids and keep the rank's RNG."""
        if batch.sample_ids is None:
            return nullcontext()
        return keyed_noise(self.config.run.seed, torch.from_numpy(batch.sample_ids),
                           self.config.data.seq_len)

    @torch.no_grad()
    def evaluate(self, engine: Any, device: torch.device, run_dir: Path) -> dict[str, float]:
        results = {}
        for split in self.config.data.eval_splits:
            if split not in self.corpus.split_names:
                continue
            nll, tokens = self._nll(engine, split, device)
            results[f"{split}/cross_entropy"] = nll / tokens
            results[f"{split}/perplexity"] = float(np.exp(nll / tokens))
            results[f"{split}/tokens"] = tokens
            words = self._words_per_token(split)
            if words is not None:
                results[f"{split}/perplexity_per_word"] = float(np.exp(nll / (tokens * words)))
        return results

    def _words_per_token(self, split: str) -> float | None:
        """Words per subword token of a split, so that perplexities compare across vocabularies.

        Words are counted as SentencePiece marks them, by the pieces that begin with the word
        boundary ``▁`` (decoding would split words at every unknown character), plus one end
        of document each (word-level corpora count the end of a line as a word, and our LM
        predicts the end-of-sentence token). Only for subword (SentencePiece) corpora: with a
        word vocabulary every token is a word already. Evaluations that stop early
        (``run.eval_batches``) use the whole split's ratio.
        """
        processor = getattr(self.tokenizer, "processor", None)
        if processor is None:
            return None
        cache = self.__dict__.setdefault("_word_ratios", {})
        if split not in cache:
            starts_word = np.array([processor.id_to_piece(i).startswith("\u2581")
                                    for i in range(processor.get_piece_size())])
            data = self.corpus.split(split)
            stream = data.token_stream()
            words = data.num_documents + sum(
                int(starts_word[stream.slice(start, min(start + (1 << 22), len(stream)))].sum())
                for start in range(0, len(stream), 1 << 22))
            cache[split] = words / max(len(stream), 1)
        return cache[split]

    def _nll(self, engine: Any, split: str, device: torch.device) -> tuple[float, float]:
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in _limited(self.reader(split, shuffle=False), self.config.run.eval_batches):
            inputs, targets = self.model_inputs(batch, device)
            nll = self.forward(engine, inputs, targets).token_nll
            totals += torch.tensor([float(nll.double().sum()), float((targets != IGNORE).sum())],
                                   dtype=torch.float64)
        all_reduce_host(totals)
        return float(totals[0]), float(totals[1])

    def specialisation_batches(self, split: str) -> Iterator[Tensor]:
        """Input token ids of the first evaluation batches (whose routing the trainer tabulates).

        At most ``run.eval_batches`` batches, or 50 when that is 0 (a whole split, perhaps
        the training split, would cost as much as an epoch of forward passes).
        """
        limit = self.config.run.eval_batches or SPECIALISATION_BATCHES
        for batch in _limited(self.reader(split, shuffle=False), limit):
            yield torch.from_numpy(batch.inputs)


class TranslationTask:
    """Teacher-forced cross-entropy on sentence pairs; perplexity and BLEU (sacrebleu).

    Corpora come from ``data_prep encode-parallel``; ``data.train_split`` and
    ``data.eval_splits`` name its parallel splits. Special ids come from the corpus's
    tokenizer, which must define a padding id (``data_prep tokenizer --pad-id``).
    """

    def __init__(self, config: TrainConfig, corpus: Corpus, tokenizer: Any, rank: int,
                 world: int) -> None:
        self.config, self.corpus, self.tokenizer = config, corpus, tokenizer
        self.rank, self.world = rank, world
        if corpus.pad_id < 0:
            raise ConfigError(f"data.corpus: {corpus.directory} was encoded with a tokenizer "
                              "without a padding id; translation needs one (train it with "
                              "data_prep tokenizer --pad-id N)")
        if tokenizer is None:
            raise ConfigError("data.tokenizer: translation needs the tokenizer to decode BLEU "
                              "hypotheses; found none")
        self.bos_id = tokenizer.processor.bos_id()
        if self.bos_id < 0:
            raise ConfigError(f"data.tokenizer: {tokenizer.path} has no BOS id; translation "
                              "starts decoding from it")
        self.references = {split: self._load_references(split, path)
                           for split, path in config.data.references.items()}

    def _load_references(self, split: str, path: str) -> list[str]:
        parallel = self.corpus.manifest.get("parallel", {})
        if split not in parallel:
            raise ConfigError(f"data.references.{split}: the corpus has no parallel split "
                              f"{split!r}; it has {sorted(parallel)}")
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"data.references.{split}: reference file {file} not found")
        lines = file.read_text(encoding="utf-8").splitlines()
        expected = self.corpus.split(parallel[split]["target"]).num_documents
        if len(lines) != expected:
            raise ConfigError(f"data.references.{split}: {file} has {len(lines)} lines, expected "
                              f"{expected} (one per sentence pair of split {split!r})")
        return lines

    def model_config(self, source: str = "model.overrides") -> TranslationConfig:
        """The model to build: the preset at the corpus's vocabulary and special ids, then the
        overrides."""
        return resolve_model_config(self.config, self.corpus.vocab_size, source,
                                    pad_id=self.corpus.pad_id, bos_id=self.bos_id,
                                    eos_id=self.corpus.eos_id)

    def reader(self, split: str, shuffle: bool = True) -> TranslationBatches:
        return TranslationBatches(self.corpus, split, self.config.data.max_tokens,
                                  rank=self.rank, world_size=self.world,
                                  seed=self.config.run.seed, shuffle=shuffle)

    def train_reader(self) -> TranslationBatches:
        return self.reader(self.config.data.train_split)

    def sample_noise(self, batch: Any) -> ContextManager[None]:
        """The rank's own RNG: padded pairs reach the MoE masked, so tokens have no fixed row."""
        return nullcontext()

    def model_inputs(self, batch: Any, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
        """Source, ``BOS + target[:-1]``, and targets with padding ignored."""
        source = batch_to_device(batch.source, device)
        target = batch_to_device(batch.target, device)
        bos = torch.full_like(target[:, :1], self.bos_id)
        target_in = torch.cat([bos, target[:, :-1]], dim=1)
        return (source, target_in), target.masked_fill(target == self.corpus.pad_id, IGNORE)

    def forward(self, engine: Any, inputs: tuple[Tensor, ...], targets: Tensor) -> ModelOutput:
        return engine(*inputs)

    @torch.no_grad()
    def evaluate(self, engine: Any, device: torch.device, run_dir: Path) -> dict[str, float]:
        """Perplexity per split, and BLEU of beam search; rank 0 writes the translations
        (``<run>/translations/<split>.hyp`` and ``.ref``, one sentence per line)."""
        results = {}
        for split in self.config.data.eval_splits:
            if split not in self.corpus.manifest.get("parallel", {}):
                continue
            totals = torch.zeros(2, dtype=torch.float64)
            reader = _limited(self.reader(split, shuffle=False), self.config.run.eval_batches)
            for batch in reader:
                inputs, targets = self.model_inputs(batch, device)
                totals += _summed_nll(engine(*inputs).logits, targets)
            all_reduce_host(totals)
            results[f"{split}/cross_entropy"] = float(totals[0] / totals[1])
            results[f"{split}/perplexity"] = float(np.exp(totals[0] / totals[1]))
            results[f"{split}/bleu"] = self._bleu(engine.module, split, device, run_dir)
        return results

    def _bleu(self, model: torch.nn.Module, split: str, device: torch.device,
              run_dir: Path) -> float:
        """Corpus BLEU of beam-search output on this split, over every rank's share."""
        hypotheses, references = [], []
        for batch in _limited(self.reader(split, shuffle=False), self.config.run.eval_batches):
            source = batch_to_device(batch.source, device)
            decode = self.config.decode
            outputs = beam_search(model, source, decode.beam_size, decode.max_length,
                                  alpha=decode.length_penalty, all_finished=_all_ranks_finished)
            for hyp, pair, target, length in zip(outputs, batch.pairs, batch.target,
                                                 batch.target_lengths):
                hypotheses.append(self.tokenizer.decode(hyp.tokens))
                references.append(self._reference(split, int(pair), target[:length]))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (hypotheses, references))
        hyps = [h for part in gathered for h in part[0]]
        refs = [r for part in gathered for r in part[1]]
        if self.rank == 0:
            _write_lines(run_dir / "translations" / f"{split}.hyp", hyps)
            _write_lines(run_dir / "translations" / f"{split}.ref", refs)
        return float(sacrebleu.corpus_bleu(hyps, [refs]).score) if hyps else 0.0


    def _reference(self, split: str, pair: int, target_ids: np.ndarray) -> str:
        if split in self.references:
            return self.references[split][pair]
        return self.tokenizer.decode([int(t) for t in target_ids if int(t) != self.corpus.eos_id])


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(line + "\n" for line in lines))


def _all_ranks_finished(finished: Tensor) -> bool:
    """Decoding stops when every rank's beams are done: MoE layers need all ranks in step."""
    flag = torch.tensor([0 if bool(finished.all()) else 1], dtype=torch.int32)
    all_reduce_host(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _summed_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """[summed negative log-likelihood, counted tokens] in float64."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return torch.tensor([float(nll), float((targets != IGNORE).sum())], dtype=torch.float64)


def _limited(reader: Any, limit: int) -> Iterator[Any]:
    for i, batch in enumerate(reader):
        if limit and i >= limit:
            return
        yield batch

