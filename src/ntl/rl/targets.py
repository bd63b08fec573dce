"""Per-token number targets for RL responses (no labels in RL: we build them).

:func:`build_digit_targets` turns sampled responses and their ground truths into
a ``[B, T]`` tensor of **target token ids** aligned with the response tokens
(``ignore_index`` where NTL does not apply). Feed it as ``labels`` to the NTL losses
together with the logits that *predict* response token ``t`` (in a causal LM the
logits at position ``t - 1`` of the full sequence; verl's and TRL's log-prob
tensors are already aligned like that).

The vocabulary is the model's whole number vocabulary by default
(:func:`ntl.vocab_for_tokenizer`): the :class:`~ntl.DigitVocab` of a digit-level
tokenizer (Qwen2.5, Llama-2, Mistral), every number token ``'0'..'999'`` of a
tokenizer that writes numbers in multi-digit tokens (Llama-3, ``K = 1,110``).

Modes:

* ``"all"``: every number token of a response whose final answer is numerically
  correct targets itself (the sampled token). Works with any
  :class:`~ntl.NumberVocab`.
* ``"final_answer"``: the number tokens of the response's final answer (see
  :func:`ntl.rl.answers.extract_answer`) target the ground truth's digits aligned by
  place value (units with units, tenths with tenths; a generated digit with no
  counterpart in the truth takes ``0``; truth digits with no generated counterpart
  are dropped; signs are ignored; see :func:`ntl.rl.answers.place_value_targets`).
  A number token that writes ``w`` digits at place values ``[p, p + w)`` targets
  the token whose text is the truth's digits at those places, zero-padded (looked up
  with :meth:`ntl.NumberVocab.id_of_text`; no such token: no target there). With
  Llama-3 (``'123' '4'`` for 1234): response ``#### 1234`` vs truth 1234 ->
  ``'123' '4'``; vs 1299 -> ``'129' '9'``; ``#### 999`` vs 1234 -> ``'234'``;
  ``#### 12345`` (``'123' '45'``) vs 12399 -> ``'123' '99'``; ``#### 42`` vs 7 ->
  ``'07'``. A digit-level tokenizer is the ``w = 1`` case: ``#### 123`` vs 45 ->
  ``0 4 5``. Correct and wrong responses both get targets.

How ``final_answer`` finds the answer's tokens without a Python loop over tokens:
the response text is decoded (or given), the answer's character span found by
regex; ``n_before`` = ASCII digits in the text before the span, ``n_ans`` = digits
inside it. With the width ``w_t`` of each number token (digits it writes, 0 for
other tokens) and ``c_t = sum_{s < t} w_s`` (a cumsum), token ``t`` is in the answer
when ``n_before <= c_t`` and ``c_t + w_t <= n_before + n_ans``; its target is entry
``[w_t - 1, c_t - n_before]`` of a small per-sample host table ``[max_width, n_ans]``
(the id of the truth's digits ``r .. r + w - 1`` of the aligned digit string), taken
by one gather. Per sample we check that the text has as many ASCII digits as the
response's number tokens write (``sum_t w_t``); a sample where they differ gets no
targets and a warning on ``logging.getLogger("ntl")``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from .._docs import shared_docs
from ..vocab import NumberVocab, resolve_vocab, vocab_for_tokenizer
from .answers import Answer, answers_equal, extract_answer, parse_ground_truth, place_value_targets

__all__ = ["TargetInfo", "build_digit_targets", "count_ascii_digits", "digit_token_mask",
           "keep_decimal_points"]

logger: logging.Logger = logging.getLogger("ntl")

MODES = ("final_answer", "all")


def count_ascii_digits(text: str) -> int:
    r"""Number of ASCII digit characters ``0-9`` in ``text``.

    Args:
        text: any string.

    Returns:
        The count.

    Example:
        >>> from ntl.rl.targets import count_ascii_digits
        >>> count_ascii_digits("x = 1,234.5 (\u0663)")  # the Arabic-Indic three is no ASCII digit
        5
    """
    return sum(text.count(d) for d in "0123456789")


def digit_token_mask(
    ids: torch.Tensor, vocab: NumberVocab, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool tensor shaped like ``ids``: True at number tokens of ``vocab`` (and inside
    ``response_mask`` when given). No host sync.

    Args:
        ids: integer token ids.
        vocab: the :class:`~ntl.NumberVocab` whose tokens count.
        response_mask: optional mask shaped like ``ids`` (nonzero: inside the response).

    Returns:
        The bool mask.

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.targets import digit_token_mask
        >>> ids = torch.tensor([[10, 1, 2, 11]])
        >>> digit_token_mask(ids, ntl.DigitVocab(range(10), 12), torch.tensor([[1, 1, 0, 1]]))
        tensor([[False,  True, False, False]])
    """
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
        excluded: indices of samples skipped because the decoded text's ASCII digit
            count differs from the digits written by the row's number tokens
            (``final_answer`` only).
        n_targets: number of targeted positions per sample.

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.targets import build_digit_targets
        >>> vocab = ntl.DigitVocab(range(10), 12)
        >>> _, info = build_digit_targets(torch.tensor([[10, 4, 2]]), ["42"], vocab,
        ...                               responses=["#### 42"], return_info=True)
        >>> info
        TargetInfo(preds=['42'], correct=[True], excluded=[], n_targets=[2])
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


