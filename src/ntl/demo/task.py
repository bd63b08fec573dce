"""The demo's synthetic arithmetic task: tokenizer, problems, answer parser, metrics.

Task (fixed; see ``docs/demo.md``): ``"<bos>" + A + op + B + "=" + C + "<eos>"`` with
``op`` in ``{"+", "*"}``, ``a, b`` uniform in ``[0, 10**d_op)``, the operands
zero-padded to ``width = max d_op`` characters (so every prompt has the same length
and greedy decoding batches without padding) and the answer ``c = a op b`` written
in natural order (most significant digit first) without leading zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CharTokenizer",
    "Problem",
    "answer_metrics",
    "build_batch",
    "digit_accuracy",
    "make_problems",
    "mean_absolute_error",
    "parse_answer",
]

OPS = ("+", "*")
_INT_RE = re.compile(r"-?[0-9]+")


class CharTokenizer:
    """A character-level tokenizer built in code: one token per character.

    Vocabulary: ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), the digits ``'0'..'9'``
    (3..12), ``'+'``, ``'*'``, ``'='``, ``' '``. Exposes ``get_vocab()`` and ``len()``,
    so ``ntl.DigitVocab.from_tokenizer(tok)`` finds the ten digit tokens.
    """

    specials = ("<pad>", "<bos>", "<eos>")
    chars = "0123456789+*= "

    def __init__(self) -> None:
        self._tokens = list(self.specials) + list(self.chars)
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        self.pad_token_id = self._ids["<pad>"]
        self.bos_token_id = self._ids["<bos>"]
        self.eos_token_id = self._ids["<eos>"]

    def __len__(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        """``{token_text: id}``."""
        return dict(self._ids)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no specials added)."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens appear as ``<pad>`` etc. unless skipped."""
        out = []
        for i in ids:
            t = self._tokens[int(i)]
            if skip_special_tokens and t in self.specials:
                continue
            out.append(t)
        return "".join(out)


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


def max_answer_len(digits: Mapping[str, int]) -> int:
    """Longest answer in characters: ``d + 1`` for ``+``, ``2 d`` for ``*`` (``d`` = max digits)."""
    return max((d + 1) if op == "+" else (2 * d) for op, d in digits.items())


def make_problems(n: int, digits: Mapping[str, int], seed: int,
                  exclude: set[Problem] | frozenset[Problem] = frozenset()) -> list[Problem]:
    """``n`` problems from a seeded generator (``numpy`` PCG64).

    ``digits`` maps each operation (``"+"``, ``"*"``) to its operands' maximum number
    of digits ``d``; the operation is uniform over the keys, the operands uniform in
    ``[0, 10**d)``. Problems in ``exclude`` are skipped. Deterministic for given
    arguments.
    """
    ops = list(digits)
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"digits must map a non-empty subset of {OPS} to digit counts, got {digits}")
    for op, d in digits.items():
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"digits[{op!r}] must be an int >= 1, got {d!r}")
    rng = np.random.default_rng(seed)
    out: list[Problem] = []
    while len(out) < n:
        m = n - len(out)
        op_idx = rng.integers(0, len(ops), size=m).tolist()
        u = rng.random(size=(m, 2)).tolist()
        for o, (x, y) in zip(op_idx, u, strict=False):
            hi = 10 ** digits[ops[o]]
            p = Problem(int(x * hi), ops[o], int(y * hi))
            if p not in exclude:
                out.append(p)
    return out


def build_batch(problems: Sequence[Problem], tok: CharTokenizer, width: int,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[B, length]``, right-padded with ``<pad>``.

    ``labels`` holds the token id on the answer tokens and the final ``<eos>``, and
    ``-100`` on ``<bos>``, the prompt and padding (the loss sees only the answer).
    Labels are aligned with ``input_ids``: the causal shift is done by the trainer.
    """
    ids = torch.full((len(problems), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), length), -100, dtype=torch.long)
    for r, p in enumerate(problems):
        prompt = [tok.bos_token_id, *tok.encode(p.prompt(width))]
        answer = [*tok.encode(str(p.answer)), tok.eos_token_id]
        seq = prompt + answer
        if len(seq) > length:
            raise ValueError(f"sequence length {len(seq)} exceeds length={length}")
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, labels


# ---------------------------------------------------------------------------
# Parsing and metrics (on decoded answer texts)
# ---------------------------------------------------------------------------


def parse_answer(text: str) -> int | None:
    """The integer an answer text denotes, or ``None`` if it is unparsable.

    Rule: strip surrounding whitespace; the rest must be an optional ``-`` followed by
    one or more ASCII digits, nothing else. Leading zeros are allowed
    (``"007"`` -> 7). ``""``, ``"12a"``, ``"1 2"``, ``"+5"``, ``"<pad>"`` -> ``None``.
    """
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        return None
    return int(s)


def digit_accuracy(text: str, truth: int) -> float:
    """Place-value digit accuracy of one answer: ``matches / max(len(p), len(t))``.

    ``p`` is the digit string of the parsed answer as written (sign dropped, leading
    zeros kept), ``t = str(abs(truth))``; both are right-aligned (units with units)
    and a digit position present in only one of them counts as wrong. An unparsable
    answer scores 0. Example: ``"579"`` vs 579 -> 1; ``"589"`` vs 579 -> 2/3;
    ``"57"`` vs 579 -> 0/3 (5 != 7 and 7 != 9 after right alignment); ``"007"`` vs 7 -> 1/3.
    """
    if parse_answer(text) is None:
        return 0.0
    p = text.strip().lstrip("-")
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
    errs = [abs(p - t) for p, t in zip(preds, truths, strict=False) if p is not None]
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
    errs = [abs(p - t) for p, t in zip(preds, truths, strict=False) if p is not None]
    return {
        "exact_match": sum(1 for p, t in zip(preds, truths, strict=False) if p is not None and p == t) / n,
        "mae": mean_absolute_error(preds, truths),
        "median_ae": float(np.median(errs)) if errs else None,
        "digit_accuracy": sum(digit_accuracy(x, t) for x, t in zip(texts, truths, strict=False)) / n,
        "unparsable": sum(1 for p in preds if p is None) / n,
        "n": n,
    }
