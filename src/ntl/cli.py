"""``ntl`` command line: ``ntl demo``, ``ntl bench``, ``ntl vocab`` and ``ntl --version``.

``ntl vocab TOKENIZER`` is the first thing to look at when NTL stays silent: it prints the
number tokens a tokenizer has (the ids NTL reads its digit logits from), the tokenizer's size
against the model's (padded) vocabulary, how a number is tokenized, and warnings - digits that
are not single tokens, multi-digit number tokens, number tokens that carry other text.
Exit status: 0 when NTL applies (warnings or not), 1 when it cannot, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

USAGE = """usage: ntl [--version] <command> [options]

commands:
  demo    train a tiny LM on arithmetic with CE, CE+NTL-MSE, CE+NTL-W1 and compare (ntl demo --help)
  bench   speed and memory of ntl vs its peers (ntl bench --help)
  vocab   the number tokens of a tokenizer, against the model's vocabulary (ntl vocab --help)
"""

#: Offline tokenizers by name (``ntl.tokenizers``) and their models' vocabulary sizes.
OFFLINE_TOKENIZERS = {"qwen2": ("qwen2_tokenizer", 151_936), "llama3": ("llama3_tokenizer", 128_256)}

#: A string with every digit, a decimal point and a long number: how numbers come out.
SAMPLE = "3.14 + 12345 = 12348.14"


def version_line() -> str:
    """``ntl X.Y.Z (torch ..., triton ..., Python ...) at <package folder>``."""
    import platform

    import torch

    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        triton_version = "not installed"
    where = os.path.dirname(os.path.abspath(__file__))
    return (f"ntl {__version__} (torch {torch.__version__}, triton {triton_version}, "
            f"Python {platform.python_version()}) at {where}")


class VocabError(Exception):
    """A tokenizer argument that names nothing loadable (exit status 2)."""


def load_tokenizer(spec: str) -> tuple[Any, int | None, str]:
    """``(tokenizer, model vocab size or None, where the size came from)`` for ``spec``.

    ``spec`` is an offline name (``qwen2``, ``llama3``), a local tokenizer folder (its
    ``config.json``'s ``vocab_size`` is the model's, when there is one) or a name already in
    the Hugging Face cache (never downloaded). Raises :class:`VocabError` otherwise.
    """
    if spec in OFFLINE_TOKENIZERS:
        from . import tokenizers

        fn, size = OFFLINE_TOKENIZERS[spec]
        try:
            return getattr(tokenizers, fn)(), size, f"the {spec} models"
        except ImportError as e:  # the optional package that ships it is missing: a user error
            raise VocabError(str(e)) from e
    from transformers import AutoTokenizer

    if os.path.isdir(spec):
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise VocabError(f"{spec!r} is a folder but holds no tokenizer AutoTokenizer can "
                             f"load ({type(e).__name__}: {first})") from e
        size = _config_vocab_size(os.path.join(spec, "config.json"))
        return tok, size, "config.json" if size is not None else ""
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:
        names = ", ".join(OFFLINE_TOKENIZERS)
        raise VocabError(
            f"{spec!r} is not a local tokenizer folder, a tokenizer in the Hugging Face cache, "
            f"or one of the offline names {names} (nothing is downloaded; fetch it first, e.g. "
            f"`hf download {spec} --local-dir DIR`, and pass DIR)"
        ) from e
    return tok, None, ""


def _config_vocab_size(path: str) -> int | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


@dataclass
class VocabReport:
    """What :func:`vocab_report` found; ``ok`` is False when NTL cannot apply."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _ranges(ids: list[int]) -> str:
    """``[15, 16, 17, 30]`` -> ``"15..17, 30"``."""
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}..{ids[j]}")
        i = j + 1
    return ", ".join(out)


def _examples(tokens: list[str], n: int = 5) -> str:
    return ", ".join(repr(t) for t in tokens[:n]) + (", ..." if len(tokens) > n else "")