def _resolve(tokenizer: Any, vocab: Any, responses: Any) -> tuple[Any, NumberVocab]:
    if isinstance(tokenizer, NumberVocab):  # the third argument may be a vocab
        if vocab is not None:
            raise ValueError("pass the vocab either positionally or as vocab=, not both")
        tokenizer, vocab = None, tokenizer
    if tokenizer is None and responses is None:
        raise ValueError("build_digit_targets needs a tokenizer to decode responses, or responses=")
    if vocab is None:
        if tokenizer is None:
            raise ValueError("build_digit_targets needs a tokenizer or vocab= to know the number tokens")
        vocab = vocab_for_tokenizer(tokenizer)
    else:
        vocab = resolve_vocab(vocab)
    return tokenizer, vocab


class _Widths:
    """Digit widths of a vocab's tokens and the text -> id lookup ``final_answer`` needs.

    A vocab without :attr:`~ntl.NumberVocab.texts` is accepted only when every value is
    a digit ``0..9`` (each token writes one digit; the first token of each value in vocab
    order stands for it); otherwise the widths are unknown: ``ValueError``.
    """

    def __init__(self, vocab: NumberVocab) -> None:
        self.vocab = vocab
        if vocab.texts is not None:
            self.max_width = vocab.max_width
            self._by_text: dict[str, int] | None = None
        elif all(v in tuple(float(d) for d in range(10)) for v in vocab.values):
            self.max_width = 1
            by_text: dict[str, int] = {}
            for i, v in zip(vocab.token_ids, vocab.values, strict=True):
                by_text.setdefault(str(int(v)), i)
            self._by_text = by_text
        else:
            raise ValueError(
                f"mode='final_answer' needs the digit width of every number token, but {vocab!r} was "
                "built without token texts and has tokens whose values are not single digits "
                "(multi-digit tokens such as '123'); build it with NumberVocab.from_tokenizer(tok) "
                "(or ntl.vocab_for_tokenizer(tok)), or pass texts= to NumberVocab"
            )

    def on(self, device: torch.device) -> torch.Tensor:
        """``[K]`` int64 widths in vocab order on ``device``."""
        if self._by_text is None:
            return self.vocab.widths_on(device)
        return torch.ones(self.vocab.K, dtype=torch.long, device=device)

    def id_of_text(self, text: str) -> int | None:
        if self._by_text is None:
            return self.vocab.id_of_text(text)
        return self._by_text.get(text)


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
@shared_docs
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
    """Number-token targets ``[B, T]`` (token ids, ``ignore_index`` elsewhere) for RL responses.

    Rule (``final_answer``): with ``d`` the truth's digits aligned to the answer's
    written digits (:func:`ntl.rl.answers.place_value_targets`), a number token writing
    the answer's digits ``r .. r + w - 1`` targets the token with text
    ``d[r] ... d[r + w - 1]``.

    Examples: Qwen2.5 (digit-level), response ``"... #### 123"`` with truth ``"45"``
    gives the tokens ``1 2 3`` the targets ``'0' '4' '5'`` (hundreds has no
    counterpart). Llama-3: ``#### 1234`` (``'123' '4'``) vs 1299 -> ``'129' '9'``;
    ``#### 999`` vs 1234 -> ``'234'``; ``#### 12345`` (``'123' '45'``) vs 12399 ->
    ``'123' '99'``; ``#### 42`` vs 7 -> ``'07'``.

    Args:
        response_ids: ``[B, T]`` integer token ids of the responses (right-padded).
        ground_truths: ``B`` answers: number strings (``"1,234"``), numbers, or full
            solutions ending in ``#### N`` (see :func:`ntl.rl.answers.parse_ground_truth`).
        tokenizer: a Hugging Face tokenizer (decodes responses with
            ``skip_special_tokens=True`` when ``responses`` is None, and gives the
            vocabulary); a :class:`~ntl.NumberVocab` is accepted here too (then
            ``responses`` is required).
        mode: ``"final_answer"`` or ``"all"`` (module docstring).
        response_mask: ``[B, T]`` nonzero at real response tokens; others are never
            targeted and are left out of the decoded text. Default: all real.
        responses: decoded texts, ``responses[b]`` = the decode of row ``b``'s masked
            tokens. Saves the decode; a text whose ASCII digit count differs from the
            digits the row's number tokens write is excluded (``final_answer``) with a
            warning.
        ignore_index: the value at non-target positions.
        vocab: number vocabulary (default: ``ntl.vocab_for_tokenizer(tokenizer)``, the
            model's whole number vocabulary: the DigitVocab of a digit-level tokenizer,
            all 1,110 number tokens of Llama-3). ``final_answer`` needs each token's digit
            width: a vocab with :attr:`~ntl.NumberVocab.texts`, or one whose values are
            all single digits; ``ValueError`` otherwise.
        {flexible}
        return_info: also return a :class:`TargetInfo`.

    Returns:
        int64 ``[B, T]`` on ``response_ids.device``; with ``return_info`` a tuple.

    Raises:
        TypeError: ``response_ids`` not an integer tensor, ``ground_truths``/``responses`` not
            lists, a ground truth that is not a str or a number.
        ValueError: shapes or lengths that do not match, an unknown ``mode``, neither a
            tokenizer nor ``responses`` + ``vocab``, a ground truth that is not a number, a
            vocab without digit widths for ``final_answer``.

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.targets import build_digit_targets
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)  # '0'..'9' = ids 0..9, '####' = 10
        >>> ids = torch.tensor([[10, 1, 2, 3]])
        >>> build_digit_targets(ids, ["45"], vocab, responses=["#### 123"])
        tensor([[-100,    0,    4,    5]])
    """
    ids, mask = _check_inputs(response_ids, ground_truths, response_mask, responses, mode, ignore_index)
    tokenizer, vocab = _resolve(tokenizer, vocab, responses)
    widths = _Widths(vocab) if mode == "final_answer" else None
    B = ids.shape[0]
    truths: list[Answer] = []
    for i, gt in enumerate(ground_truths):
        try:
            truths.append(parse_ground_truth(gt))
        except (ValueError, TypeError) as e:
            raise type(e)(f"ground_truths[{i}]: {e}") from None

    k_idx = vocab.digit_index(ids, max(vocab.vocab_size, 1))
    is_num = (k_idx >= 0) & mask
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

    if widths is None:  # mode == "all"
        ok = torch.tensor(correct, dtype=torch.bool, device=ids.device)
        sel = is_num & ok[:, None]
        targets = torch.where(sel, ids.long(), torch.full_like(ids, ignore_index, dtype=torch.long))
    else:
        # w_t: digits written by token t (0 off the number tokens); c_t: digits before t
        w = torch.where(is_num, widths.on(ids.device)[k_idx.clamp_min(0)], torch.zeros_like(k_idx))
        c = w.cumsum(1) - w
        n_written = w.sum(1).tolist() if B else []  # one host sync
        W = widths.max_width
        n_before = [0] * B
        n_ans = [0] * B
        aligned: list[str] = [""] * B
        for b, (text, ans) in enumerate(zip(texts, answers, strict=True)):
            if ans is None:
                continue
            if count_ascii_digits(text) != n_written[b]:
                excluded.append(b)
                continue
            aligned[b] = "".join(str(d) for d in place_value_targets(ans, truths[b], text))
            n_before[b] = count_ascii_digits(text[: ans.span[0]])
            n_ans[b] = len(aligned[b])
        if excluded:
            logger.warning(
                "build_digit_targets: %d of %d responses excluded from final_answer targets: the "
                "decoded text's ASCII digit count differs from the digits the number tokens of %r "
                "write (samples %s); is it the tokenizer's vocabulary (ntl.vocab_for_tokenizer) and "
                "responses[b] the decode of row b?",
                len(excluded), B, vocab, excluded[:16],
            )
        L = max([1, *n_ans])
        # table[b, w - 1, r]: id of the token writing aligned[b][r : r + w] (-1: none / too long)
        table = [[[-1] * L for _ in range(W)] for _ in range(B)]
        for b, d in enumerate(aligned):
            for wi in range(W):
                for r in range(len(d) - wi):
                    tid = widths.id_of_text(d[r : r + wi + 1])
                    if tid is not None:
                        table[b][wi][r] = tid
        tab = torch.tensor(table if B else [[[-1]]], dtype=torch.long)[:B].view(B, W * L).to(ids.device)
        nb = torch.tensor(n_before, dtype=torch.long).to(ids.device)[:, None]
        na = torch.tensor(n_ans, dtype=torch.long).to(ids.device)[:, None]
        rel = c - nb
        inside = is_num & (rel >= 0) & (c + w <= nb + na)
        flat = (w - 1).clamp(0, W - 1) * L + rel.clamp(0, L - 1)
        tid = tab.gather(1, flat)
        sel = inside & (tid >= 0)
        targets = torch.where(sel, tid, torch.full_like(tid, ignore_index))
    if not return_info:
        return targets
    n_targets = sel.sum(1).tolist() if B else []
    return targets, TargetInfo(preds, correct, excluded, n_targets)


