"""``sparse-moe-translate``: translate a text file with a trained translation model.

    sparse-moe-translate runs/gnmt -i test.en -o test.hyp.de --beam-size 4 --length-penalty 0.6
    sparse-moe-translate runs/gnmt -i test.en -o test.hyp.de --references test.de   # and BLEU

One sentence per line in, one translation per line out (an empty line stays empty). Loads the
run's latest (or ``--tag``) checkpoint, or an export (``sparse-moe-export``), into one process,
as ``sparse-moe-generate`` does; sentences are encoded with the run's tokenizer (or
``--tokenizer``, checked against the run's corpus), sorted by length and decoded in batches of
``--batch-size`` with beam search, the trainer's BLEU decoding. Beam size, length penalty and
maximum length default to the run's ``decode`` section. The output is written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from sparse_moe.atomic import atomic_write
from sparse_moe.config_io import ConfigError
from sparse_moe.data import CorpusError, TokenizerError
from sparse_moe.models import beam_search
from sparse_moe.train.checkpoint.errors import CheckpointError, ExportError
from sparse_moe.train.distributed import shut_down_distributed
from sparse_moe.train.tasks import TranslationTask
from sparse_moe.train.trained import load_trained


class TranslateError(ValueError):
    """Bad input to ``sparse-moe-translate``: the message names the file and what is wrong."""


def read_lines(path: Path) -> list[str]:
    """The file's lines, strictly UTF-8 (a wrong encoding would translate garbage)."""
    if not path.is_file():
        raise TranslateError(f"{path}: expected a text file of sentences (one per line), "
                             "found no file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise TranslateError(f"{path}: line {line} is not UTF-8 (byte {error.start}: "
                             f"{data[error.start:error.start + 4]!r}); convert the file, e.g. "
                             f"iconv -f latin1 -t utf-8") from None
    return text.splitlines()


def encode_sources(lines: list[str], tokenizer: Any, eos_id: int) -> list[list[int]]:
    """Token ids as ``encode-parallel`` writes a source sentence: its pieces, then EOS (a blank
    line gives EOS alone, and is not translated)."""
    return [list(ids) + [eos_id] if line.strip() else [eos_id]
            for line, ids in zip(lines, tokenizer.encode_batch(lines))]


def batches_by_length(sources: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of the non-empty sentences, longest first, in runs of ``batch_size``."""
    order = sorted((i for i, ids in enumerate(sources) if len(ids) > 1),
                   key=lambda i: (-len(sources[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def translate_lines(model: torch.nn.Module, tokenizer: Any, lines: list[str], pad_id: int,
                    eos_id: int, beam_size: int, length_penalty: float, max_length: int,
                    batch_size: int, device: torch.device) -> list[str]:
    sources = encode_sources(lines, tokenizer, eos_id)
    out = [""] * len(lines)
    for indices in batches_by_length(sources, batch_size):
        longest = max(len(sources[i]) for i in indices)
        batch = torch.full((len(indices), longest), pad_id, dtype=torch.long)
        for row, i in enumerate(indices):
            batch[row, :len(sources[i])] = torch.tensor(sources[i])
        hypotheses = beam_search(model, batch.to(device), beam_size, max_length,
                                 alpha=length_penalty)
        for i, hyp in zip(indices, hypotheses):
            out[i] = tokenizer.decode(hyp.tokens)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-moe-translate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a translation run's directory, or an export")
    parser.add_argument("-i", "--input", type=Path, required=True, help="source sentences")
    parser.add_argument("-o", "--output", type=Path, required=True, help="translations")
    parser.add_argument("--beam-size", type=int, default=None, help="default: decode.beam_size")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="GNMT's alpha; default: decode.length_penalty")
    parser.add_argument("--max-length", type=int, default=None, help="default: decode.max_length")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences decoded at once")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer file to use instead of the run's (checked against its corpus)")
    parser.add_argument("--references", type=Path, default=None,
                        help="reference translations (one per line): print sacrebleu's BLEU")
    parser.add_argument("--corpus", default=None,
                        help="the parallel corpus (its manifest gives the special ids); default: "
                             "the run's data.corpus (needed for an export)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Fails before loading anything: sizes must be positive, the output's folder must exist."""
    for name in ("beam_size", "max_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TranslateError(f"--{name.replace('_', '-')}: expected a positive integer, "
                                 f"found {value}")
    if not args.output.parent.is_dir():
        raise TranslateError(f"{args.output}: expected an existing folder for the output, found "
                             f"no folder {args.output.parent}")


def translate(args: argparse.Namespace) -> dict[str, Any]:
    check_options(args)
    lines = read_lines(args.input)
    references = read_lines(args.references) if args.references else None
    if references is not None and len(references) != len(lines):
        raise TranslateError(f"{args.references}: expected {len(lines)} reference lines (one per "
                             f"line of {args.input}), found {len(references)}")
    overrides = [f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []
    overrides += [f"data.corpus={args.corpus}"] if args.corpus else []
    engine, task, tokenizer, device = load_trained(args.run_dir, args.tag, overrides)
    if not isinstance(task, TranslationTask):
        raise TranslateError(f"{args.run_dir}: expected a translation run, found a language "
                             "model (use sparse-moe-generate)")
    decode = task.config.decode
    beam = args.beam_size or decode.beam_size
    alpha = decode.length_penalty if args.length_penalty is None else args.length_penalty
    started = time.perf_counter()
    with torch.no_grad():
        hypotheses = translate_lines(engine.module, tokenizer, lines, task.corpus.pad_id,
                                     task.corpus.eos_id, beam, alpha,
                                     args.max_length or decode.max_length, args.batch_size, device)
    seconds = time.perf_counter() - started
    atomic_write(args.output, "".join(h + "\n" for h in hypotheses))
    result: dict[str, Any] = {"sentences": len(lines), "seconds": seconds, "beam_size": beam,
                              "length_penalty": alpha}
    if references is not None:
        result["bleu"] = float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = translate(args)
    except (TranslateError, ConfigError, CorpusError, TokenizerError, CheckpointError,
            ExportError) as error:
        print(f"sparse-moe-translate: {error}", file=sys.stderr)
        return 2
    finally:
        shut_down_distributed()
    line = (f"translated {result['sentences']} sentences in {result['seconds']:.1f} s "
            f"(beam {result['beam_size']}, length penalty {result['length_penalty']}) "
            f"-> {args.output}")
    if "bleu" in result:
        line += f"; BLEU {result['bleu']:.2f} (sacrebleu, 13a)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