def vocab_report(tok: Any, vocab_size: int | None = None, size_source: str = "") -> VocabReport:
    """Inspect the number tokens of ``tok`` against a model vocabulary of ``vocab_size``."""
    from .vocab import DIGITS, DigitVocab, NumberVocab

    r = VocabReport()
    vocab = dict(tok.get_vocab())
    n_tok = len(tok)
    r.lines.append(f"tokenizer: {type(tok).__name__}, {n_tok:,} entries")
    if vocab_size is None:
        r.lines.append(f"model vocabulary: not given (--vocab-size V, or a config.json in the "
                       f"tokenizer folder); assuming len(tokenizer) = {n_tok:,}")
        size = n_tok
    else:
        pad = vocab_size - n_tok
        how = (f"{pad:,} more than the tokenizer (padding rows)" if pad > 0 else
               "as many as the tokenizer" if pad == 0 else f"{-pad:,} fewer than the tokenizer")
        src = f" (from {size_source})" if size_source else ""
        r.lines.append(f"model vocabulary: {vocab_size:,} logits{src}, {how}")
        size = vocab_size
        if vocab_size < n_tok:
            r.warnings.append(f"the model has {vocab_size:,} logits but the tokenizer {n_tok:,} "
                              f"entries: ids >= {vocab_size:,} can never be predicted")

    digit_ids = {d: vocab[d] for d in DIGITS if d in vocab}
    missing = [d for d in DIGITS if d not in vocab]
    if digit_ids:
        r.lines.append(f"digits '0'..'9': {len(digit_ids)} of 10 single tokens, ids "
                       f"{_ranges([digit_ids[d] for d in DIGITS if d in digit_ids])}")
    if missing:
        r.errors.append(f"the digits {missing} are not single tokens: the digit-level NTL "
                        f"(DigitVocab, what every loss takes from a tokenizer) cannot apply")
    too_big = {d: i for d, i in digit_ids.items() if i >= size}
    if too_big:
        r.errors.append(f"digit ids {sorted(too_big.values())} are >= the model vocabulary "
                        f"{size:,}: those logits do not exist")
    if not missing and not too_big:
        logging.getLogger("ntl").disabled = True  # DigitVocab's own multi-digit note: we say it below
        try:
            DigitVocab.from_tokenizer(tok, size)
            r.lines.append("DigitVocab.from_tokenizer: OK (K = 10): NTL applies to digit positions")
        except ValueError as e:  # pragma: no cover - the checks above catch what it checks
            r.errors.append(f"DigitVocab.from_tokenizer: {e}")
        finally:
            logging.getLogger("ntl").disabled = False

    numbers = sorted(((int(t), t) for t in vocab if t.isascii() and t.isdigit()), key=lambda p: (p[0], p[1]))
    multi = [t for _, t in numbers if len(t) > 1]
    if numbers:
        r.lines.append(f"number tokens (NumberVocab): {len(numbers):,}, values "
                       f"{numbers[0][0]}..{numbers[-1][0]}")
        try:
            NumberVocab.from_tokenizer(tok, size)
        except ValueError as e:
            r.errors.append(f"NumberVocab.from_tokenizer: {e}")
    if multi:
        r.warnings.append(
            f"{len(multi):,} multi-digit number tokens ({_examples(multi)}): positions that "
            "predict them take no part in the digit-level NTL (what the losses take from a "
            "tokenizer); the SFT/RL adapters and RL targets use all number tokens "
            "(ntl.vocab_for_tokenizer(tok), values up to "
            f"{max(int(t) for t in multi):,})")
    added = set(tok.get_added_vocab()) if hasattr(tok, "get_added_vocab") else set()
    mixed = sorted(t for t in vocab
                   if t not in added and any(c in DIGITS for c in t) and not t.isdigit())
    if mixed:
        r.warnings.append(f"{len(mixed):,} tokens mix digits with other text ({_examples(mixed)}): "
                          "NTL ignores them")

    try:
        ids = tok.encode(SAMPLE, add_special_tokens=False)
        pieces = " ".join(repr(tok.decode([i])) for i in ids)
        r.lines.append(f"{SAMPLE!r} -> {len(ids)} tokens: {pieces}")
        number_ids = set(digit_ids.values())
        n_digit = sum(i in number_ids for i in ids)
        n_chars = sum(c.isdigit() for c in SAMPLE)
        if n_digit < n_chars:
            r.warnings.append(f"{SAMPLE!r} puts {n_digit} of its {n_chars} digits into single-digit "
                              "tokens: the others are invisible to the digit-level NTL")
    except Exception as e:  # a tokenizer without encode/decode still gets the vocabulary report
        r.warnings.append(f"could not encode a sample: {type(e).__name__}: {e}")
    return r


def vocab_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ntl vocab",
        description="Which number tokens NTL sees in a tokenizer, against the model's vocabulary.",
    )
    p.add_argument("tokenizer", help="a local tokenizer folder, a tokenizer in the Hugging Face "
                   f"cache, or an offline name: {', '.join(OFFLINE_TOKENIZERS)}")
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="the model's (padded) vocabulary size = number of logits (default: the "
                        "folder's config.json vocab_size, the offline model's, else len(tokenizer))")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size <= 0:
        p.error(f"--vocab-size must be a positive integer, got {args.vocab_size}")
    try:
        tok, size, source = load_tokenizer(args.tokenizer)
    except VocabError as e:
        print(f"ntl vocab: error: {e}", file=sys.stderr)
        return 2
    if args.vocab_size is not None:
        size, source = args.vocab_size, "--vocab-size"
    report = vocab_report(tok, size, source)
    print(f"ntl vocab {args.tokenizer}")
    for line in report.lines:
        print(f"  {line}")
    for w in report.warnings:
        print(f"warning: {w}")
    for e in report.errors:
        print(f"error: {e}")
    print("NTL applies" if report.ok else "NTL cannot apply to this tokenizer as it is")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return int(demo_main(rest) or 0)
    if cmd == "bench":
        from .bench.harness import main as bench_main

        return int(bench_main(rest) or 0)
    if cmd == "vocab":
        return vocab_main(rest)
    print(f"ntl: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
