"""The demo's synthetic arithmetic task: tokenizer, problems, answer parser, metrics.

One example is ``<bos> A op B = #### C <eos>``:

* the **prompt** ``"AAA+BBB="``: ``op`` in ``{"+", "*"}``, ``a`` uniform in ``[0, 10**da)``,
  ``b`` in ``[0, 10**db)`` (``(da, db)`` per operation), both operands zero-padded to the
  widest operand, so every prompt has the same length (batches need no padding, for
  training, greedy decoding and TRL's generation alike);
* the **completion** ``"####C"``: the GSM8K final-answer marker ``####`` (one token), then
  ``c = a op b`` in natural digit order (most significant digit first, no leading zeros).
  The marker is what :func:`ntl.answers.extract_answer` and NTL's ``final_answer`` targets
  look for, so the RL stage applies to the same completions.

The tokenizer is a ``transformers.PreTrainedTokenizerFast`` built in code (nothing is
downloaded): one token per character, the ten digits each one token, plus ``####``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "MARKER",
    "OPS",
    "Problem",
    "answer_metrics",
    "build_batch",
    "corrupt_answer_digits",
    "demo_tokenizer",
    "digit_accuracy",
    "encode",
    "make_problems",
    "max_answer_len",
    "mean_absolute_error",
    "parse_answer",
    "prompt_width",
]

OPS = ("+", "*")
MARKER = "####"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TOKENS = (*"0123456789", "+", "*", "=", MARKER)
_PIECE_RE = re.compile(re.escape(MARKER) + "|.", re.DOTALL)
_ANSWER_RE = re.compile(re.escape(MARKER) + r"(-?[0-9]+)")

Digits = Mapping[str, tuple[int, int]]


def demo_tokenizer() -> Any:
    """The demo's tokenizer: ``<pad> <bos> <eos> <unk>``, ``'0'..'9'``, ``+ * =`` and ``####``.

    A ``PreTrainedTokenizerFast`` (so TRL accepts it) over a ``tokenizers`` word-level
    model whose pre-tokenizer splits ``####`` or else single characters; ``tok(text)``
    prepends ``<bos>``; decoding concatenates the pieces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIALS, *TOKENS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_RE.pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def encode(vocab: Mapping[str, int], text: str) -> list[int]:
    """Token ids of ``text`` without specials, from ``tok.get_vocab()`` (the tokenizer's
    own split, done with a dict instead of a tokenizer call per problem).

    Raises ``ValueError`` naming a character that has no token.
    """
    out = []
    for piece in _PIECE_RE.findall(text):
        i = vocab.get(piece)
        if i is None:
            raise ValueError(f"encode: {piece!r} is not a token of the demo tokenizer")
        out.append(i)
    return out


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem ``a op b``."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b

    def prompt(self, width: int) -> str:
        """``"AAA op BBB="`` with both operands zero-padded to ``width`` characters."""
        return f"{self.a:0{width}d}{self.op}{self.b:0{width}d}="

    @property
    def completion(self) -> str:
        """``"####C"``: the marker and the answer in natural digit order."""
        return f"{MARKER}{self.answer}"


def _check_digits(digits: Digits) -> None:
    ops = list(digits)
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"digits must map a non-empty subset of {OPS} to (da, db), got {digits}")
    for op, d in digits.items():
        if (not isinstance(d, tuple) or len(d) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in d)):
            raise ValueError(f"digits[{op!r}] must be a pair of ints >= 1, got {d!r}")


def prompt_width(digits: Digits) -> int:
    """Characters per operand in the prompt: the most digits of any operand."""
    _check_digits(digits)
    return max(max(d) for d in digits.values())


def max_answer_len(digits: Digits) -> int:
    """Longest answer in digits: ``max(da, db) + 1`` for ``+``, ``da + db`` for ``*``."""
    _check_digits(digits)
    return max((max(d) + 1) if op == "+" else sum(d) for op, d in digits.items())


def make_problems(n: int, digits: Digits, seed: int,
                  exclude: set[Problem] | frozenset[Problem] = frozenset()) -> list[Problem]:
    """``n`` problems from a seeded generator (``numpy`` PCG64).

    ``digits`` maps each operation (``"+"``, ``"*"``) to its operands' maximum numbers of
    digits ``(da, db)``; the operation is uniform over the keys, ``a`` uniform in
    ``[0, 10**da)``, ``b`` in ``[0, 10**db)``. Problems in ``exclude`` are skipped.
    Deterministic for given arguments.
    """
    _check_digits(digits)
    ops = list(digits)
    rng = np.random.default_rng(seed)
    out: list[Problem] = []
    while len(out) < n:
        m = n - len(out)
        op_idx = rng.integers(0, len(ops), size=m).tolist()
        u = rng.random(size=(m, 2)).tolist()
        for o, (x, y) in zip(op_idx, u, strict=True):
            da, db = digits[ops[o]]
            p = Problem(int(x * 10**da), ops[o], int(y * 10**db))
            if p not in exclude:
                out.append(p)
    return out


