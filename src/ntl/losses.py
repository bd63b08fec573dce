"""The functional API: Number Token Losses on ``[..., V]`` logits.

Shared semantics (see each function for its formula):

* ``logits[..., V]`` and ``labels[...]`` are aligned position by position, as
  ``F.cross_entropy`` takes them. **Shifting for causal LMs is the caller's job**:
  pass ``logits[:, :-1]`` with ``labels[:, 1:]``.
* A position takes part iff its label is a number token of the vocab; text
  tokens and ``ignore_index`` contribute nothing.
* The softmax is over the ``K`` number-token logits only (the paper's form);
  ``reweigh=True`` reproduces ``ntloss``'s full-vocabulary reweighting:
  ``L' = m L + 1.01 D (1 - m)`` with ``m`` the full-softmax mass on number tokens
  and ``D`` the largest possible loss.
* ``reduction="mean"``: ``sum_i w_i L_i / max(sum_i w_i, eps)`` over taking-part
  positions; ``"sum"``: ``sum_i w_i L_i``; ``"none"``: ``w_i L_i`` shaped like
  ``labels`` (0 elsewhere). With no taking-part position the loss is ``0.0``,
  still attached to the graph.
* Any float dtype in, math and result in fp32.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any, NamedTuple

import torch

from . import _checks as C
from ._docs import shared_docs
from .kernels._triton import resolve_backend
from .kernels.ntl_loss import ntl_loss_apply
from .kernels.settings import OpSettings
from .methods import MSE, W1, Huber, Method, resolve
from .vocab import NumberVocab, VocabLike, resolve_vocab, vocab_from_handle

__all__ = ["gaussian_targets", "ntl_dot_loss", "ntl_loss", "ntl_mse_loss", "ntl_wasserstein_loss",
           "shift_labels"]

MethodLike = str | Method
"""What ``method=`` takes: a registered name or alias (:data:`ntl.methods.REGISTRY`) or an
:mod:`ntl.methods` object (``ntl.methods.Huber(delta=2.0)``)."""


def resolve_method(method: Any, squash_factor: Any = None, huber_delta: Any = None) -> Method:
    """``method=`` of every entry point (a name or an :mod:`ntl.methods` object) with the
    legacy keywords ``squash_factor=`` / ``huber_delta=``: :func:`ntl.methods.resolve`."""
    return resolve(method, squash_factor=squash_factor, huber_delta=huber_delta)


def prepare_labels(
    labels: Any, shape: torch.Size, device: torch.device, what: str, V: int,
    vocab_or_tokenizer: VocabLike, ignore_index: Any, weights: Any, reduction: Any,
) -> tuple[torch.Tensor, NumberVocab, torch.Tensor, torch.Tensor | None]:
    """Checks shared by every entry point once the ``V``-wide input is known:
    ``(labels1d [N], vocab, k [N], weights1d)``."""
    labels = C.check_labels(labels, shape, device, what=what)
    ignore_index = C.check_ignore_index(ignore_index)
    C.check_choice("reduction", reduction, C.REDUCTIONS)
    vocab = resolve_vocab(vocab_or_tokenizer, default_size=V)
    C.check_vocab_fits(vocab, V)
    w = C.check_weights(weights, labels)
    C.check_values(labels, V, ignore_index, w)
    labels1d = labels.reshape(-1)
    k = vocab.digit_index(labels1d, V).masked_fill(labels1d == ignore_index, -1)  # -1: not a number
    return labels1d, vocab, k, (w.reshape(-1) if w is not None else None)


class LossSpec(NamedTuple):
    """Python constants of a (vocab, method) pair: all the front end needs from the vocab."""

    handle: int
    K: int
    vocab_size: int
    max_id: int
    method: str  # the registered name (what the ops and the twin look the formula up by)
    dmax: float  # reweigh ceiling D (Method.reweigh_ceiling; 0 for an unbounded method: no reweigh)
    squash: bool  # (sq_a, sq_b) != (0, 1)
    sq_a: float
    sq_b: float
    delta: float


def loss_spec(vocab_or_tokenizer: VocabLike, vocab_size: int | None, default_size: int | None,
              method: Method) -> LossSpec:
    """Resolve the vocab and the loss constants (cached per vocab). ``torch.compile`` runs the
    lookup once at trace time and keeps the result as a constant (tokenizer -> vocab is pure,
    cached Python). An object (a vocab, a tokenizer) enters the traced lookup as its ``id()``,
    which Dynamo guards on: torch < 2.12 cannot pass an object to an assume-constant function."""
    v = vocab_or_tokenizer
    # the method enters the traced lookup as its name and parameters (Python constants)
    name, params = type(method).name, method.params()
    if torch.compiler.is_compiling() and not isinstance(v, (list, tuple, dict, torch.Tensor)):
        return _loss_spec_of_object(id(v), vocab_size, default_size, name, *params)
    return _loss_spec(v, vocab_size, default_size, name, *params)


def _loss_spec(vocab_or_tokenizer: VocabLike, vocab_size: int | None, default_size: int | None,
               name: str, *params: Any) -> LossSpec:
    vocab = resolve_vocab(vocab_or_tokenizer, vocab_size, default_size=default_size)
    specs = vocab.__dict__.setdefault("_specs", {})
    method = C.METHODS[name](*params)
    spec = specs.get(method)
    if spec is None:
        sc = method.kernel_scalars(vocab)
        spec = LossSpec(handle=vocab.handle, K=vocab.K, vocab_size=vocab.vocab_size,
                        max_id=max(vocab.token_ids), method=name,
                        dmax=method.reweigh_ceiling(vocab) if method.bounded else 0.0,
                        squash=(sc.sq_a, sc.sq_b) != (0.0, 1.0),
                        sq_a=sc.sq_a, sq_b=sc.sq_b, delta=sc.delta)
        specs[method] = spec
    return spec


def _loss_spec_of_object(obj_id: int, vocab_size: int | None, default_size: int | None,
                         name: str, *params: Any) -> LossSpec:
    """:func:`_loss_spec` of the object whose ``id()`` is ``obj_id``. Called by Dynamo at trace
    time only, while the traced frame holds the object (so the id names a live object), with an
    ``ID_MATCH`` guard on it (so the constant is re-derived for any other object)."""
    obj = ctypes.cast(obj_id, ctypes.py_object).value
    return _loss_spec(obj, vocab_size, default_size, name, *params)


# what torch.compiler.assume_constant_result does, without importing torch._dynamo (seconds) at
# `import ntl`: Dynamo calls these eagerly while tracing and bakes their result into the graph
_loss_spec._dynamo_marked_constant = True  # type: ignore[attr-defined]
_loss_spec_of_object._dynamo_marked_constant = True  # type: ignore[attr-defined]


class Call(NamedTuple):
    """What :func:`resolve_call` returns: the checked labels and ``ignore_index``, and the
    vocab's and method's constants."""

    labels: torch.Tensor
    ignore_index: int
    spec: LossSpec


def resolve_call(labels: Any, shape: torch.Size, device: torch.device, V: int,
                 vocab_or_tokenizer: VocabLike, method: Method, ignore_index: Any, reduction: Any,
                 what: str = "logits.shape[:-1]") -> Call:
    """The arguments every ``V``-wide entry point shares: ``labels`` shaped ``shape`` on
    ``device`` (``what`` names that shape in errors), ``ignore_index``, ``reduction``, and the
    vocab (with ``method``: :func:`loss_spec`), which must fit ``V`` columns."""
    labels = C.check_labels(labels, shape, device, what=what)
    ignore_index = C.check_ignore_index(ignore_index)
    C.check_choice("reduction", reduction, C.REDUCTIONS)
    spec = loss_spec(vocab_or_tokenizer, None, V, method)
    C.check_ids_fit(spec.max_id, spec.vocab_size, V)
    return Call(labels, ignore_index, spec)


def op_settings(spec: LossSpec, **fields: Any) -> OpSettings:
    """The ops' :class:`~ntl.kernels.settings.OpSettings`: the method's constants from ``spec``,
    the rest by keyword."""
    return OpSettings(method=spec.method, dmax=spec.dmax, sq_a=spec.sq_a, sq_b=spec.sq_b,
                      delta=spec.delta, **fields)


def vocab_tensors(handle: int, device: torch.device, width: int | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the ops take of the vocab, from its cache: ``(ids [K], values [K], table [width + 1])``
    (:meth:`NumberVocab.index_table`; ``width=None``: labels are number indices already)."""
    if torch.compiler.is_compiling():  # fill the cache at trace time: Dynamo then reads it only
        _fill_vocab_cache(handle, device, width)
    vocab = vocab_from_handle(handle)
    return vocab.ids(device), vocab.values_on(device), vocab.index_table(width, device)


