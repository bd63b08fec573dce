"""Per-token digit targets for RL responses (no labels in RL: we build them).

:func:`build_digit_targets` turns sampled responses and their ground truths into
a ``[B, T]`` tensor of **target token ids** aligned with the response tokens
(``ignore_index`` where NTL does not apply). Feed it as ``labels`` to the NTL losses
together with the logits that *predict* response token ``t`` (in a causal LM the
logits at position ``t - 1`` of the full sequence; verl's and TRL's log-prob
tensors are already aligned like that).

Modes:

* ``"all"``: every number token of a response whose final answer is numerically
  correct targets itself (the sampled token). Works with any
  :class:`~ntl.NumberVocab`.
* ``"final_answer"``: the digits of the response's final answer (see
  :func:`ntl.answers.extract_answer`) target the ground truth's digits aligned by
  place value (units with units, tenths with tenths; a generated digit with no
  counterpart in the truth targets ``0``; truth digits with no generated
  counterpart are dropped; signs are ignored). Correct and wrong responses both
  get targets. Needs a digit-level tokenizer (each ASCII digit one token).

How ``final_answer`` finds the answer's tokens without a Python loop over tokens:
the response text is decoded (or given), the answer's character span found by
regex; ``n_before`` = ASCII digits in the text before the span, ``n_ans`` = digits
inside it. With the running count ``c_t`` of digit tokens (a cumsum over the
digit-token mask), the answer's digit tokens are those with
``n_before <= c_t < n_before + n_ans``. Per sample we check that the text has as
many ASCII digits as the response has digit tokens; a sample where they differ
gets no targets and a warning on ``logging.getLogger("ntl")``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from .answers import Answer, answers_equal, extract_answer, parse_ground_truth, place_value_targets
from .vocab import NumberVocab, resolve_vocab

__all__ = ["TargetInfo", "build_digit_targets", "count_ascii_digits", "digit_token_mask"]

logger: logging.Logger = logging.getLogger("ntl")

MODES = ("final_answer", "all")


def count_ascii_digits(text: str) -> int:
    """Number of ASCII digit characters ``0-9`` in ``text``."""
    return sum(text.count(d) for d in "0123456789")


def digit_token_mask(
    ids: torch.Tensor, vocab: NumberVocab, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool tensor shaped like ``ids``: True at number tokens of ``vocab`` (and inside
    ``response_mask`` when given). No host sync."""
    m = vocab.digit_index(ids, max(vocab.vocab_size, 1)) >= 0
    if response_mask is not None:
        m = m & response_mask.bool()
    return m


@dataclass(frozen=True)
class TargetInfo:
    """Per-sample details of a :func:`build_digit_targets` call.

    Attributes:
        preds: extracted answer text of each response (``None``: no answer found).
        correct: whether each response's answer equals its ground truth numerically.
        excluded: indices of samples skipped because the decoded text's digit count
            differs from the number of digit tokens (``final_answer`` only).
        n_targets: number of targeted positions per sample.
    """

    preds: list[str | None]
    correct: list[bool]
    excluded: list[int]
    n_targets: list[int]


