"""``python -m data_prep`` (console script ``sparse-moe-data``): tokenizers and token corpora."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .sources import DOC_MODES, ERROR_POLICIES, FORMATS, DataPrepError, SourceSpec

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M', '1.5G', '4096' (bytes) -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 64K, 256M or 1G; found {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _add_source_args(parser: argparse.ArgumentParser, inputs: bool = True) -> None:
    if inputs:
        parser.add_argument("--input", "-i", nargs="+", required=True,
                            help="files (text, .gz, .jsonl, .parquet, .csv, .arrow), a dataset "
                                 "directory saved with save_to_disk, or a hub name (--format hub)")
        parser.add_argument("--format", default="auto", choices=FORMATS)
        parser.add_argument("--field", default="text", help="text field of JSON/Parquet/datasets rows")
        parser.add_argument("--doc-per", dest="doc_mode", default="line", choices=DOC_MODES,
                            help="a document per line, or per blank-line separated paragraph")
        parser.add_argument("--dataset-split", default="train")
        parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument("--errors", default="error", choices=ERROR_POLICIES,
                        help="bytes that do not decode: fail, replace with U+FFFD, or skip the "
                             "line (both counted in the manifest)")


def _spec(args: argparse.Namespace) -> SourceSpec:
    return SourceSpec(inputs=args.input, format=args.format, field=args.field,
                      doc_mode=args.doc_mode, encoding=args.encoding, errors=args.errors,
                      dataset_split=args.dataset_split, dataset_config=args.dataset_config)


def _add_encode_args(parser: argparse.ArgumentParser, eos_default: str = "document") -> None:
    parser.add_argument("--tokenizer", "-t", required=True,
                        help="SentencePiece .model, or a word vocabulary file")
    parser.add_argument("--output", "-o", required=True, help="corpus directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eos", default=eos_default, choices=("document", "line", "none"),
                        help="append an end-of-sentence token after each document, each line, "
                             "or never")
    parser.add_argument("--shard-size", type=parse_size, default=256 << 20,
                        help="target shard size in bytes of tokens (e.g. 256M)")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="parallel encoders (threads for SentencePiece, else processes)")
    parser.add_argument("--engine", default="auto", choices=("auto", "threads", "processes"),
                        help="how --num-proc encoders run; auto: threads for SentencePiece "
                             "(it encodes without holding the GIL), processes otherwise")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different corpus or split already in --output")
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a SentencePiece model")
    _add_source_args(tok)
    tok.add_argument("--model-prefix", required=True, help="writes PREFIX.model/.vocab/.json")
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "word", "char"))
    tok.add_argument("--character-coverage", type=float, default=0.9995)
    tok.add_argument("--byte-fallback", action="store_true")
    tok.add_argument("--input-sentence-size", type=int, default=0,
                     help="train on a random sample of this many sentences (0: all)")
    tok.add_argument("--no-shuffle", action="store_true", help="take the first sentences instead")
    tok.add_argument("--num-threads", type=int, default=2)
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--pad-id", type=int, default=-1)

    enc = sub.add_parser("encode", help="encode text into sharded Megatron-format token files")
    _add_source_args(enc)
    _add_encode_args(enc)

    par = sub.add_parser("encode-parallel", help="encode aligned translation data")
    _add_source_args(par, inputs=False)
    par.add_argument("--source", help="source-side file, one sentence per line")
    par.add_argument("--target", help="target-side file, aligned line by line")
    par.add_argument("--tsv", help="one file of 'source<TAB>target' lines instead")
    par.add_argument("--src-lang", default="src")
    par.add_argument("--tgt-lang", default="tgt")
    _add_encode_args(par)

    lm = sub.add_parser("lm1b", help="the One Billion Word benchmark with its standard split")
    lm.add_argument("--root", required=True, help="directory holding "
                    "training-monolingual.tokenized.shuffled/ and heldout-monolingual.tokenized.shuffled/")
    lm.add_argument("--output", "-o", required=True)
    lm.add_argument("--tokenizer", default=None,
                    help="SentencePiece model; default: the word-level vocabulary built from training")
    lm.add_argument("--min-count", type=int, default=3)
    lm.add_argument("--max-vocab", type=int, default=None)
    lm.add_argument("--vocab-from", default="train", choices=("train", "valid", "test"))
    lm.add_argument("--shard-size", type=parse_size, default=256 << 20)
    lm.add_argument("--num-proc", type=int, default=1)
    lm.add_argument("--overwrite", action="store_true")
    lm.add_argument("--no-progress", action="store_true")

    ver = sub.add_parser("verify", help="check every shard against the manifest")
    ver.add_argument("corpus")

    ins = sub.add_parser("inspect", help="counts and a few decoded samples")
    ins.add_argument("corpus")
    ins.add_argument("--tokenizer", default=None, help="default: the file named in the manifest")
    ins.add_argument("--samples", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = ["python -m data_prep"] + list(sys.argv[1:] if argv is None else argv)
    try:
        return _COMMANDS[args.command](args, command)
    except (DataPrepError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment, not the input: permissions, a full disk
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def _tokenizer(args, command) -> int:
    from .train_tokenizer import TokenizerOptions, train_tokenizer

    options = TokenizerOptions(
        model_prefix=args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size, shuffle_input_sentence=not args.no_shuffle,
        num_threads=args.num_threads, seed=args.seed, pad_id=args.pad_id)
    record = train_tokenizer(_spec(args), options)
    print(f"tokenizer: {record['model']} (vocabulary {record['vocab_size']}, sha256 "
          f"{record['sha256'][:16]}...)")
    if args.pad_id < 0:
        print("note: no --pad-id, so this tokenizer has no padding id: fine for language-model "
              "corpora, but translation corpora (encode-parallel) need one; train with "
              "--pad-id 3 (after <unk>, <s>, </s>) for translation", file=sys.stderr)
    return 0


def _encode_options(args, split: str | None = None):
    from .encode import EncodeOptions

    return EncodeOptions(tokenizer=args.tokenizer, output=args.output, split=split or args.split,
                         eos=args.eos, shard_bytes=args.shard_size, num_proc=args.num_proc,
                         overwrite=args.overwrite, progress=not args.no_progress,
                         engine=getattr(args, "engine", "auto"))


def _encode(args, command) -> int:
    from .jobs import encode_corpus

    summary, manifest = encode_corpus(_spec(args), _encode_options(args), command)
    _report(summary, manifest, [args.split], args.output)
    return 0


def _encode_parallel(args, command) -> int:
    from sparse_moe.data import load_tokenizer

    from .jobs import encode_parallel

    if load_tokenizer(args.tokenizer).pad_id < 0:  # before any shard is written
        raise DataPrepError(f"--tokenizer {args.tokenizer}: expected a tokenizer with a padding "
                            "id (translation batches pad their sentences), found none; retrain "
                            "it with data_prep tokenizer ... --pad-id 3")

    spec = SourceSpec(inputs=["-"], encoding=args.encoding, errors=args.errors)
    summary, manifest = encode_parallel(_encode_options(args), spec, args.source, args.target,
                                        args.tsv, args.src_lang, args.tgt_lang, command)
    _report(summary, manifest, list(manifest["parallel"][args.split].values()), args.output)
    return 0


def _report(summary, manifest, splits: list[str], output: str) -> None:
    if summary.already_complete:
        print(f"{output}: split(s) {', '.join(splits)} already complete; nothing to do "
              "(pass --overwrite to re-encode)")
        return
    print(summary.line())
    for split in splits:
        entry = manifest["splits"][split]
        read = entry.get("read", {})
        repaired = {k: read[k] for k in ("crlf_lines", "replaced_lines", "skipped_lines",
                                         "blank_lines") if read.get(k)}
        print(f"  {split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
              f"{len(entry['shards'])} shard(s), dtype {manifest['dtype']}"
              + (f"; input notes {repaired}" if repaired else ""))


def _lm1b(args, command) -> int:
    from .lm1b import prepare_lm1b

    prepare_lm1b(args.root, args.output, args.tokenizer, args.vocab_from, args.min_count,
                 args.max_vocab, args.num_proc, args.shard_size, args.overwrite,
                 not args.no_progress, command)
    return 0


def _verify(args, command) -> int:
    from sparse_moe.data.corpus import verify_corpus

    report = verify_corpus(args.corpus)
    bad = 0
    for name, problems in report.items():
        print(f"{'OK  ' if not problems else 'FAIL'} {name}" +
              "".join(f"\n       {p}" for p in problems))
        bad += bool(problems)
    print(f"{len(report) - bad} ok, {bad} failed")
    return 1 if bad else 0


def _inspect(args, command) -> int:
    from sparse_moe.data.corpus import open_corpus, path_from_manifest
    from sparse_moe.data.tokenizer import load_tokenizer

    corpus = open_corpus(args.corpus)
    manifest = corpus.manifest
    tokenizer_path = args.tokenizer or path_from_manifest(manifest["tokenizer"]["file"],
                                                          args.corpus)
    tokenizer = load_tokenizer(tokenizer_path) if Path(tokenizer_path).exists() else None
    print(json.dumps({k: manifest[k] for k in ("tokenizer", "dtype")}, indent=2))
    for name, entry in manifest["splits"].items():
        print(f"split {name}: {entry.get('documents', '?')} documents, "
              f"{entry.get('tokens', '?')} tokens, {len(entry['shards'])} shard(s), "
              f"{'complete' if entry.get('complete') else 'INCOMPLETE'}")
        if not entry.get("complete"):
            continue
        for i, doc in zip(range(args.samples), corpus.split(name).documents()):
            ids = [int(t) for t in doc[:64]]
            text = tokenizer.decode(ids) if tokenizer else "(tokenizer file not found)"
            print(f"  [{i}] {len(doc)} tokens: {ids[:16]}{' ...' if len(doc) > 16 else ''}\n"
                  f"      {text[:200]!r}")
    return 0


_COMMANDS = {"tokenizer": _tokenizer, "encode": _encode, "encode-parallel": _encode_parallel,
             "lm1b": _lm1b, "verify": _verify, "inspect": _inspect}


if __name__ == "__main__":
    sys.exit(main())