def _fill_vocab_cache(handle: int, device: torch.device, width: int | None) -> int:
    """Build the vocab's device tensors that :func:`vocab_tensors` reads (Dynamo calls this
    eagerly while tracing: building them takes a lock, which it cannot trace)."""
    vocab = vocab_from_handle(handle)
    vocab.ids(device)
    vocab.values_on(device)
    vocab.index_table(width, device)
    return handle


_fill_vocab_cache._dynamo_marked_constant = True  # type: ignore[attr-defined]


def need_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _standalone(
    logits: Any, labels: Any, vocab_or_tokenizer: VocabLike, method: Method, ignore_index: Any,
    reduction: Any, weights: Any, reweigh: Any, target_dist: Any, backend: str,
) -> torch.Tensor:
    """The front end of every logits-level loss: checks, the vocab's constants, one op."""
    logits = C.check_logits(logits)
    V = logits.shape[-1]
    C.check_bool("reweigh", reweigh)
    method.check_reweigh(reweigh)
    labels, ignore_index, spec = resolve_call(labels, logits.shape[:-1], logits.device, V,
                                              vocab_or_tokenizer, method, ignore_index, reduction)
    w = C.check_weights(weights, labels)
    soft = soft_targets(target_dist, labels, spec.K, method)
    scale = place_scale(method, labels, vocab_or_tokenizer, spec, ignore_index, V)
    kernel = resolve_backend(backend, logits, method=method)
    x = logits.reshape(-1, V)
    if kernel and x.stride(-1) != 1:
        x = x.contiguous()
    cfg = op_settings(spec, reduction=reduction, ignore_index=ignore_index, reweigh=reweigh,
                      use_triton=kernel, check=C.strict_checks(), hi=V, hi_what="logits.shape[-1]",
                      need_dz=need_grad(logits))
    ids, values, table = vocab_tensors(spec.handle, x.device, V)
    out = ntl_loss_apply(x, labels.reshape(-1).contiguous(),
                         w.reshape(-1).contiguous() if w is not None else None, soft, ids, values, table,
                         cfg, scale)
    return out.view(labels.shape) if reduction == "none" else out