def _check_inputs(
    response_ids: Any, ground_truths: Any, response_mask: Any, responses: Any, mode: Any,
    ignore_index: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(response_ids, torch.Tensor):
        raise TypeError(f"response_ids must be a torch.Tensor, got {type(response_ids).__name__}")
    if response_ids.dtype.is_floating_point or response_ids.dtype.is_complex or response_ids.dtype == torch.bool:
        raise TypeError(f"response_ids must be an integer tensor of token ids, got {response_ids.dtype}")
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must have shape [B, T], got {tuple(response_ids.shape)}")
    B = response_ids.shape[0]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(ground_truths, (str, bytes)) or not isinstance(ground_truths, Sequence):
        raise TypeError(
            f"ground_truths must be a list of B={B} answers, got {type(ground_truths).__name__}"
        )
    if len(ground_truths) != B:
        raise ValueError(f"ground_truths has {len(ground_truths)} entries but response_ids has B={B} rows")
    if responses is not None:
        if isinstance(responses, str) or not isinstance(responses, Sequence):
            raise TypeError(f"responses must be a list of B={B} strings, got {type(responses).__name__}")
        if len(responses) != B:
            raise ValueError(f"responses has {len(responses)} entries but response_ids has B={B} rows")
        bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
        if bad:
            raise TypeError(f"responses must hold strings; entry {bad[0]} is {type(responses[bad[0]]).__name__}")
    if response_mask is None:
        mask = torch.ones_like(response_ids, dtype=torch.bool)
    else:
        if not isinstance(response_mask, torch.Tensor):
            raise TypeError(f"response_mask must be a torch.Tensor or None, got {type(response_mask).__name__}")
        if response_mask.shape != response_ids.shape:
            raise ValueError(
                f"response_mask shape {tuple(response_mask.shape)} does not match response_ids "
                f"shape {tuple(response_ids.shape)}"
            )
        if response_mask.device != response_ids.device:
            raise ValueError(
                f"response_mask is on {response_mask.device} but response_ids are on {response_ids.device}"
            )
        mask = response_mask != 0
    return response_ids, mask


def _resolve(tokenizer: Any, vocab: Any, responses: Any, mode: str) -> tuple[Any, NumberVocab]:
    if isinstance(tokenizer, NumberVocab):  # the third argument may be a vocab
        if vocab is not None:
            raise ValueError("pass the vocab either positionally or as vocab=, not both")
        tokenizer, vocab = None, tokenizer
    if tokenizer is None and responses is None:
        raise ValueError("build_digit_targets needs a tokenizer to decode responses, or responses=")
    if vocab is None:
        if tokenizer is None:
            raise ValueError("build_digit_targets needs a tokenizer or vocab= to know the digit tokens")
        vocab = resolve_vocab(tokenizer)
        if mode == "final_answer":
            full = NumberVocab.from_tokenizer(tokenizer)
            if full.K > 10:
                raise ValueError(
                    f"mode='final_answer' needs a digit-level tokenizer (each digit one token); "
                    f"{type(tokenizer).__name__} has {full.K} number tokens (multi-digit numbers "
                    "such as Llama-3's '123'). Use mode='all' with vocab=NumberVocab.from_tokenizer(tok)."
                )
    else:
        vocab = resolve_vocab(vocab)
    if mode == "final_answer" and not vocab.is_digit_vocab:
        raise ValueError(
            f"mode='final_answer' needs a DigitVocab (values 0..9), got {vocab!r} "
            "(a multi-digit number vocabulary); use mode='all' for it"
        )
    return tokenizer, vocab


# The type of the result follows ``return_info`` (overloads for type checkers only).
@overload
def build_digit_targets(
    response_ids: torch.Tensor, ground_truths: Sequence[str | int | float], tokenizer: Any = ..., *,
    mode: str = ..., response_mask: torch.Tensor | None = ..., responses: Sequence[str] | None = ...,
    ignore_index: int = ..., vocab: NumberVocab | None = ..., flexible: bool = ...,
    return_info: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def build_digit_targets(
    response_ids: torch.Tensor, ground_truths: Sequence[str | int | float], tokenizer: Any = ..., *,
    mode: str = ..., response_mask: torch.Tensor | None = ..., responses: Sequence[str] | None = ...,
    ignore_index: int = ..., vocab: NumberVocab | None = ..., flexible: bool = ...,
    return_info: Literal[True],
) -> tuple[torch.Tensor, TargetInfo]: ...
@overload
def build_digit_targets(
    response_ids: torch.Tensor, ground_truths: Sequence[str | int | float], tokenizer: Any = ..., *,
    mode: str = ..., response_mask: torch.Tensor | None = ..., responses: Sequence[str] | None = ...,
    ignore_index: int = ..., vocab: NumberVocab | None = ..., flexible: bool = ...,
    return_info: bool = ...,
) -> torch.Tensor | tuple[torch.Tensor, TargetInfo]: ...
def build_digit_targets(
    response_ids: torch.Tensor,
    ground_truths: Sequence[str | int | float],
    tokenizer: Any = None,
    *,
    mode: str = "final_answer",
    response_mask: torch.Tensor | None = None,
    responses: Sequence[str] | None = None,
    ignore_index: int = -100,
    vocab: NumberVocab | None = None,
    flexible: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TargetInfo]:
    """Digit targets ``[B, T]`` (token ids, ``ignore_index`` elsewhere) for RL responses.

    Args:
        response_ids: ``[B, T]`` integer token ids of the responses (right-padded).
        ground_truths: ``B`` answers: number strings (``"1,234"``), numbers, or full
            solutions ending in ``#### N`` (see :func:`ntl.answers.parse_ground_truth`).
        tokenizer: a Hugging Face tokenizer (decodes responses with
            ``skip_special_tokens=True`` when ``responses`` is None, and gives the
            :class:`~ntl.DigitVocab`); a :class:`~ntl.NumberVocab` is accepted here too
            (then ``responses`` is required).
        mode: ``"final_answer"`` or ``"all"`` (module docstring).
        response_mask: ``[B, T]`` nonzero at real response tokens; others are never
            targeted and are left out of the decoded text. Default: all real.
        responses: decoded texts, ``responses[b]`` = the decode of row ``b``'s masked
            tokens. Saves the decode; a text whose digit count does not match the
            row's digit tokens is excluded (``final_answer``) with a warning.
        ignore_index: value at non-target positions.
        vocab: number vocabulary (default: ``resolve_vocab(tokenizer)``, the
            DigitVocab). ``final_answer`` needs digit values 0..9 (``ValueError``
            otherwise, also for tokenizers with multi-digit number tokens).
        flexible: answer extraction falls back to the last number in the text.
        return_info: also return a :class:`TargetInfo`.

    Returns:
        int64 ``[B, T]`` on ``response_ids.device``; with ``return_info`` a tuple.

    Example (Qwen2.5): response ``"... #### 123"`` with truth ``"45"`` gives the
    tokens ``1 2 3`` the targets ``'0' '4' '5'`` (hundreds has no counterpart).
    """
    ids, mask = _check_inputs(response_ids, ground_truths, response_mask, responses, mode, ignore_index)
    tokenizer, vocab = _resolve(tokenizer, vocab, responses, mode)
    B = ids.shape[0]
    truths: list[Answer] = []
    for i, gt in enumerate(ground_truths):
        try:
            truths.append(parse_ground_truth(gt))
        except (ValueError, TypeError) as e:
            raise type(e)(f"ground_truths[{i}]: {e}") from None

    is_num = digit_token_mask(ids, vocab, mask)
    if responses is None:
        host_ids = ids.detach().cpu().numpy()
        host_mask = mask.detach().cpu().numpy()
        rows = [host_ids[b][host_mask[b]].tolist() for b in range(B)]
        texts = list(tokenizer.batch_decode(rows, skip_special_tokens=True)) if B else []
    else:
        texts = list(responses)

    answers = [extract_answer(t, flexible=flexible) for t in texts]
    preds = [a.text if a is not None else None for a in answers]
    correct = [a is not None and answers_equal(a, t) for a, t in zip(answers, truths, strict=True)]
    excluded: list[int] = []

    if mode == "all":
        ok = torch.tensor(correct, dtype=torch.bool, device=ids.device)
        sel = is_num & ok[:, None]
        targets = torch.where(sel, ids.long(), torch.full_like(ids, ignore_index, dtype=torch.long))
    else:
        n_tok = is_num.sum(1).tolist() if B else []  # one host sync
        n_before = [0] * B
        n_ans = [0] * B
        table: list[list[int]] = [[] for _ in range(B)]
        for b, (text, ans) in enumerate(zip(texts, answers, strict=True)):
            if ans is None:
                continue
            if count_ascii_digits(text) != n_tok[b]:
                excluded.append(b)
                continue
            digits = place_value_targets(ans, truths[b], text)
            n_before[b] = count_ascii_digits(text[: ans.span[0]])
            n_ans[b] = len(digits)
            table[b] = digits
        if excluded:
            logger.warning(
                "build_digit_targets: %d of %d responses excluded from final_answer targets: the "
                "decoded text's ASCII digit count differs from the number of digit tokens "
                "(samples %s); is the tokenizer digit-level and responses[b] the decode of row b?",
                len(excluded), B, excluded[:16],
            )
        L = max([1, *n_ans])
        tab = torch.tensor(
            [row + [0] * (L - len(row)) for row in table] if B else [[0]],
            dtype=torch.long,
        )[:B].to(ids.device)
        nb = torch.tensor(n_before, dtype=torch.long).to(ids.device)
        na = torch.tensor(n_ans, dtype=torch.long).to(ids.device)
        rel = is_num.long().cumsum(1) - 1 - nb[:, None]
        sel = is_num & (rel >= 0) & (rel < na[:, None])
        digit = tab.gather(1, rel.clamp(0, L - 1))
        digit_ids = vocab.ids(ids.device)  # sorted by value: digit d -> ids[d]
        targets = torch.where(sel, digit_ids[digit], torch.full_like(digit, ignore_index))
    if not return_info:
        return targets
    n_targets = sel.sum(1).tolist() if B else []
    return targets, TargetInfo(preds, correct, excluded, n_targets)
