"""Number-level NTL (``ntloss.NumberLevelLoss``) and per-position number predictions.

Shapes: ``logits [..., T, V]``, ``labels [..., T]``: the last axis of ``labels`` is
the sequence, every leading index is its own row (numbers never run across rows).
Math in fp32 for any float input; vectorised: numbers are found with shifts,
``cummax``/``cumsum`` and ``scatter_add`` over all positions at once, with no loop
over numbers or tokens and no host sync (beyond the shared one-per-call label
check of :mod:`ntl._checks`).

A *number* is a maximal run of number-token labels in a row; with ``float_level=True``
a single ``'.'`` label between two number tokens joins the runs on both sides and adds
nothing (``12.34`` is scored as ``1234``, as ``ntloss`` does). Number tokens are the
ten digits (a digit-level vocab: Qwen2.5, Llama-2, ...) or, with a multi-digit
:class:`~ntl.vocab.NumberVocab` (``ntl.vocab_for_tokenizer(tok)`` for Llama-3), tokens
of any width: token ``t`` writes ``w_t = len(text_t)`` digits (``'123'``: 3, ``'07'``: 2).
Its place ``p_t`` is the count of the number's *digits* written after it, clamped to
``max(max_number_length - w_t, 0)`` so that its leading digit sits at most at place
``max_number_length - 1`` (for digits, ``w_t = 1``: ``ntloss``'s clamp). With
``q_t = softmax(z_t)`` over the ``K`` number logits of position ``t`` (values ``v_k``,
``e_t = sum_k v_k q_{t,k}``) and ``y_t`` the label token's value::

    y    = sum_t 10^{p_t} y_t          yhat = sum_t 10^{p_t} e_t
    L    = |yhat - y| / (|yhat| + |y| + eps)         eps = 2^-23 (fp32)   0 <= L < 1
    dL/dyhat = (sign(yhat - y) - L sign(yhat)) / (|yhat| + |y| + eps)
    dyhat/dz_{t,j} = 10^{p_t} q_{t,j} (v_j - e_t)

Llama-3's ``'123' '4'`` (1234): ``p = 1, 0``, ``yhat = 10 e_0 + e_1``; ``'12' '345'``:
``yhat = 1000 e_0 + e_1``; ``'12' '.' '5'`` (float level): ``yhat = 10 e_0 + e_2``.
``ntloss.NumberLevelLoss`` differs here: it treats every number token as one digit
(``p_t`` counts *tokens*, and its digit-level vocab sees only ``'0'..'9'``), so it scores
``'123' '4'`` as the number 4.

``reweigh=True``: ``L' = m L + 1.01 (1 - m)`` with ``m`` the full-softmax mass on the
number tokens at the number's first token (``ntloss``'s ``reweigh_fn``, ``D = 1``).

Kernels: on CUDA the digit-gather (:mod:`ntl.kernels.number_columns`) and, for ``reweigh``
and :func:`predict_numbers`, the number-mass kernel (:mod:`ntl.kernels.number_mass`, one
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
from ._docs import shared_docs
from .kernels._triton import resolve_backend
from .kernels.reference import digit_gather_torch, number_mass_torch
from .losses import prepare_labels
from .vocab import NumberVocab, VocabLike, resolve_vocab, vocab_from_handle

__all__ = ["NumberLevelVocab", "digit_places", "number_level_loss", "number_level_vocab", "place_weights",
           "predict_numbers"]

_EPS = torch.finfo(torch.float32).eps
#: 10^38 is the largest power of ten in fp32 (10^39 overflows to inf).
MAX_NUMBER_LENGTH = 38


@dataclass(frozen=True)
class NumberLevelVocab:
    """What the number-level loss needs from a tokenizer, resolved once.

    ``digits``: the number tokens: the ten digits, or a multi-digit
    :class:`~ntl.vocab.NumberVocab` with token texts (``ntl.vocab_for_tokenizer(tok)``:
    Llama-3's 1,110 tokens ``'0'..'999'``), whose widths give the place values;
    ``decimal_point_id``: the ``'.'`` token (used with ``float_level=True``), ``None`` if
    unknown; ``multi_digit_ids``: the tokenizer's multi-digit number tokens that
    ``digits`` does not hold (a tokenizer resolves to its ten digits, as in ``ntloss``),
    which a label may then not hold: scoring them would drop their digits silently.
    """

    digits: NumberVocab
    decimal_point_id: int | None = None
    multi_digit_ids: tuple[int, ...] = ()


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, NumberLevelVocab]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def number_level_vocab(vocab_or_tokenizer: VocabLike | NumberLevelVocab, vocab_size: int | None = None, *,
                       decimal_point_id: int | None = None,
                       default_size: int | None = None) -> NumberLevelVocab:
    """Resolve a tokenizer or a number vocab for :func:`number_level_loss`; cached per tokenizer.

    A tokenizer gives its ten digits (``'0'..'9'``, as ``ntloss`` does) and records its
    multi-digit number tokens, which labels may then not hold. A multi-digit
    ``NumberVocab`` (``ntl.vocab_for_tokenizer(tok)``) is used as is: its token texts
    give each token's width. Raises ``ValueError`` when the vocab is neither the ten
    digits ``0..9`` nor a ``NumberVocab`` with texts that holds every digit ``'0'..'9'``
    (without texts the widths, hence the place values, are unknown), or when
    ``decimal_point_id`` is a number token id.
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
    _check_number_vocab(spec.digits)
    if spec.multi_digit_ids and spec.digits.is_multi_digit:  # labels the vocab covers are fine
        covered = set(spec.digits.token_ids)
        spec = NumberLevelVocab(spec.digits, spec.decimal_point_id,
                                tuple(i for i in spec.multi_digit_ids if i not in covered))
    if decimal_point_id is not None and decimal_point_id != spec.decimal_point_id:
        spec = NumberLevelVocab(spec.digits, decimal_point_id, spec.multi_digit_ids)
    if spec.decimal_point_id is not None and spec.decimal_point_id in spec.digits.token_ids:
        raise ValueError(f"decimal_point_id={spec.decimal_point_id} is a digit token id")
    return spec


def _check_number_vocab(vocab: NumberVocab) -> None:
    """``ValueError`` unless ``vocab`` is the ten digits or a ``NumberVocab`` with texts
    (so widths) holding every digit ``'0'..'9'`` (so that any number can be written)."""
    if vocab.is_digit_vocab:
        return
    if vocab.texts is None:
        raise ValueError(
            "vocab_or_tokenizer: number_level_loss needs the ten digit tokens '0'..'9' (values 0..9) "
            f"or a NumberVocab with token texts, got {vocab!r}, built without texts: the digit width "
            "of each token, hence its place value, is unknown. Pass the tokenizer, "
            "ntl.vocab_for_tokenizer(tok) (every number token, e.g. Llama-3's '123') or texts=")
    missing = [d for d in "0123456789" if vocab.id_of_text(d) is None]
    if missing:
        raise ValueError(
            f"vocab_or_tokenizer: number_level_loss needs every digit '0'..'9' among the number tokens, "
            f"{vocab!r} lacks {missing}")


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
    if resolve_backend(backend, x2d):
        from .kernels.number_columns import DigitGather

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
    (:mod:`ntl.kernels.number_mass`: sums relative to the row max; one fp32 gradient cast once).
    ``rows`` (bool ``[N]``): where the mass is needed; the PyTorch path computes it only there
    (0 elsewhere), the Triton kernel on every row."""
    if not with_mass:
        return _gather(x2d, ids, backend).float(), None
    if resolve_backend(backend, x2d):
        from .kernels.number_mass import number_mass_triton

        return number_mass_triton(x2d, ids)
    return number_mass_torch(x2d, ids, rows)


@shared_docs
def predict_numbers(
    logits: torch.Tensor, vocab_or_tokenizer: VocabLike | NumberLevelVocab, *,
    labels: torch.Tensor | None = None, float_level: bool = False, decimal_point_id: int | None = None,
    max_number_length: int | None = None, ignore_index: int = -100, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected number values and number-token mass (``NTLossDotProduct.predict_numbers``).

    With ``z`` the ``K`` number logits of a position (``q = softmax(z)``, values ``v``)
    and ``x`` all its ``V`` logits::

        e = sum_k q_k v_k,      mass = sum_k softmax(x)_{id_k}

    Without ``labels``, ``yhat = e`` per position (a multi-digit token's value, e.g.
    ``0..999`` with Llama-3's ``NumberVocab``). With ``labels`` (``[..., T]``, the numbers
    as :func:`number_level_loss` finds them), ``yhat`` is each whole number's expected
    value at its first token (0 elsewhere, the layout of ``reduction="none"``)::

        yhat = sum_t 10^{p_t} e_t      p_t = digits written after token t in its number

    (``'123' '4'``: ``10 e_0 + e_1``; ``'12' '345'``: ``1000 e_0 + e_1``), where
    ``ntloss`` would take each token for one digit (see :mod:`ntl.number_level`).

    Args:
        logits: ``[..., V]`` float logits (any float dtype; math in fp32); with
            ``labels``: ``[..., T, V]`` aligned with them.
        vocab_or_tokenizer: a tokenizer (its digits ``'0'..'9'``), a ``NumberVocab``
            (e.g. ``ntl.vocab_for_tokenizer(tok)``: Llama-3's 1,110 number tokens), digit ids
            or ``{id: value}``; with ``labels`` as in :func:`number_level_loss` (the ten
            digits or a ``NumberVocab`` with texts).
        labels: optional ``[..., T]`` token ids that delimit the numbers.
        {float_level} Only with ``labels``.
        {decimal_point_id} Only with ``labels``.
        {max_number_length} Only with ``labels``.
        {ignore_index} Only with ``labels``.
        backend: ``"auto"`` (the Triton number-mass kernel on CUDA), ``"torch"`` or ``"triton"``.

    Returns:
        ``(yhat, mass)``, both fp32 of shape ``logits.shape[:-1]``, differentiable;
        ``mass`` is per position in both modes.

    Raises:
        ValueError: number-level options without ``labels``, shapes that do not match.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(2, 12)
        >>> logits[1, 7] = 50.0  # the second position is sure of '7'
        >>> yhat, mass = ntl.predict_numbers(logits, vocab)
        >>> yhat, mass.round(decimals=3)
        (tensor([4.5000, 7.0000]), tensor([0.8330, 1.0000]))
    """
    logits = C.check_logits(logits)
    C.check_backend(backend)
    V = logits.shape[-1]
    if labels is None:
        if float_level or decimal_point_id is not None or max_number_length is not None:
            raise ValueError("float_level, decimal_point_id and max_number_length apply only with "
                             "labels= (which delimit the numbers)")
        vocab = resolve_vocab(vocab_or_tokenizer, default_size=V)
        C.check_vocab_fits(vocab, V)
        z, mass = _logits_and_mass(logits.reshape(-1, V), vocab.ids(logits.device), backend, True)
        yhat = torch.softmax(z, dim=-1) @ vocab.values_on(logits.device)
        lead = logits.shape[:-1]
        return yhat.view(lead), mass.view(lead)
    L = 20 if max_number_length is None else max_number_length
    check_options(float_level, L, False, decimal_point_id)
    seg = _segment(logits, labels, vocab_or_tokenizer, float_level, decimal_point_id, L, ignore_index,
                   None, "none")
    z, mass = _logits_and_mass(seg.x2d, seg.vocab.ids(logits.device), backend, True)
    yhat, _ = _number_values(z, seg)
    yhat = torch.where(seg.start, yhat, torch.zeros((), device=logits.device))
    return yhat.view(labels.shape), mass.view(labels.shape)


def number_spans(digit: torch.Tensor, dot: torch.Tensor | None, max_number_length: int,
                 width: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Numbers of ``[R, T]`` number-token flags (``dot``: the ``'.'`` labels, float level).

    ``width`` (int64 ``[R, T]``, read at number tokens only): the digits each token
    writes; ``None``: every number token is one digit.

    Returns ``(start [R, T] bool, owner [R*T] int64, scale [R*T] fp32)``: ``start``
    marks each number's first token, ``owner`` the flat index of the first token of
    the number a position belongs to (meaningful at number tokens), ``scale = 10^p``
    its place value (``p`` = digits written after it in the number, clamped to
    ``max(max_number_length - w, 0)``: ``max_number_length - 1`` for digits). Rows are
    independent; no host sync; all positions at once (cumulative sums, no loop).
    """
    R, T = digit.shape
    prev_digit = F.pad(digit[:, :-1], (1, 0))
    if dot is None:
        in_number = digit
    else:  # a single '.' with a number token on both sides belongs to the number
        next_digit = F.pad(digit[:, 1:], (0, 1))
        in_number = digit | (dot & prev_digit & next_digit)
    start = digit & ~F.pad(in_number[:, :-1], (1, 0))
    flat = torch.arange(R * T, device=digit.device).view(R, T)
    owner = torch.where(start, flat, torch.full_like(flat, -1)).cummax(-1).values.view(-1).clamp_min(0)
    # digits after token t = count - w_s - (C_t - C_s): C the row's inclusive cumsum of widths,
    # s the number's first token, count the number's digits in all (at s)
    w = digit.long() if width is None else torch.where(digit, width, torch.zeros_like(width))
    digits_upto = w.cumsum(-1).view(-1)
    w = w.view(-1)
    count = torch.zeros(R * T, dtype=torch.long, device=digit.device).scatter_add(0, owner, w)
    after = count[owner] - w[owner] - (digits_upto - digits_upto[owner])
    if width is None:
        place = after.clamp(0, max_number_length - 1)
    else:  # the token's leading digit at most at place max_number_length - 1
        place = torch.minimum(after, (max_number_length - w).clamp_min(0)).clamp_min(0)
    return start, owner, torch.pow(10.0, place.to(torch.float32))


def digit_places(digit: torch.Tensor, dot: torch.Tensor | None,
                 width: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer and decimal places of ``[R, T]`` number-token flags (``dot``: the ``'.'`` labels).

    A number is a run of number tokens; a ``'.'`` with a number token on both sides is its
    decimal point (as in :func:`number_spans`; after the first one, digits keep counting
    decimal places across a later one: ``1.2.3`` has ``d = 1, 2``). ``width`` (int64 ``[R, T]``): digits per token (``None``: 1). Returns
    ``(place [R, T] int64, decimal [R, T] bool)`` (meaningful at number tokens): an integer
    digit's ``place`` = digits written after it before the decimal point (0: the units digit);
    a decimal digit's ``place`` = its rank ``d >= 1`` after the point. A token of several
    digits takes its lowest place (``'123' '4'``: 1, 0; ``'0' '.' '07'``: 0 then ``d = 2``).
    No host sync; all positions at once.
    """
    R, T = digit.shape
    prev_digit = F.pad(digit[:, :-1], (1, 0))
    if dot is None:
        point = torch.zeros_like(digit)
    else:
        point = dot & prev_digit & F.pad(digit[:, 1:], (0, 1))
    in_number = digit | point
    start = digit & ~F.pad(in_number[:, :-1], (1, 0))
    flat = torch.arange(R * T, device=digit.device).view(R, T)
    owner = torch.where(start, flat, torch.full_like(flat, -1)).cummax(-1).values.view(-1).clamp_min(0)
    points = point.long().cumsum(-1).view(-1)
    decimal = (points - points[owner]) > 0  # a point of this number lies before (a start is no point)
    w = digit.long() if width is None else torch.where(digit, width, torch.zeros_like(width))
    upto = w.cumsum(-1).view(-1)
    w = w.view(-1)
    upto = upto - upto[owner] + w[owner]  # this number's digits up to and including the token
    ints = torch.zeros(R * T, dtype=torch.long, device=digit.device).scatter_add(
        0, owner, torch.where(decimal, torch.zeros_like(w), w))
    n_int = ints[owner]
    place = torch.where(decimal, upto - n_int, n_int - upto)
    return place.view(R, T), decimal.view(R, T)


def place_weights(labels: torch.Tensor, vocab: NumberVocab, decimal_point_id: int | None,
                  ignore_index: int, width: int | None = None) -> torch.Tensor:
    """DEL's place weights ``[...]`` fp32 (``labels``-shaped; 1 where the label is no number token).

    The last axis of ``labels`` is the sequence (a 1-D ``labels`` is one sequence); numbers
    as in :func:`digit_places`. Integer place ``p``: ``w = 2 (p + 1)``; decimal rank ``d``:
    ``w = 1.02^-(d + 1)`` (:class:`ntl.methods.DEL`). ``width``: labels ``>= width`` are text.
    """
    if vocab.widths is None and not vocab.is_digit_vocab:
        raise ValueError(
            f"DEL's place weights need the digit width of each number token, and {vocab!r} was built "
            "without token texts: pass the tokenizer, ntl.vocab_for_tokenizer(tok), or "
            "method=ntl.methods.DEL(place_weights=False)")
    shape = labels.shape
    if labels.numel() == 0:
        return torch.ones(shape, device=labels.device)
    T = shape[-1] if labels.dim() else 1
    lab = labels.reshape(-1, T)
    k = vocab.digit_index(lab, width).masked_fill(lab == ignore_index, -1)
    digit = k >= 0
    dot = (lab == decimal_point_id) if decimal_point_id is not None else None
    wid = vocab.widths_on(labels.device)[k.clamp_min(0)] if vocab.is_multi_digit else None
    place, decimal = digit_places(digit, dot, wid)
    pf = place.float()
    w = torch.where(decimal, torch.pow(1.02, -(pf + 1.0)), 2.0 * (pf + 1.0))
    return torch.where(digit, w, torch.ones((), device=labels.device)).view(shape)


@torch.library.custom_op("ntl::place_weights", mutates_args=())
def _place_weights_op(labels: torch.Tensor, handle: int, decimal_point_id: int, ignore_index: int,
                      width: int) -> torch.Tensor:
    """:func:`place_weights` as one opaque node under ``torch.compile`` (the vocab's cached
    tensors sit behind a lock Dynamo does not trace); ``-1`` stands for ``None``."""
    return place_weights(labels, vocab_from_handle(handle), decimal_point_id if decimal_point_id >= 0 else None,
                         ignore_index, width if width > 0 else None)


@_place_weights_op.register_fake
def _(labels, handle, decimal_point_id, ignore_index, width):
    return torch.empty(labels.shape, dtype=torch.float32, device=labels.device)


def place_weights_of(labels: torch.Tensor, vocab: NumberVocab, decimal_point_id: int | None,
                     ignore_index: int, width: int | None = None) -> torch.Tensor:
    """:func:`place_weights`, through the custom op ``ntl::place_weights`` under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.ops.ntl.place_weights(labels, vocab.handle, -1 if decimal_point_id is None
                                           else decimal_point_id, ignore_index, width or 0)
    return place_weights(labels, vocab, decimal_point_id, ignore_index, width)


def decimal_point_of(vocab_or_tokenizer: Any) -> int | None:
    """The ``'.'`` token id of a tokenizer (cached; ``None`` for a vocab, ids or a dict)."""
    if isinstance(vocab_or_tokenizer, NumberLevelVocab):
        return vocab_or_tokenizer.decimal_point_id
    if not hasattr(vocab_or_tokenizer, "get_vocab"):
        return None
    return _from_tokenizer(vocab_or_tokenizer, None).decimal_point_id


@dataclass(frozen=True)
class _Segments:
    """Labels resolved into numbers (see :func:`_segment`); flat ``[N]`` tensors."""

    x2d: torch.Tensor        # [N, V] logits
    vocab: NumberVocab
    k: torch.Tensor          # [N] number index of each label, -1 if not a number token
    digit: torch.Tensor      # [N] bool: a number-token label
    start: torch.Tensor      # [N] bool: the first token of a number
    owner: torch.Tensor      # [N] int64: flat index of the number's first token
    scale: torch.Tensor      # [N] fp32: 10^{p_t}
    weights: torch.Tensor | None


def _segment(logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike | NumberLevelVocab,
             float_level: bool, decimal_point_id: int | None, max_number_length: int, ignore_index: int,
             weights: Any, reduction: str) -> _Segments:
    """Check the inputs and find the numbers: shared by the loss and :func:`predict_numbers`."""
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
    digit = k >= 0
    x2d = logits.reshape(-1, V)
    if labels1d.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return _Segments(x2d, vocab, k, digit, digit, empty, empty.float(), w)
    dot = (labels1d == dot_id).view(-1, T) if dot_id is not None else None
    width = None
    if vocab.is_multi_digit:
        width = vocab.widths_on(logits.device)[k.clamp_min(0)].view(-1, T)
    start, owner, scale = number_spans(digit.view(-1, T), dot, max_number_length, width)
    return _Segments(x2d, vocab, k, digit, start.view(-1), owner, scale, w)


def _number_values(z: torch.Tensor, seg: _Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """``(yhat [N], y [N])``: each number's expected and label value at its first token
    (``yhat = sum_t 10^{p_t} e_t``, ``y = sum_t 10^{p_t} y_t``; meaningful at ``start``)."""
    dev = z.device
    N = seg.k.numel()
    zero = torch.zeros((), device=dev)
    digit = seg.digit
    # rows without a number label never reach the softmax (their logits may be -inf)
    q = torch.softmax(torch.where(digit[:, None], z, zero), dim=-1)
    values = seg.vocab.values_on(dev)
    expected = q @ values
    target = values[seg.k.clamp_min(0)]
    y = torch.zeros(N, device=dev).scatter_add(0, seg.owner, torch.where(digit, target * seg.scale, zero))
    yhat = torch.zeros(N, device=dev).scatter_add(0, seg.owner, torch.where(digit, expected * seg.scale, zero))
    return yhat, y


@shared_docs
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
    """Number-level NTL: the bounded relative error of whole numbers, in number tokens of any width.

    Each number (a run of number-token labels in a row) is scored once: its expected
    value against its label value ``y``, both summed over its tokens ``t`` at place
    ``p_t`` = the number of digits written after token ``t`` in the number::

        yhat = sum_t 10^{p_t} E[value_t]      y = sum_t 10^{p_t} value(label_t)
        L = |yhat - y| / (|yhat| + |y| + eps)   in [0, 1)

    ``E[value_t] = sum_k softmax(z_t)_k v_k`` over the ``K`` number logits ``z_t``. With
    digits this is ``ntloss.NumberLevelLoss``. With Llama-3's multi-digit tokens
    (``vocab_or_tokenizer=ntl.vocab_for_tokenizer(tok)``) ``'123' '4'`` is 1234 and
    ``yhat = 10 E[v_0] + E[v_1]``; ``'12' '345'``: ``1000 E[v_0] + E[v_1]``. ntloss differs
    there: it treats each multi-digit token as one digit (so ``'123' '4'`` is the number 4).
    Formulas and gradients in :mod:`ntl.number_level`.

    Args:
        logits: ``[..., T, V]`` float logits aligned with ``labels`` (shift them
            yourself for causal LMs). ``V`` may exceed the tokenizer (padded vocabularies).
        labels: ``[..., T]`` integer token ids; the last axis is the sequence, so a
            number never runs from one row into the next. A text token or
            ``ignore_index`` ends a number (``1 2 <ignore> 3`` is ``12`` and ``3``).
        vocab_or_tokenizer: a tokenizer with single-token digits ``'0'..'9'`` (Qwen2.5,
            Llama-2, ...: its ten digits), a ``DigitVocab``, the ten digit ids, a
            ``NumberVocab`` with token texts holding every digit (``ntl.vocab_for_tokenizer(tok)``:
            Llama-3's 1,110 tokens ``'0'..'999'``), or a :class:`NumberLevelVocab`. A tokenizer
            means its ten digits (as in ``ntloss``): labels that are its multi-digit number
            tokens then raise ``ValueError`` (pass ``ntl.vocab_for_tokenizer(tok)`` instead).
        {float_level}
        {decimal_point_id}
        {max_number_length}
        reweigh: ``L' = m L + 1.01 (1 - m)``, ``m`` the full-softmax number-token mass at
            the number's first token (``ntloss``'s ``reweigh``; off by default).
        {ignore_index}
        reduction: ``"mean"`` (weighted mean over numbers), ``"sum"``, or ``"none"``
            (shaped like ``labels``: each number's ``w L`` at its first token, 0 elsewhere).
        weights: optional non-negative ``[..., T]`` weights (bool/int/float); a number
            takes the weight of its first token.
        backend: ``"auto"`` (on CUDA the Triton digit-gather, and with ``reweigh`` the
            number-mass kernel), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``; ``0.0``
        (attached to the graph) when there is no number.

    Raises:
        ValueError: a vocab that is not the ten digits (nor a ``NumberVocab`` with texts),
            multi-digit labels the vocab does not hold, options out of range.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.full((1, 3, 12), -30.0)
        >>> logits[0, 0, 4] = logits[0, 1, 2] = 30.0  # predicts "4 2" with certainty
        >>> labels = torch.tensor([[4, 0, 11]])  # the number 40, then a text token
        >>> ntl.number_level_loss(logits, labels, vocab).round(decimals=4)  # |42 - 40| / 82
        tensor(0.0244)
    """
    check_options(float_level, max_number_length, reweigh, decimal_point_id)
    C.check_backend(backend)
    logits = C.check_logits(logits)
    seg = _segment(logits, labels, vocab_or_tokenizer, float_level, decimal_point_id, max_number_length,
                   ignore_index, weights, reduction)
    if seg.k.numel() == 0:  # no position at all: an attached zero of the right shape
        empty = logits.float().sum(-1) * 0.0
        return empty if reduction == "none" else empty.sum()
    dev = logits.device
    zero = torch.zeros((), device=dev)
    start, w = seg.start, seg.weights

    # reweigh needs the mass at first tokens only: on a CPU select those rows (a nonzero, which
    # waits for no device); elsewhere every row (no sync)
    z, m = _logits_and_mass(seg.x2d, seg.vocab.ids(dev), backend, reweigh, start if dev.type == "cpu" else None)
    yhat, y = _number_values(z, seg)
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
    """``ValueError`` if a label is a multi-digit number token outside the vocab: one host sync per call
    (skipped on CUDA with ``ntl.set_strict_checks(False)``, like the label-range check)."""
    if labels.numel() == 0 or (labels.is_cuda and not C._STRICT):
        return
    hit = torch.isin(labels, _id_tensor(multi_ids, labels.device)) & (labels != ignore_index)
    if bool(hit.any()):
        first = int(labels[hit][0])
        raise ValueError(
            f"labels hold multi-digit number tokens (e.g. id {first}), which the tokenizer's ten "
            "digits (what a tokenizer resolves to) do not cover. Pass ntl.vocab_for_tokenizer(tok) "
            "as vocab_or_tokenizer (every number token, place values counted in digits), or split "
            "digits when tokenizing")