def bind_decimal_point(method: Method, vocab_or_tokenizer: Any) -> Method:
    """``method`` with the tokenizer's ``'.'`` as its ``decimal_point_id`` when it uses place
    weights and carries none (for the modules, which keep a resolved vocab, not the tokenizer)."""
    if not method.place_weighted or method.decimal_point() is not None:
        return method
    from .number_level import decimal_point_of

    dot = decimal_point_of(vocab_or_tokenizer)
    return method if dot is None else dataclasses.replace(method, decimal_point_id=dot)  # type: ignore[type-var]


def place_scale(method: Method, labels: torch.Tensor, vocab_or_tokenizer: Any, spec: LossSpec,
                ignore_index: int, width: int | None) -> torch.Tensor | None:
    """The per-row factor of the row loss that ``method`` asks for, ``[N]`` fp32, or ``None``:
    DEL's place weights (:func:`ntl.number_level.place_weights`) from ``labels`` (last axis:
    the sequence), with the method's ``decimal_point_id`` or else the tokenizer's ``'.'``.
    Computed once here, the front end of every entry point; the kernels get the factor."""
    if not method.place_weighted:
        return None
    from .number_level import decimal_point_of, place_weights_of  # number_level imports this module

    dot = method.decimal_point()
    if dot is None:
        dot = decimal_point_of(vocab_or_tokenizer)
    pw = place_weights_of(labels, vocab_from_handle(spec.handle), dot, ignore_index, width)
    return pw.reshape(-1).contiguous()


