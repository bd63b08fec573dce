"""Number-level NTL (``ntloss.NumberLevelLoss``) and per-position number predictions.

Shapes: ``logits [..., T, V]``, ``labels [..., T]``: the last axis of ``labels`` is
the sequence, every leading index is its own row (numbers never run across rows).
Math in fp32 for any float input; vectorised: numbers are found with shifts,
``cummax``/``cumsum`` and ``scatter_add`` over all positions at once, with no loop
over numbers or tokens and no host sync (beyond the shared one-per-call label
check of :mod:`ntl._checks`).

A *number* is a maximal run of digit labels in a row; with ``float_level=True`` a
single ``'.'`` label between two digits joins the runs on both sides and adds
nothing (``12.34`` is scored as ``1234``, as ``ntloss`` does). For digit ``t`` of a
number with ``n`` digits, its place ``p_t`` is the count of the number's digits
after it, clamped to ``max_number_length - 1`` (``ntloss``'s clamp). With
``q_t = softmax(z_t)`` over the ten digit logits and ``e_t = sum_d d q_{t,d}``::

    y    = sum_t 10^{p_t} y_t          yhat = sum_t 10^{p_t} e_t
    L    = |yhat - y| / (|yhat| + |y| + eps)         eps = 2^-23 (fp32)   0 <= L < 1
    dL/dyhat = (sign(yhat - y) - L sign(yhat)) / (|yhat| + |y| + eps)
    dyhat/dz_{t,j} = 10^{p_t} q_{t,j} (j - e_t)

``reweigh=True``: ``L' = m L + 1.01 (1 - m)`` with ``m`` the full-softmax mass on the
digit tokens at the number's first digit (``ntloss``'s ``reweigh_fn``, ``D = 1``).

Kernels: on CUDA the digit-gather (:mod:`ntl.kernels.gather`) and, for ``reweigh``
and :func:`predict_numbers`, the number-mass kernel (:mod:`ntl.kernels.mass`, one
streaming pass per row, no ``[N, V]`` buffer kept for backward); elsewhere their
PyTorch twins. The ``[N]``-sized segment math runs on autograd.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F

from . import _checks as C
from .kernels.mass import number_mass_torch
from .kernels.reference import digit_gather_torch
from .losses import prepare_labels, use_triton
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["NumberLevelVocab", "number_level_loss", "number_level_vocab", "predict_numbers"]

_EPS = torch.finfo(torch.float32).eps
#: 10^38 is the largest power of ten in fp32 (10^39 overflows to inf).
MAX_NUMBER_LENGTH = 38


@dataclass(frozen=True)
class NumberLevelVocab:
    """What the number-level loss needs from a tokenizer, resolved once.

    ``digits``: the ten digit tokens; ``decimal_point_id``: the ``'.'`` token (used
    with ``float_level=True``), ``None`` if unknown; ``multi_digit_ids``: the
    tokenizer's multi-digit number tokens (Llama-3's ``'123'``), which a label may
    not hold: a number written with them has no per-digit place value.
    """

    digits: NumberVocab
    decimal_point_id: int | None = None
    multi_digit_ids: tuple[int, ...] = ()


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, NumberLevelVocab]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def number_level_vocab(vocab_or_tokenizer: VocabLike | NumberLevelVocab, vocab_size: int | None = None, *,
                       decimal_point_id: int | None = None,
                       default_size: int | None = None) -> NumberLevelVocab:
    """Resolve a tokenizer (or a digit vocab) for :func:`number_level_loss`; cached per tokenizer.

    Raises ``ValueError`` when the vocab is not the ten digits ``0..9`` (e.g. a
    ``NumberVocab`` with Llama-3's multi-digit tokens) or ``decimal_point_id`` is
    a digit id.
    """
    v = vocab_or_tokenizer
    if decimal_point_id is not None and (not isinstance(decimal_point_id, int)
                                         or isinstance(decimal_point_id, bool) or decimal_point_id < 0):
        raise TypeError(f"decimal_point_id must be a non-negative int token id or None, got {decimal_point_id!r}")
    if isinstance(v, NumberLevelVocab):
        spec = v
    elif hasattr(v, "get_vocab"):
        spec = _from_tokenizer(v, vocab_size)
    else:
        spec = NumberLevelVocab(resolve_vocab(v, vocab_size, default_size=default_size))
    if not spec.digits.is_digit_vocab:
        raise ValueError(
            "vocab_or_tokenizer: number_level_loss needs the ten digit tokens '0'..'9' (values 0..9), "
            f"got {spec.digits!r}. Numbers written with multi-digit tokens (Llama-3's '123') have no "
            "per-digit place value; pass the tokenizer or ntl.DigitVocab.from_tokenizer(tok)")
    if decimal_point_id is not None and decimal_point_id != spec.decimal_point_id:
        spec = NumberLevelVocab(spec.digits, decimal_point_id, spec.multi_digit_ids)
    if spec.decimal_point_id is not None and spec.decimal_point_id in spec.digits.token_ids:
        raise ValueError(f"decimal_point_id={spec.decimal_point_id} is a digit token id")
    return spec


def _from_tokenizer(tok: Any, vocab_size: int | None) -> NumberLevelVocab:
    try:
        key: tuple = (vocab_size, len(tok))
    except TypeError:
        key = (vocab_size, -1)
    try:
        with _LOCK:
            hit = _CACHE.setdefault(tok, {}).get(key)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None:
        return hit
    digits = resolve_vocab(tok, vocab_size)
    vocab = dict(tok.get_vocab())
    dot = vocab.get(".")
    multi = tuple(sorted(i for t, i in vocab.items() if len(t) > 1 and t.isascii() and t.isdigit()))
    spec = NumberLevelVocab(digits, dot if isinstance(dot, int) else None, multi)
    try:
        with _LOCK:
            _CACHE.setdefault(tok, {})[key] = spec
    except TypeError:
        pass
    return spec


def check_options(float_level: Any, max_number_length: Any, reweigh: Any,
                  decimal_point_id: Any = None) -> None:
    """Types and range of the number-level flags (``TypeError``/``ValueError`` naming them)."""
    for name, flag in (("float_level", float_level), ("reweigh", reweigh)):
        C.check_bool(name, flag)
    if decimal_point_id is not None and not float_level:
        raise ValueError("decimal_point_id is used only with float_level=True (a '.' joins digits "
                         "into one number only then)")
    if not isinstance(max_number_length, int) or isinstance(max_number_length, bool):
        raise TypeError(f"max_number_length must be an int, got {type(max_number_length).__name__}")
    if not 1 <= max_number_length <= MAX_NUMBER_LENGTH:
        raise ValueError(f"max_number_length must lie in [1, {MAX_NUMBER_LENGTH}] (10^38 is fp32's "
                         f"largest power of ten), got {max_number_length}")


def decimal_point(spec: NumberLevelVocab, float_level: bool, V: int | None = None,
                  ignore_index: int | None = None) -> int | None:
    """The ``'.'`` id joining numbers (``None`` unless ``float_level``); ``ValueError`` if unusable."""
    if not float_level:
        return None
    dot_id = spec.decimal_point_id
    if dot_id is None:
        raise ValueError("float_level=True needs the '.' token: pass decimal_point_id= (the "
                         "vocab_or_tokenizer given has no '.' token)")
    if V is not None and dot_id >= V:
        raise ValueError(f"decimal_point_id={dot_id} is not below the logits' width V={V}")
    if dot_id == ignore_index:
        raise ValueError(f"decimal_point_id={dot_id} equals ignore_index")
    return dot_id


def _int_weights_as_float(weights: Any) -> Any:
    """Integer weights (an HF ``attention_mask``) as fp32; bool/float/None pass through."""
    if (isinstance(weights, torch.Tensor) and not weights.dtype.is_floating_point
            and not weights.dtype.is_complex and weights.dtype != torch.bool):
        return weights.float()
    return weights


def _gather(x2d: torch.Tensor, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """``[N, V] -> [N, K]`` number logits: the Triton digit-gather on CUDA, ``index_select`` else."""
    if use_triton(backend, x2d):
        from .kernels.gather import DigitGather

        return DigitGather.apply(x2d if x2d.stride(-1) == 1 else x2d.contiguous(), ids)
    return digit_gather_torch(x2d, ids)


@overload
def _logits_and_mass(x2d: torch.Tensor, ids: torch.Tensor, backend: str, with_mass: Literal[True],
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def _logits_and_mass(x2d: torch.Tensor, ids: torch.Tensor, backend: str, with_mass: bool,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...
def _logits_and_mass(x2d: torch.Tensor, ids: torch.Tensor, backend: str, with_mass: bool,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Number logits ``z [N, K]`` fp32 and, if asked, the full-softmax number mass ``[N]``
    (:mod:`ntl.kernels.mass`: sums relative to the row max; one fp32 gradient cast once).
    ``rows`` (bool ``[N]``): where the mass is needed; the PyTorch path computes it only there
    (0 elsewhere), the Triton kernel on every row."""
    if not with_mass:
        return _gather(x2d, ids, backend).float(), None
    if use_triton(backend, x2d):
        from .kernels.mass import number_mass_triton

        return number_mass_triton(x2d, ids)
    return number_mass_torch(x2d, ids, rows)


def predict_numbers(
    logits: torch.Tensor, vocab_or_tokenizer: VocabLike, *, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position expected number-token value and number-token mass (``NTLossDotProduct.predict_numbers``).

    With ``z`` the ``K`` number logits of a position (``q = softmax(z)``, values ``v``)
    and ``x`` all its ``V`` logits::

        yhat = sum_k q_k v_k,      mass = sum_k softmax(x)_{id_k}

    Args:
        logits: ``[..., V]`` float logits (any float dtype; math in fp32).
        vocab_or_tokenizer: a tokenizer (its digits ``'0'..'9'``), a ``NumberVocab``
            (e.g. Llama-3's ``NumberVocab.from_tokenizer``), digit ids or ``{id: value}``.
        backend: ``"auto"`` (the Triton number-mass kernel on CUDA), ``"torch"`` or ``"triton"``.

    Returns:
        ``(yhat, mass)``, both fp32 of shape ``logits.shape[:-1]``, differentiable.
    """
    logits = C.check_logits(logits)
    C.check_choice("backend", backend, C.BACKENDS)
    V = logits.shape[-1]
    vocab = resolve_vocab(vocab_or_tokenizer, default_size=V)
    C.check_vocab_fits(vocab, V)
    z, mass = _logits_and_mass(logits.reshape(-1, V), vocab.ids(logits.device), backend, True)
    yhat = torch.softmax(z, dim=-1) @ vocab.values_on(logits.device)
    lead = logits.shape[:-1]
    return yhat.view(lead), mass.view(lead)


def number_spans(digit: torch.Tensor, dot: torch.Tensor | None, max_number_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Numbers of ``[R, T]`` digit flags (``dot``: the ``'.'`` labels, float level).

    Returns ``(start [R, T] bool, owner [R*T] int64, scale [R*T] fp32)``: ``start``
    marks each number's first digit, ``owner`` the flat index of the first digit of
    the number a position belongs to (meaningful at digits), ``scale = 10^p`` its
    place value (``p`` = digits after it in the number, clamped to
    ``max_number_length - 1``). Rows are independent; no host sync.
    """
    R, T = digit.shape
    prev_digit = F.pad(digit[:, :-1], (1, 0))
    if dot is None:
        in_number = digit
    else:  # a single '.' with a digit on both sides belongs to the number
        next_digit = F.pad(digit[:, 1:], (0, 1))
        in_number = digit | (dot & prev_digit & next_digit)
    start = digit & ~F.pad(in_number[:, :-1], (1, 0))
    flat = torch.arange(R * T, device=digit.device).view(R, T)
    owner = torch.where(start, flat, torch.full_like(flat, -1)).cummax(-1).values.view(-1).clamp_min(0)
    digits_upto = digit.long().cumsum(-1).view(-1)  # inclusive, per row
    count = torch.zeros(R * T, dtype=torch.long, device=digit.device).scatter_add(
        0, owner, digit.view(-1).long())  # digits per number, at its first digit
    after = count[owner] - 1 - (digits_upto - digits_upto[owner])
    place = after.clamp(0, max_number_length - 1)
    return start, owner, torch.pow(10.0, place.to(torch.float32))


def number_level_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike | NumberLevelVocab,
    *,
    float_level: bool = False,
    decimal_point_id: int | None = None,
    max_number_length: int = 20,
    reweigh: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Number-level NTL: the bounded relative error of whole numbers written digit by digit.

    Each number (a run of digit labels in a row) is scored once: its expected value
    ``yhat = sum_t 10^{p_t} E[digit_t]`` against its value ``y``::

        L = |yhat - y| / (|yhat| + |y| + eps)   in [0, 1)

    (``ntloss.NumberLevelLoss``; formulas and gradients in :mod:`ntl.number_level`).

    Args:
        logits: ``[..., T, V]`` float logits aligned with ``labels`` (shift them
            yourself for causal LMs). ``V`` may exceed the tokenizer (padded vocabularies).
        labels: ``[..., T]`` integer token ids; the last axis is the sequence, so a
            number never runs from one row into the next. A text token or
            ``ignore_index`` ends a number (``1 2 <ignore> 3`` is ``12`` and ``3``).
        vocab_or_tokenizer: a tokenizer with single-token digits ``'0'..'9'`` (Qwen2.5,
            Llama-2, ...), a ``DigitVocab``, the ten digit ids, or a :class:`NumberLevelVocab`.
            Labels that are a tokenizer's multi-digit number tokens (Llama-3's ``'123'``)
            raise ``ValueError``: such numbers have no per-digit place value.
        float_level: a single ``'.'`` label between two digits joins them into one
            number (``12.34`` -> ``1234``; ``False``: ``12`` and ``34``).
        decimal_point_id: the ``'.'`` token id (default: the tokenizer's ``'.'``).
        max_number_length: places ``>= max_number_length - 1`` all count as
            ``10^(max_number_length - 1)`` (``ntloss``'s clamp); at most 38 (fp32).
        reweigh: ``L' = m L + 1.01 (1 - m)``, ``m`` the full-softmax digit mass at the
            number's first digit (``ntloss``'s ``reweigh``; off by default).
        ignore_index: label value that never takes part.
        reduction: ``"mean"`` (weighted mean over numbers), ``"sum"``, or ``"none"``
            (shaped like ``labels``: each number's ``w L`` at its first digit, 0 elsewhere).
        weights: optional non-negative ``[..., T]`` weights (bool/int/float); a number
            takes the weight of its first digit.
        backend: ``"auto"`` (on CUDA the Triton digit-gather, and with ``reweigh`` the
            number-mass kernel), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``; ``0.0``
        (attached to the graph) when there is no number.
    """
    check_options(float_level, max_number_length, reweigh, decimal_point_id)
    C.check_choice("backend", backend, C.BACKENDS)
    logits = C.check_logits(logits)
    V = logits.shape[-1]
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., T, V] (labels need a sequence axis), "
                         f"got {tuple(logits.shape)}")
    spec = number_level_vocab(vocab_or_tokenizer, decimal_point_id=decimal_point_id, default_size=V)
    labels1d, vocab, k, w = prepare_labels(
        labels, logits.shape[:-1], logits.device, "logits.shape[:-1]", V, spec.digits, ignore_index,
        _int_weights_as_float(weights), reduction)
    dot_id = decimal_point(spec, float_level, V, ignore_index)
    if spec.multi_digit_ids:
        _refuse_multi_digit_labels(labels1d, spec.multi_digit_ids, ignore_index)

    T = labels.shape[-1]
    N = labels1d.numel()
    if N == 0:  # no position at all: an attached zero of the right shape
        empty = logits.float().sum(-1) * 0.0
        return empty if reduction == "none" else empty.sum()
    dev = logits.device
    zero = torch.zeros((), device=dev)
    x2d = logits.reshape(-1, V)
    digit = k >= 0
    dot = (labels1d == dot_id).view(-1, T) if dot_id is not None else None
    start, owner, scale = number_spans(digit.view(-1, T), dot, max_number_length)
    start = start.view(-1)

    # reweigh needs the mass at first digits only: on a CPU select those rows (a nonzero, which
    # waits for no device); elsewhere every row (no sync)
    z, m = _logits_and_mass(x2d, vocab.ids(dev), backend, reweigh, start if dev.type == "cpu" else None)
    # rows without a digit label never reach the softmax (their logits may be -inf)
    q = torch.softmax(torch.where(digit[:, None], z, zero), dim=-1)
    values = vocab.values_on(dev)
    expected = q @ values
    target = values[k.clamp_min(0)]
    y = torch.zeros(N, device=dev).scatter_add(0, owner, torch.where(digit, target * scale, zero))
    yhat = torch.zeros(N, device=dev).scatter_add(0, owner, torch.where(digit, expected * scale, zero))
    loss = (yhat - y).abs() / (yhat.abs() + y.abs() + _EPS)
    if m is not None:
        loss = loss * m + 1.01 * (1.0 - m)
    w = start.float() if w is None else torch.where(start, w.float(), zero)
    rows = torch.where(start, loss, zero) * w
    if reduction == "none":
        return rows.view(labels.shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(_EPS)


@functools.lru_cache(maxsize=8)
def _id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _refuse_multi_digit_labels(labels: torch.Tensor, multi_ids: tuple[int, ...], ignore_index: int) -> None:
    """``ValueError`` if a label is a multi-digit number token: one host sync per call
    (skipped on CUDA with ``ntl.set_strict_checks(False)``, like the label-range check)."""
    if labels.numel() == 0 or (labels.is_cuda and not C._STRICT):
        return
    hit = torch.isin(labels, _id_tensor(multi_ids, labels.device)) & (labels != ignore_index)
    if bool(hit.any()):
        first = int(labels[hit][0])
        raise ValueError(
            f"labels hold multi-digit number tokens (e.g. id {first}); number_level_loss scores "
            "numbers written digit by digit. Split digits when tokenizing, or use ntl_loss with "
            "ntl.NumberVocab.from_tokenizer(tok) for per-token NTL on them")