def build_batch(problems: Sequence[Problem], tok: Any, width: int,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[B, length]``, right-padded with ``<pad>``.

    ``input_ids`` = ``<bos>`` prompt completion ``<eos>``; ``labels`` holds the token id
    on the completion (``####`` and the answer digits) and the final ``<eos>``, ``-100``
    on ``<bos>``, the prompt and padding. Labels are aligned with ``input_ids``: the
    causal shift is the trainer's job.
    """
    vocab = tok.get_vocab()
    ids = torch.full((len(problems), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), length), -100, dtype=torch.long)
    for r, p in enumerate(problems):
        prompt = [tok.bos_token_id, *encode(vocab, p.prompt(width))]
        answer = [*encode(vocab, p.completion), tok.eos_token_id]
        seq = prompt + answer
        if len(seq) > length:
            raise ValueError(f"sequence length {len(seq)} exceeds length={length}")
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, labels


def corrupt_answer_digits(ids: torch.Tensor, labels: torch.Tensor, tok: Any, rate: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy demonstrations (an imperfect teacher): each row of a :func:`build_batch` batch
    is, with probability ``rate``, given one wrong answer digit: a position drawn uniformly
    among its answer digits (labelled digit tokens) gets a digit drawn uniformly among the
    nine others, in ``input_ids`` and ``labels`` alike (the rest of the demonstration
    follows the wrong digit, as a teacher's would). Vectorised; returns new tensors.

    Raises ``ValueError`` unless ``0 <= rate <= 1``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    import ntl

    digits = ntl.DigitVocab.from_tokenizer(tok)
    digit_ids = digits.ids()  # by value: digit_ids[d] is the token of d
    B, L = ids.shape
    val = digits.digit_index(ids)  # the digit of each token, -1 for other tokens
    answer = (labels != -100) & (val >= 0)
    hit = (torch.rand(B, generator=generator) < rate) & answer.any(1)
    col = torch.rand(B, L, generator=generator).masked_fill(~answer, -1.0).argmax(1)
    shift = torch.randint(1, 10, (B,), generator=generator)
    rows = torch.arange(B)
    wrong = digit_ids[(val[rows, col] + shift) % 10]
    ids, labels = ids.clone(), labels.clone()
    ids[rows[hit], col[hit]] = wrong[hit]
    labels[rows[hit], col[hit]] = wrong[hit]
    return ids, labels


# ---------------------------------------------------------------------------
# Parsing and metrics (on decoded completions)
# ---------------------------------------------------------------------------


def parse_answer(text: str) -> int | None:
    """The integer a completion states, or ``None`` if it is unparsable.

    Rule: strip surrounding whitespace; the rest must be ``####`` followed by an
    optional ``-`` and one or more ASCII digits, nothing else. Leading zeros are
    allowed (``"####007"`` -> 7). ``"579"`` (no marker), ``"####"``, ``"####12a"``,
    ``"####1 2"``, ``"####+5"``, ``"####5<pad>"`` -> ``None``.
    """
    m = _ANSWER_RE.fullmatch(text.strip())
    return None if m is None else int(m.group(1))


def digit_accuracy(text: str, truth: int) -> float:
    """Place-value digit accuracy of one completion: ``matches / max(len(p), len(t))``.

    ``p`` is the digit string after ``####`` as written (sign dropped, leading zeros
    kept), ``t = str(abs(truth))``; both are right-aligned (units with units) and a digit
    position present in only one of them counts as wrong. An unparsable completion
    scores 0. Examples: ``"####579"`` vs 579 -> 1; ``"####589"`` -> 2/3; ``"####57"`` ->
    0/3 (5 != 7 and 7 != 9 after right alignment); ``"####007"`` vs 7 -> 1/3.
    """
    if parse_answer(text) is None:
        return 0.0
    p = text.strip()[len(MARKER):].lstrip("-")
    t = str(abs(int(truth)))
    n = max(len(p), len(t))
    matches = sum(1 for x, y in zip(reversed(p), reversed(t), strict=False) if x == y)
    return matches / n


def mean_absolute_error(preds: Sequence[int | None], truths: Sequence[int]) -> float | None:
    """``mean |pred - truth|`` over the parsable answers (``pred is not None``).

    Unparsable answers are left out (they are counted by the unparsable fraction);
    ``None`` when no answer is parsable.
    """
    if len(preds) != len(truths):
        raise ValueError(f"preds has {len(preds)} entries but truths has {len(truths)}")
    errs = [abs(p - t) for p, t in zip(preds, truths, strict=True) if p is not None]
    if not errs:
        return None
    return float(sum(errs) / len(errs))


def answer_metrics(texts: Sequence[str], truths: Sequence[int]) -> dict[str, float | int | None]:
    """Exact-match accuracy (numeric equality of the parsed answer), MAE (parsable
    answers only), median absolute error, mean digit accuracy, unparsable fraction, n."""
    if len(texts) != len(truths):
        raise ValueError(f"texts has {len(texts)} entries but truths has {len(truths)}")
    if not texts:
        raise ValueError("answer_metrics needs at least one answer")
    preds = [parse_answer(t) for t in texts]
    n = len(texts)
    errs = [abs(p - t) for p, t in zip(preds, truths, strict=True) if p is not None]
    return {
        "exact_match": sum(1 for p, t in zip(preds, truths, strict=True) if p is not None and p == t) / n,
        "mae": mean_absolute_error(preds, truths),
        "median_ae": float(np.median(errs)) if errs else None,
        "digit_accuracy": sum(digit_accuracy(x, t) for x, t in zip(texts, truths, strict=True)) / n,
        "unparsable": sum(1 for p in preds if p is None) / n,
        "n": n,
    }