def soft_targets(target_dist: Any, labels: torch.Tensor, K: int, method: Method) -> torch.Tensor | None:
    """The validated ``[N, K]`` soft targets (``None`` without ``target_dist``), for a method
    that takes them (:attr:`ntl.methods.Method.soft_targets`)."""
    if target_dist is None:
        return None
    method.check_target_dist()
    return check_target_dist(target_dist, labels, K).contiguous()


@shared_docs
def ntl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: MethodLike = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    target_dist: torch.Tensor | None = None,
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL with any registered method (:mod:`ntl.methods`): the front end of
    :func:`ntl_mse_loss`, :func:`ntl_dot_loss` and :func:`ntl_wasserstein_loss`, whose
    formulas and reductions apply.

    Args:
        {logits}
        {labels}
        {vocab_or_tokenizer}
        {method}
        {ignore_index}
        {reduction}
        {weights}
        {reweigh}
        {target_dist}
        {squash_factor}
        {huber_delta}
        {backend}

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``.

    Raises:
        ValueError: an unknown ``method``/``reduction``/``backend``, shapes that do not match, a
            ``squash_factor``/``huber_delta``/``target_dist`` its method does not take.
        TypeError: non-float logits, non-integer labels, a vocab of the wrong kind.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)  # '0'..'9' are ids 0..9
        >>> logits = torch.zeros(1, 3, 12)  # uniform over the ten digits
        >>> labels = torch.tensor([[3, 11, -100]])  # a digit, a text token, ignored
        >>> ntl.ntl_loss(logits, labels, vocab)  # W1: mean_k |k - 3|
        tensor(2.7000)
        >>> huber = ntl.methods.Huber(delta=2.0)
        >>> ntl.ntl_loss(logits, labels, vocab, method=huber)  # r = 4.5 - 3 < delta: r^2 / 2
        tensor(1.1250)
    """
    m = resolve_method(method, squash_factor, huber_delta)
    return _standalone(logits, labels, vocab_or_tokenizer, m, ignore_index, reduction, weights,
                       reweigh, target_dist, backend)


def check_target_dist(target_dist: Any, labels: torch.Tensor, vocab_or_K: NumberVocab | int) -> torch.Tensor:
    """Validate a soft target distribution ``[..., K]`` and flatten it to ``[N, K]``."""
    K = vocab_or_K if isinstance(vocab_or_K, int) else vocab_or_K.K
    if not isinstance(target_dist, torch.Tensor) or not target_dist.dtype.is_floating_point:
        raise TypeError("target_dist must be a floating-point torch.Tensor of shape labels.shape + (K,)")
    want = (*labels.shape, K)
    if tuple(target_dist.shape) != want:
        raise ValueError(f"target_dist shape {tuple(target_dist.shape)} must be labels.shape + (K,) = {want}")
    if target_dist.device != labels.device:
        raise ValueError(f"target_dist is on {target_dist.device} but labels are on {labels.device}")
    flat = target_dist.reshape(-1, K)
    if C.strict_checks() and flat.numel() and not torch.compiler.is_compiling():
        # one host read: entries finite and >= 0, every row that is not all zero sums to 1
        t = flat.detach().float()
        sums = t.sum(-1)
        bad_entry, bad_sum = torch.stack([
            (~((t >= 0) & torch.isfinite(t))).any(),
            ((sums != 0) & ((sums - 1).abs() > 1e-3)).any(),
        ]).tolist()
        if bad_entry:
            raise ValueError("target_dist must be finite and >= 0 (a probability distribution over the K "
                             "number tokens per position)")
        if bad_sum:
            raise ValueError("target_dist rows must sum to 1 (all-zero rows are allowed where a position takes "
                             "no part); e.g. normalise with target_dist / target_dist.sum(-1, keepdim=True)")
    return flat


@shared_docs
def ntl_mse_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL-MSE: squared error of the expected number-token value
    (:func:`ntl_dot_loss` with ``error="mse"``).

    Per position with number logits ``z`` (``K`` of them), ``q = softmax(z)``, values ``v``
    and target value ``y``::

        yhat = sum_k q_k v_k,   L = (yhat - y)^2,   dL/dz_j = 2 (yhat - y) q_j (v_j - yhat)

    Args:
        {logits}
        {labels}
        {vocab_or_tokenizer}
        {ignore_index}
        {reduction}
        {weights}
        {reweigh}
        {backend}

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``.

    Raises:
        ValueError: an unknown ``reduction``/``backend``, shapes that do not match.
        TypeError: non-float logits, non-integer labels, a vocab of the wrong kind.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(2, 12)  # uniform: yhat = 4.5
        >>> ntl.ntl_mse_loss(logits, torch.tensor([3, 5]), vocab, reduction="none")
        tensor([2.2500, 0.2500])
    """
    return _standalone(logits, labels, vocab_or_tokenizer, MSE(), ignore_index, reduction, weights,
                       reweigh, None, backend)