def keep_decimal_points(targets: torch.Tensor, response_ids: torch.Tensor, vocab: NumberVocab,
                        decimal_point_id: int | None, ignore_index: int = -100) -> torch.Tensor:
    """``targets`` with the response's ``'.'`` token put back where it sits between two
    number-token targets (``12.5`` written as ``'1' '2' '.' '5'``: the ``'.'`` position holds
    ``decimal_point_id`` instead of ``ignore_index``), so that a loss reading numbers from its
    labels (DEL's place weights, :func:`ntl.number_level.place_weights`) sees the answer's
    decimal point. ``'.'`` is no number token: no per-token loss reads it. ``None``: unchanged.
    No host sync.

    Args:
        targets: ``[..., T]`` target token ids (:func:`build_digit_targets`).
        response_ids: the response tokens, shaped like ``targets``.
        vocab: the :class:`~ntl.NumberVocab` of the targets.
        decimal_point_id: the ``'.'`` token id, or ``None``.
        ignore_index: the value at non-target positions.

    Returns:
        A new tensor (or ``targets`` itself when unchanged).

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.targets import keep_decimal_points
        >>> ids = torch.tensor([[1, 2, 11, 5]])  # '1' '2' '.' '5', '.' = id 11
        >>> targets = torch.tensor([[1, 2, -100, 5]])
        >>> keep_decimal_points(targets, ids, ntl.DigitVocab(range(10), 12), decimal_point_id=11)
        tensor([[ 1,  2, 11,  5]])
    """
    if decimal_point_id is None or targets.shape[-1] < 3:
        return targets
    num = vocab.digit_index(targets, max(vocab.vocab_size, 1)) >= 0
    pad = torch.zeros_like(num[..., :1])
    prev = torch.cat([pad, num[..., :-1]], -1)
    nxt = torch.cat([num[..., 1:], pad], -1)
    dot = (targets == ignore_index) & (response_ids == decimal_point_id) & prev & nxt
    return torch.where(dot, torch.full_like(targets, decimal_point_id), targets)
