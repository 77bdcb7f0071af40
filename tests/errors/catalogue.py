"""The catalogue of bad inputs: what is wrong, the command a user runs, what it must say.

Each case prepares its inputs in a directory of its own and runs one of the project's
command lines there (in-process, or as a real subprocess where ``subprocess`` is set). The
test asserts the exit status, that the message names the file or field (``names``), states
what was expected (``expected``) and what was found (``found``), shows no traceback, and that
nothing in the directory was written or destroyed. ``docs/errors.md`` lists every case with
the message it produced; the test compares the two, so the document cannot drift.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .workspace import REPO, Workspace, copy_into

TRAIN = "sparse-moe-train"
DATA = "python -m data_prep"
GENERATE = "sparse-moe-generate"
REPORT = "sparse-moe-report"
PLAN = "sparse-moe-plan"

# program -> (module whose main(argv) runs it in-process, module run by ``python -m``)
PROGRAMS = {TRAIN: ("sparse_moe.train.cli", "sparse_moe.train"),
            DATA: ("data_prep.cli", "data_prep"),
            GENERATE: ("sparse_moe.train.generate", "sparse_moe.train.generate"),
            REPORT: ("sparse_moe.report", "sparse_moe.report"),
            PLAN: ("sparse_moe.plan.cli", "sparse_moe.plan.cli")}

Setup = Callable[[Workspace, Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    input: str                    # what is wrong, in words
    program: str
    argv: tuple[str, ...]
    names: tuple[str, ...]        # the file or field the message must name
    expected: str                 # words of the message that state the expectation
    found: str                    # words of the message that state what was found
    setup: Setup = lambda ws, d: None
    code: int = 2
    stream: str = "stderr"
    subprocess: bool = False
    fp16_unsupported: bool = False   # run with an accelerator that lacks fp16 (CPU's case)
    tags: tuple[str, ...] = field(default=())

    @property
    def command(self) -> str:
        return " ".join([self.program, *(_quote(a) for a in self.argv)])


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}[]*") else arg


# ---------------------------------------------------------------- set-ups


def write(relative: str, data: str | bytes) -> Setup:
    def setup(ws: Workspace, d: Path) -> None:
        path = d / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def chain(*steps: Setup) -> Setup:
    def setup(ws: Workspace, d: Path) -> None:
        for step in steps:
            step(ws, d)
    return setup


def training_inputs(ws: Workspace, d: Path) -> None:
    copy_into(ws.corpus, d / "corpus")
    copy_into(ws.tokenizer, d / "sp.model")
    copy_into(ws.other_tokenizer, d / "other.model")
    copy_into(REPO / "ds_configs" / "cpu_fp32.json", d / "ds_configs" / "cpu_fp32.json")


def text_inputs(ws: Workspace, d: Path) -> None:
    copy_into(ws.train_text, d / "train.txt")
    copy_into(ws.tokenizer, d / "sp.model")
    copy_into(ws.other_tokenizer, d / "other.model")
    copy_into(ws.pad_tokenizer, d / "pad.model")


def run_copy(ws: Workspace, d: Path) -> None:
    training_inputs(ws, d)
    copy_into(ws.run, d / "run")


def corpus_edit(edit: Callable[[dict], None]) -> Setup:
    def setup(ws: Workspace, d: Path) -> None:
        path = d / "corpus" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2))
    return setup


def damage(relative: str, how: str) -> Setup:
    def setup(ws: Workspace, d: Path) -> None:
        path = d / relative
        data = bytearray(path.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
        elif how == "truncate":
            del data[-len(data) // 3:]
        elif how == "garbage":
            data = bytearray(b"this is not a checkpoint\n" * 4)
        path.write_bytes(bytes(data))
    return setup


def remove(relative: str) -> Setup:
    def setup(ws: Workspace, d: Path) -> None:
        path = d / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def recorded_ep_size(size: int) -> Setup:
    """Rewrites the checkpoint's record of the layout it was saved with (as a run on
    ``size`` expert-parallel ranks would have written it)."""
    def setup(ws: Workspace, d: Path) -> None:
        import torch

        path = d / "run" / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
        states = torch.load(path, map_location="cpu", weights_only=False)
        states["config"]["parallel"]["ep_size"] = size
        torch.save(states, path)
    return setup


TRAIN_ARGS = ("data.corpus=corpus", "data.tokenizer=sp.model", "tracking.wandb=false")
RESUME_ARGS = ("--config", "run/config.yaml", "--resume", "run.dir=run",
               "data.corpus=corpus", "data.tokenizer=sp.model")
CKPT = "run/checkpoints/step_00000001"


# ---------------------------------------------------------------- the catalogue

CASES: list[Case] = [
    # ------------------------------------------------------------ configuration files and command lines
    Case("train-no-data-section", "configuration", "no data section at all", TRAIN,
         ("run.steps=10",), ("command line", "data"), "expected a 'data' section",
         "found none", subprocess=True),
    Case("config-file-missing", "configuration", "--config names a file that is not there", TRAIN,
         ("--config", "run.yaml"), ("run.yaml",), "expected a YAML file", "found nothing"),
    Case("config-invalid-yaml", "configuration", "YAML with an unclosed brace", TRAIN,
         ("--config", "run.yaml"), ("run.yaml", "line 2"), "expected YAML",
         "found a syntax error", write("run.yaml", "run: {steps: 10\ndata: {corpus: corpus}\n")),
    Case("config-not-utf8", "configuration", "a config saved as Latin-1", TRAIN,
         ("--config", "run.yaml"), ("run.yaml",), "expected UTF-8 text", "found byte b'\\xe9'",
         write("run.yaml", b"# r\xe9sum\xe9\ndata: {corpus: corpus}\n")),
    Case("config-top-level-list", "configuration", "a YAML list instead of sections", TRAIN,
         ("--config", "run.yaml"), ("run.yaml",), "expected a mapping of sections",
         "found list", write("run.yaml", "- run\n- data\n")),
    Case("config-unknown-section", "configuration", "a section that does not exist", TRAIN,
         ("--config", "run.yaml"), ("run.yaml", "'trainer'"), "expected some of",
         "unknown TrainConfig field(s) ['trainer']",
         write("run.yaml", "data: {corpus: corpus}\ntrainer: {steps: 3}\n")),
    Case("config-unknown-field", "configuration", "a misspelt field in an override", TRAIN,
         ("data.corpus=corpus", "run.stpes=10"), ("command line.run", "'stpes'"),
         "expected some of", "unknown RunConfig field(s) ['stpes']"),
    Case("config-wrong-type", "configuration", "a word where an integer belongs", TRAIN,
         ("data.corpus=corpus", "run.steps=ten"), ("run.steps",), "expected an integer",
         "found 'ten' (str)"),
    Case("config-wrong-type-bool", "configuration", "a word where true/false belongs", TRAIN,
         ("data.corpus=corpus", "run.resume=maybe"), ("run.resume",), "expected true or false",
         "found 'maybe' (str)"),
    Case("config-section-not-mapping", "configuration", "a section given a single value", TRAIN,
         ("--config", "run.yaml"), ("run.yaml.run",), "expected a mapping of RunConfig fields",
         "found 5 (int)", write("run.yaml", "data: {corpus: corpus}\nrun: 5\n")),
    Case("config-bad-value", "configuration", "zero training steps", TRAIN,
         ("data.corpus=corpus", "run.steps=0"), ("RunConfig.steps",),
         "expected a positive integer", "found 0"),
    Case("config-bad-choice", "configuration", "a precision that does not exist", TRAIN,
         ("data.corpus=corpus", "deepspeed.precision=fp8"), ("deepspeed.precision",),
         "expected one of ('fp32', 'bf16', 'fp16')", "found 'fp8'"),
    Case("override-without-equals", "configuration", "an override without '='", TRAIN,
         ("data.corpus=corpus", "run.steps"), ("'run.steps'",),
         "expected the form section.field=value", "found no '='"),
    Case("override-bad-yaml", "configuration", "an override value that is broken YAML", TRAIN,
         ("data.corpus=corpus", "model.overrides={dropout: 0.2"), ("model.overrides",),
         "expected a YAML value", "found '{dropout: 0.2'"),
    Case("override-into-a-value", "configuration", "an override that treats a value as a section",
         TRAIN, ("data.corpus=corpus", "run.steps=10", "run.steps.max=3"), ("'steps'",),
         "expected 'steps' to be a section", "found the value 10"),
    Case("model-unknown-preset", "configuration", "a model preset that does not exist", TRAIN,
         (*TRAIN_ARGS, "model.preset=moe-9999"), ("model.preset",), "expected one of",
         "found 'moe-9999'", training_inputs),
    Case("model-bad-override", "configuration", "a dropout rate above 1", TRAIN,
         (*TRAIN_ARGS, "model.overrides.dropout=1.5"), ("model.overrides", "LMConfig.dropout"),
         "expected a number in [0, 1)", "found 1.5", training_inputs),
    Case("model-unknown-override", "configuration", "a misspelt model field", TRAIN,
         (*TRAIN_ARGS, "model.overrides.dmodel=64"), ("model.overrides", "'dmodel'"),
         "expected some of", "unknown LMConfig field(s) ['dmodel']", training_inputs),
    Case("ep-size-not-a-divisor", "configuration", "more expert-parallel ranks than processes",
         TRAIN, (*TRAIN_ARGS, "parallel.ep_size=2"), ("parallel.ep_size",),
         "expected a divisor of the world size 1", "found 2", training_inputs),
    # ------------------------------------------------------------ DeepSpeed JSON
    Case("ds-json-missing", "DeepSpeed JSON", "the DeepSpeed config file is not there", TRAIN,
         (*TRAIN_ARGS, "deepspeed.config=ds_configs/nope.json"),
         ("deepspeed.config", "ds_configs/nope.json"), "expected a DeepSpeed JSON file",
         "found no file", training_inputs),
    Case("ds-json-invalid", "DeepSpeed JSON", "a trailing comma in the JSON", TRAIN,
         (*TRAIN_ARGS, "deepspeed.config=ds.json"), ("ds.json", "line 1"),
         "expected a DeepSpeed JSON config", "found text that is not valid JSON",
         chain(training_inputs, write("ds.json", '{"zero_optimization": {"stage": 0},}'))),
    Case("ds-json-batch-size", "DeepSpeed JSON", "a batch size set in the JSON", TRAIN,
         (*TRAIN_ARGS, "deepspeed.config=ds.json"), ("ds.json", "train_batch_size"),
         "batch sizes belong to the training config", "train_batch_size=64",
         chain(training_inputs, write("ds.json", '{"train_batch_size": 64}'))),
    Case("ds-batch-size-conflict", "DeepSpeed JSON", "a global batch that does not add up", TRAIN,
         (*TRAIN_ARGS, "data.micro_batch_size=8", "deepspeed.train_batch_size=20"),
         ("deepspeed.train_batch_size",),
         "expected micro batch 8 x gradient accumulation 1 x data-parallel size 1 = 8",
         "found 20", training_inputs),
    Case("ds-precision-unsupported", "DeepSpeed JSON", "fp16 on an accelerator without fp16",
         TRAIN, (*TRAIN_ARGS, "deepspeed.precision=fp16"), ("deepspeed.precision",),
         "expected fp32 or a precision it supports", "found fp16", training_inputs,
         fp16_unsupported=True),
    # ------------------------------------------------------------ corpora
    Case("corpus-no-manifest", "corpora", "data.corpus is not a corpus directory", TRAIN,
         ("data.corpus=texts", "data.tokenizer=sp.model"), ("texts/manifest.json",),
         "expected the manifest", "found no such file",
         chain(training_inputs, write("texts/train.txt", "not encoded yet\n"))),
    Case("corpus-manifest-truncated", "corpora", "a manifest cut off half-way", TRAIN,
         TRAIN_ARGS, ("corpus/manifest.json",), "expected a JSON manifest",
         "found text that is not valid JSON",
         chain(training_inputs, damage("corpus/manifest.json", "truncate"))),
    Case("corpus-manifest-bad-dtype", "corpora", "a token dtype the reader does not know", TRAIN,
         TRAIN_ARGS, ("corpus/manifest.json", "'dtype'"), "expected one of ['uint16', 'int32']",
         "is 'float16'", chain(training_inputs, corpus_edit(lambda m: m.update(dtype="float16")))),
    Case("corpus-checksum-mismatch", "corpora", "one flipped byte in a shard", DATA,
         ("verify", "corpus"), ("corpus/train_00000.bin",), "manifest says", "sha256",
         chain(training_inputs, damage("corpus/train_00000.bin", "flip")),
         code=1, stream="stdout"),
    Case("corpus-wrong-dtype", "corpora", "the manifest's dtype differs from the shards'", DATA,
         ("verify", "corpus"), ("corpus/train_00000.idx",), "manifest says int32",
         "dtype uint16", chain(training_inputs, corpus_edit(lambda m: m.update(dtype="int32"))),
         code=1, stream="stdout"),
    Case("corpus-truncated-shard", "corpora", "a shard cut short", TRAIN, TRAIN_ARGS,
         ("corpus/train_00000.bin",), "expected 162186 bytes", "found 108124",
         chain(training_inputs, damage("corpus/train_00000.bin", "truncate"))),
    Case("corpus-unknown-split", "corpora", "a training split the corpus does not have", TRAIN,
         (*TRAIN_ARGS, "data.train_split=training"), ("corpus/manifest.json", "'training'"),
         "expected one of ['train', 'valid']", "found 'training'", training_inputs),
    Case("corpus-split-too-small", "corpora", "a split too small for one batch", TRAIN,
         (*TRAIN_ARGS, "data.seq_len=50000"), ("data.train_split", "'train'"),
         "expected at least 400001 tokens", "found 81093", training_inputs),
    Case("corpus-empty-split", "corpora", "a split with no shards at all", TRAIN, TRAIN_ARGS,
         ("data.train_split", "'train'"), "expected at least 257 tokens", "found 0",
         chain(training_inputs, corpus_edit(lambda m: m["splits"]["train"].update(shards=[])))),
    Case("corpus-incomplete-split", "corpora", "a split whose encode was interrupted", TRAIN,
         TRAIN_ARGS, ("corpus/manifest.json", "'train'"), "expected 'complete': true",
         "found false", chain(training_inputs, corpus_edit(
             lambda m: m["splits"]["train"].update(complete=False)))),
    # ------------------------------------------------------------ text inputs (data prep)
    Case("encode-missing-input", "text inputs", "an input file that is not there", DATA,
         ("encode", "-i", "nope.txt", "-t", "sp.model", "-o", "out", "--no-progress"),
         ("nope.txt",), "expected a file", "does not exist", text_inputs, subprocess=True),
    Case("encode-empty-input", "text inputs", "an empty input file", DATA,
         ("encode", "-i", "empty.txt", "-t", "sp.model", "-o", "out", "--no-progress"),
         ("empty.txt",), "expected text to encode", "found 0 bytes",
         chain(text_inputs, write("empty.txt", b""))),
    Case("encode-blank-input", "text inputs", "an input of blank lines only", DATA,
         ("encode", "-i", "blank.txt", "-t", "sp.model", "-o", "out", "--no-progress"),
         ("blank.txt",), "expected at least one non-blank line", "found only blank lines",
         chain(text_inputs, write("blank.txt", "\n  \n\n"))),
    Case("encode-not-utf8", "text inputs", "Latin-1 text read as UTF-8", DATA,
         ("encode", "-i", "latin1.txt", "-t", "sp.model", "-o", "out", "--no-progress"),
         ("latin1.txt:2",), "expected utf-8 text", "found byte b'\\xe9' at column 3",
         chain(text_inputs, write("latin1.txt", b"first line\ncaf\xe9 au lait\n"))),
    Case("encode-jsonl-missing-field", "text inputs", "JSON lines without the text field", DATA,
         ("encode", "-i", "rows.jsonl", "-t", "sp.model", "-o", "out", "--no-progress"),
         ("rows.jsonl", "'text'"), "expected it in every row", "found the fields ['body']",
         chain(text_inputs, write("rows.jsonl", '{"body": "a b c"}\n'))),
    Case("encode-parallel-misaligned", "text inputs", "parallel files of different lengths",
         DATA, ("encode-parallel", "--source", "a.en", "--target", "a.de", "-t", "pad.model",
                "-o", "out", "--no-progress"), ("a.en", "a.de"), "expected the same number",
         "a.de has 2", chain(text_inputs, write("a.en", "one\ntwo\nthree\n"),
                                write("a.de", "eins\nzwei\n"))),
    Case("encode-parallel-no-target", "text inputs", "a source side without a target side",
         DATA, ("encode-parallel", "--source", "a.en", "-t", "pad.model", "-o", "out",
                "--no-progress"), ("--target",), "expected --source and --target",
         "found --source", chain(text_inputs, write("a.en", "one\n"))),
    Case("encode-parallel-no-padding-id", "text inputs",
         "a translation corpus with a tokenizer trained without --pad-id", DATA,
         ("encode-parallel", "--source", "a.en", "--target", "a.de", "-t", "sp.model", "-o",
          "out", "--no-progress"), ("sp.model", "--pad-id"), "expected a tokenizer with a padding id",
         "found none", chain(text_inputs, write("a.en", "one\n"), write("a.de", "eins\n"))),
    Case("encode-tsv-without-tab", "text inputs", "a TSV line without a tab", DATA,
         ("encode-parallel", "--tsv", "pairs.tsv", "-t", "pad.model", "-o", "out",
          "--no-progress"), ("pairs.tsv:2",), "expected 'source<TAB>target'", "found no tab",
         chain(text_inputs, write("pairs.tsv", "hello\tbonjour\nno tab here\n"))),
    Case("encode-into-other-corpus", "text inputs", "--output holds a corpus of another tokenizer",
         DATA, ("encode", "-i", "train.txt", "-t", "other.model", "-o", "corpus", "--no-progress"),
         ("corpus", "other.model"), "expected the same tokenizer", "found",
         chain(text_inputs, training_inputs)),
    Case("encode-bad-shard-size", "text inputs", "a shard size in unknown units", DATA,
         ("encode", "-i", "train.txt", "-t", "sp.model", "-o", "out", "--shard-size", "12Q"),
         ("--shard-size",), "expected a size like 4096, 64K, 256M or 1G", "found '12Q'",
         text_inputs),
    Case("lm1b-wrong-layout", "text inputs", "a 1B-word root without the held-out shard", DATA,
         ("lm1b", "--root", "lm1b", "-o", "out", "--no-progress"),
         ("lm1b/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",),
         "expected the 1B-word layout", "does not exist",
         write("lm1b/training-monolingual.tokenized.shuffled/news.en-00001-of-00100", "a b\n")),
    # ------------------------------------------------------------ tokenizers
    Case("tokenizer-missing", "tokenizers", "data.tokenizer names no file", TRAIN,
         ("data.corpus=corpus", "data.tokenizer=nope.model"), ("nope.model",),
         "expected a SentencePiece .model file", "found nothing", training_inputs),
    Case("tokenizer-corrupt", "tokenizers", "a .model file that is not a SentencePiece model",
         DATA, ("encode", "-i", "train.txt", "-t", "bad.model", "-o", "out", "--no-progress"),
         ("bad.model",), "expected a SentencePiece model", "found 100 bytes",
         chain(text_inputs, write("bad.model", b"not a model\n" * 8 + b"1234"))),
    Case("tokenizer-vocab-mismatch", "tokenizers", "training with another tokenizer than the "
         "corpus's", TRAIN, ("data.corpus=corpus", "data.tokenizer=other.model"),
         ("corpus/manifest.json", "other.model"), "expected that tokenizer",
         "but was given other.model", training_inputs),
    Case("tokenizer-vocab-too-large", "tokenizers", "more pieces than the text can give", DATA,
         ("tokenizer", "-i", "train.txt", "--model-prefix", "tok", "--vocab-size", "60000"),
         ("--vocab-size", "train.txt"), "expected at most", "found 60000", text_inputs,
         subprocess=True),
    Case("tokenizer-vocab-too-small", "tokenizers", "fewer pieces than the text has characters",
         DATA, ("tokenizer", "-i", "train.txt", "--model-prefix", "tok", "--vocab-size", "20"),
         ("--vocab-size", "train.txt"), "expected at least", "found 20", text_inputs),
    Case("tokenizer-word-vocab-no-specials", "tokenizers", "a word list without <S> </S> <UNK>",
         DATA, ("encode", "-i", "train.txt", "-t", "words.txt", "-o", "out", "--no-progress"),
         ("words.txt",), "expected a word vocabulary with the special entries",
         "found 2 entries without", chain(text_inputs, write("words.txt", "the\t10\nof\t5\n"))),
    # ------------------------------------------------------------ checkpoints
    Case("resume-corrupt-latest", "checkpoints", "'latest' names a checkpoint that is not there",
         TRAIN, RESUME_ARGS, ("run/checkpoints/latest",), "expected the tag of a checkpoint",
         "found 'step_00000099'",
         chain(run_copy, write("run/checkpoints/latest", "step_00000099"))),
    Case("resume-other-model", "checkpoints", "resuming with a different model size", TRAIN,
         (*RESUME_ARGS, "model.overrides.d_model=48"),
         (f"{CKPT}/mp_rank_00_model_states.pt", "embedding.weight", "model.overrides.d_model"),
         "expected [300, 32] (as in the checkpoint)", "found [300, 48]", run_copy),
    Case("resume-other-global-batch", "checkpoints", "resuming with another global batch",
         TRAIN, (*RESUME_ARGS, "data.micro_batch_size=4"),
         (CKPT, "data.micro_batch_size", "deepspeed.gradient_accumulation_steps"),
         "expected a global batch of 8 sequences", "found 4 (4 x 1 x 1)", run_copy),
    Case("resume-missing-optimizer-state", "checkpoints", "an expert-parallel rank's optimizer "
         "state missing", TRAIN, RESUME_ARGS, (CKPT, "expp_rank_1_mp_rank_00_optim_states.pt"),
         "expected the optimizer states of 2 expert-parallel rank(s)", "found 1",
         chain(run_copy, recorded_ep_size(2))),
    Case("resume-missing-expert-file", "checkpoints", "an expert's file deleted", TRAIN,
         RESUME_ARGS, (CKPT, "layer_0_expert_5_mp_rank_00_model_states.pt"),
         "expected 8 expert files", "found 7",
         chain(run_copy, remove(f"{CKPT}/layer_0_expert_5_mp_rank_00_model_states.pt"))),
    Case("generate-truncated-checkpoint", "checkpoints", "a model states file cut short",
         GENERATE, ("run", "--prompt", "The"), (f"{CKPT}/mp_rank_00_model_states.pt",),
         "expected a checkpoint file saved by torch", "found",
         chain(run_copy, damage(f"{CKPT}/mp_rank_00_model_states.pt", "truncate"))),
    Case("generate-unknown-tag", "checkpoints", "--tag names no checkpoint", GENERATE,
         ("run", "--prompt", "The", "--tag", "step_7"), ("--tag", "run/checkpoints"),
         "expected one of ['step_00000001']", "found 'step_7'", run_copy),
    Case("generate-not-a-run", "checkpoints", "a directory that is not a run", GENERATE,
         ("nowhere", "--prompt", "The"), ("nowhere",), "expected a run directory",
         "found no directory", subprocess=True),
    Case("init-from-not-an-export", "checkpoints", "run.init_from names a run, not an export",
         TRAIN, (*TRAIN_ARGS, "run.init_from=run"), ("run.init_from", "run"),
         "expected an export (model.safetensors and config.json", "found none", run_copy),
    # ------------------------------------------------------------ reports
    Case("report-not-a-run", "reports", "a directory without metrics", REPORT,
         ("corpus",), ("corpus",), "expected run directories written by sparse-moe-train",
         "found none there", training_inputs, subprocess=True),
    Case("report-bad-metrics-csv", "reports", "a metrics file with a broken row", REPORT,
         ("run",), ("run/metrics/train_cross_entropy.csv:3",), "expected 'step,value'",
         "found '2,nan,oops'",
         write("run/metrics/train_cross_entropy.csv", "step,value\n1,5.5\n2,nan,oops\n")),
    # ------------------------------------------------------------ plans
    Case("plan-ep-splits-a-group", "plans", "an expert-parallel size that splits a group of "
         "experts", PLAN, ("model.preset=moe-256-h", "parallel.ep_size=32", "--world", "32"),
         ("parallel.ep_size", "MoE layer 0"), "expected a divisor of MoEConfig.num_groups=16",
         "found 32", subprocess=True),
    Case("plan-world-not-a-multiple", "plans", "a world the expert-parallel size does not "
         "divide", PLAN, ("model.preset=moe-32", "parallel.ep_size=4", "--world", "6"),
         ("--world 6", "parallel.ep_size"), "expected a divisor of the world size 6",
         "found 4"),
    Case("plan-does-not-fit", "plans", "a model too large for the device", PLAN,
         ("model.preset=moe-4096-h", "parallel.ep_size=4", "--world", "4",
          "--device-memory", "12GB"), ("--device-memory",), "expected at least",
         "found 11.18 GiB", training_inputs, code=1),
    Case("plan-bad-memory-size", "plans", "a device memory that is not a size", PLAN,
         ("model.preset=moe-32", "--device-memory", "12 bananas"), ("--device-memory",),
         "expected a size such as 80GiB", "found '12 bananas'"),
]