@shared_docs
def ntl_dot_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    error: str | Method = "mse",
    huber_delta: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL-Lp: an error ``e`` of the expected number-token value
    (``ntloss.NTLossDotProduct(loss_function=...)``, the paper's ablations).

    With ``q = softmax(z)`` over the ``K`` number logits, ``yhat = sum_k q_k v_k`` and
    ``r = yhat - y``::

        L = e(r),   dL/dz_j = e'(r) q_j (v_j - yhat)

        error="mse":   e = r^2,                                     e' = 2 r
        error="mae":   e = |r|,                                     e' = sign(r)  (0 at r = 0)
        error="huber": e = r^2 / 2 if |r| < delta else delta (|r| - delta / 2),
                                                                    e' = clamp(r, -delta, delta)

    (``F.mse_loss``, ``F.l1_loss``, ``F.huber_loss(delta=huber_delta)``). ``reweigh=True``
    uses ``D = 1.01 e(v_max - v_min)``; ``ntl_loss(method=...)`` is the same loss.

    Args:
        {logits}
        {labels}
        {vocab_or_tokenizer}
        error: ``"mse"``, ``"mae"``, ``"huber"`` or the object :class:`ntl.methods.MSE` /
            ``MAE`` / ``Huber``.
        huber_delta: the Huber threshold (``None``: 1.0); applies to ``"huber"``, validated
            and ignored with the other errors.
        {ignore_index}
        {reduction}
        {weights}
        {reweigh}
        {backend}

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``.

    Raises:
        ValueError: an ``error`` other than the three, a bad ``huber_delta``, shapes that do not
            match.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(1, 12)  # yhat = 4.5
        >>> ntl.ntl_dot_loss(logits, torch.tensor([8]), vocab, error="mae")
        tensor(3.5000)
    """
    dot = ("mse", "mae", "huber")
    if isinstance(error, Method):
        if type(error).name not in dot:
            raise ValueError(f"error must be one of {list(dot)} or their ntl.methods objects, got {error!r}")
        m = resolve(error, huber_delta=huber_delta if isinstance(error, Huber) else None, name="error")
    else:
        error = C.check_choice("error", error, dot)
        delta = Huber(1.0 if huber_delta is None else huber_delta).delta  # validated for every error
        m = resolve(error, huber_delta=delta if error == "huber" else None)
    return _standalone(logits, labels, vocab_or_tokenizer, m, ignore_index, reduction, weights,
                       reweigh, None, backend)


@shared_docs
def ntl_wasserstein_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    target_dist: torch.Tensor | None = None,
    squash_factor: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL-W1: Wasserstein-1 distance between the number-token distribution and the target.

    With ``q = softmax(z)`` over the ``K`` number logits, sorted values ``v``, CDF
    ``Q_k = sum_{i<=k} q_i``, target CDF ``T_k`` and gaps ``g_k = v_{k+1} - v_k``::

        L = sum_{k<K-1} |Q_k - T_k| g_k          (= sum_k q_k |v_k - y| for a one-hot target y)
        dL/dz_j = q_j (d_j - L),   d_j = |v_j - y|       (one-hot target)

    ``squash_factor`` reshapes the distance table so that the closest distinct value costs 1
    and the farthest ``squash_factor``:
    ``d_j = 1 + (|v_j - y| - d_min) (squash_factor - 1) / (d_max - d_min)`` for ``v_j != y``
    (0 for ``v_j = y``). ``target_dist`` replaces the one-hot target at taking-part positions.

    Args:
        {logits}
        {labels}
        {vocab_or_tokenizer}
        {ignore_index}
        {reduction}
        {weights}
        {reweigh}
        {target_dist}
        {squash_factor}
        {backend}

    Returns:
        fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``.

    Raises:
        ValueError: a bad ``squash_factor``, a ``target_dist`` of the wrong shape or not summing
            to 1, both at once.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(1, 12)
        >>> labels = torch.tensor([3])
        >>> ntl.ntl_wasserstein_loss(logits, labels, vocab)
        tensor(2.7000)
        >>> soft = ntl.gaussian_targets(labels, vocab, sigma=1.0)
        >>> ntl.ntl_wasserstein_loss(logits, labels, vocab, target_dist=soft).round(decimals=2)
        tensor(1.9700)
    """
    return _standalone(logits, labels, vocab_or_tokenizer, W1(squash_factor), ignore_index, reduction,
                       weights, reweigh, target_dist, backend)


@shared_docs
def gaussian_targets(
    labels: torch.Tensor, vocab_or_tokenizer: VocabLike, sigma: float = 1.0, *, vocab_size: int | None = None
) -> torch.Tensor:
    """Gaussian label smoothing over number values: ``T_k ∝ exp(-(v_k - y)^2 / (2 sigma^2))``.

    Where the label is not a number token the row is centred on the smallest value; those
    rows never take part in a loss.

    Args:
        {labels}
        {vocab_or_tokenizer}
        sigma: the standard deviation, in value units (``> 0``).
        {vocab_size}

    Returns:
        ``labels.shape + (K,)`` fp32 rows summing to 1, in the vocab's value order (a
        ``target_dist`` for :func:`ntl_wasserstein_loss`).

    Raises:
        ValueError: ``sigma`` not a positive number.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> t = ntl.gaussian_targets(torch.tensor([[0, 5]]), vocab, sigma=0.5)
        >>> t.shape, t[0, 1].argmax().item(), round(t[0, 1, 5].item(), 3)
        (torch.Size([1, 2, 10]), 5, 0.787)
    """
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    vocab = resolve_vocab(vocab_or_tokenizer, vocab_size)
    values = vocab.values_on(labels.device)
    k = vocab.digit_index(labels, vocab_size)
    y = values[k.clamp_min(0)]
    return torch.softmax(-((values - y[..., None]) ** 2) / (2.0 * sigma * sigma), dim=-1)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM labels aligned with unshifted logits: ``out[..., t] = labels[..., t + 1]``,
    ``ignore_index`` at the last position.

    ``loss(logits, shift_labels(ids))`` scores the same pairs as
    ``loss(logits[:, :-1], ids[:, 1:])`` but keeps ``logits`` contiguous, so
    nothing copies the ``[B, T, V]`` tensor (a sliced view cannot be flattened).

    Args:
        labels: ``[..., T]`` integer token ids, the sequence last.
        ignore_index: the value put at the last position.

    Returns:
        A tensor shaped and typed like ``labels``.

    Raises:
        TypeError: ``labels`` not an integer tensor with a sequence dimension.

    Example:
        >>> import torch, ntl
        >>> ntl.shift_labels(torch.tensor([[5, 6, 7]]))
        tensor([[   6,    7, -100]])
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError("labels must be a tensor with a sequence dimension last")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
