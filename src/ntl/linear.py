"""Cross-entropy + NTL straight from hidden states: no ``[N, V]`` tensor at any time.

``loss = CE(h W^T + b, y) + w * NTL(h W^T + b, y)`` is computed ``r`` rows at a time
(Liger-Kernel's fused-linear-cross-entropy scheme). For a chunk ``c`` of rows the
logits ``x_c = h_c W^T + b`` (``[r, V]``, one buffer reused by every chunk) are
overwritten in place by their gradient ``G_c = dLoss/dx_c`` -- :func:`ntl.fused.ce_ntl_rows_torch`
on the PyTorch path, the fused CE + NTL Triton kernel (:mod:`ntl.kernels.ce_ntl`) on CUDA::

    G_c = a (softmax(x_c) - e_y) + b scatter_ids(dNTL/dz),   z = x_c[:, ids]   ([r, K])

(``a``, ``b``: the per-row CE and NTL scales that carry the reduction; ``reweigh``
uses the chunk's own log-sum-exp) -- and the forward accumulates::

    dLoss/dh_c = G_c W,    dLoss/dW += G_c^T h_c,    dLoss/db += sum_rows G_c

so backward needs no second pass over ``W``: it multiplies the stored gradients by
the incoming (scalar) gradient. With ``reduction="none"`` the row scales depend on
the incoming gradient ``u``, so the forward computes the per-row losses only and
backward runs the chunk pass once, with ``a_i = u_i 1[y_i valid]`` and
``b_i = w u_i 1[y_i number]``.

Precision: fp32 and bf16 logits chunks are computed in the input dtype (as
``hidden @ W.T`` is), the softmax/NTL math in fp32, the gradients in the input dtype
(bf16: accumulated across chunks in bf16, as Liger does by default). fp16 has too
little range for gradients computed before the incoming gradient (e.g. a GradScaler
scale) is known, so fp16 inputs are computed in fp32 throughout (an fp32 copy of
``W`` and fp32 gradient accumulators) and the gradients are cast to fp16 in backward.
"""

from __future__ import annotations

from typing import Any, Literal, cast, overload

import torch
from torch import nn

from . import _checks as C
from ._docs import shared_docs
from .kernels._triton import backward_once, next_pow2, resolve_backend
from .kernels.ce_ntl import row_scales
from .kernels.reference import ce_ntl_rows_torch
from .losses import (
    MethodLike,
    bind_decimal_point,
    loss_spec,
    place_scale,
    prepare_labels,
    resolve_method,
)
from .methods import Method
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["LinearCrossEntropyWithNTL", "linear_chunk_rows", "linear_cross_entropy_with_ntl"]

def linear_chunk_rows(N: int, H: int, V: int, device: torch.device, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` (capped at ``N``) or the automatic choice.

    CUDA: Liger-Kernel's rule ``next_pow2(ceil(N / ceil(V / H)))``, a logits chunk about
    the size of ``hidden`` (so memory matches Liger's). Elsewhere: ``H / 4`` rounded down
    to a multiple of 32 (at least 32), i.e. a ``[rows, V]`` buffer at most a quarter of the
    ``[V, H]`` weight gradient: few chunks (every op of the chunk loop is an OpenMP
    parallel region; on a shared CPU each waits for both threads) and large GEMMs.
    """
    if chunk_size is not None:
        return max(1, min(int(chunk_size), N))
    rows = next_pow2(-(-N // -(-V // H))) if device.type == "cuda" else max(32, H // 4 // 32 * 32)
    return max(1, min(rows, N))


# --------------------------------------------------------------------------- the chunk pass


def _grad_rows(x: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor,
               values: torch.Tensor, a: torch.Tensor, b: torch.Tensor, method: str, reweigh: bool,
               dmax: float, use_kernel: bool, squash: tuple[float, float] | None = None,
               huber_delta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite the logits chunk ``x [r, V]`` with ``dLoss/dx``; return ``(ce [r], ntl [r])``.

    The one place that calls the fused CE + NTL row math (:mod:`ntl.fused`, :mod:`ntl.kernels.ce_ntl`).
    """
    if use_kernel:
        from .kernels.ce_ntl import ce_ntl_fwd_triton

        out = ce_ntl_fwd_triton(x, labels, k, ids, values, a, b, method, reweigh, dmax, True, squash=squash,
                                huber_delta=huber_delta)
        return out[-2], out[-1]  # (grad [, rinv], ce, ntl): the gradient is x itself
    return ce_ntl_rows_torch(x, labels, k, ids, values, a, b, method, reweigh, dmax, x, squash=squash,
                             huber_delta=huber_delta)


def _chunk_pass(
    h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    k: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    method: str, reweigh: bool, dmax: float, rows: int, need: tuple[bool, bool, bool],
    use_kernel: bool, squash: tuple[float, float] | None = None, huber_delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """One pass over the rows of ``h [N, H]`` in chunks of ``rows``.

    Returns ``(ce [N], ntl [N], [dh [N, H], dW [V, H], db [V]])`` (fp32 losses; the
    gradients, with the scales ``a``, ``b`` applied, in ``h``'s dtype, ``db`` in fp32;
    ``None`` where ``need`` is False). ``h``, ``w``, ``bias`` share one dtype.
    """
    N, H = h.shape
    V = w.shape[0]
    dev, dt = h.device, h.dtype
    need_h, need_w, need_b = need
    ce = torch.empty(N, device=dev)
    L = torch.empty(N, device=dev)
    gh = torch.empty(N, H, dtype=dt, device=dev) if need_h else None
    gw = torch.empty(V, H, dtype=dt, device=dev) if need_w else None
    gb = torch.zeros(V, device=dev) if need_b else None
    if N == 0:
        if gw is not None:
            gw.zero_()
        return ce, L, [gh, gw, gb]
    buf = torch.empty(min(rows, N), V, dtype=dt, device=dev)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x, hc = buf[: e - s], h[s:e]
        if bias is None:
            torch.mm(hc, w.t(), out=x)
        else:
            torch.addmm(bias, hc, w.t(), out=x)
        ce[s:e], L[s:e] = _grad_rows(x, labels[s:e], k[s:e], ids, values, a[s:e], b[s:e], method,
                                     reweigh, dmax, use_kernel, squash, huber_delta)
        if gh is not None:
            torch.mm(x, w, out=gh[s:e])
        if gw is not None:
            if s == 0:
                torch.mm(x.t(), hc, out=gw)
            else:
                gw.addmm_(x.t(), hc)
        if gb is not None:
            gb += x.sum(0, dtype=torch.float32)
    return ce, L, [gh, gw, gb]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 runs in fp32 (see the module docstring); fp32 and bf16 run as they are."""
    return torch.float32 if dtype == torch.float16 else dtype


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             k: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, ntl_weight: float, method: str,
             reduction: str, reweigh: bool, dmax: float, ignore_index: int, rows: int, use_kernel: bool,
             squash: tuple[float, float] | None, huber_delta: float, need: tuple[bool, bool, bool],
             grad_scale: float | torch.Tensor | None = None, place: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]:
    """``(loss, ce_part, ntl_part, grads)``; the gradients (``need``, times ``grad_scale``) only
    for mean/sum. ``place [N]``: the per-row factor of the NTL loss (DEL's place weights)."""
    cd = _compute_dtype(hidden.dtype)
    a, c = row_scales(labels, k, ignore_index, reduction, weight.shape[0], None, place)
    if reduction == "none":
        need = (False, False, False)
    b = c * ntl_weight
    ga, gb = (a, b) if grad_scale is None or reduction == "none" else (a * grad_scale, b * grad_scale)
    ce, L, grads = _chunk_pass(hidden.to(cd), weight.to(cd), _as(bias, cd), labels, k, ids, values, ga,
                               gb, method, reweigh, dmax, rows, need, use_kernel, squash, huber_delta)
    ce = torch.where(a != 0, ce, torch.zeros((), device=ce.device))
    if reduction == "none":
        ce_part, ntl_part = ce, c * L  # c: 1 (times the place weight) on number rows
    else:
        ce_part, ntl_part = (a * ce).sum(), (c * L).sum()
    return ce_part + ntl_weight * ntl_part, ce_part, ntl_part, grads


class _LinearCENTL(torch.autograd.Function):
    """Gradients of ``hidden``, ``weight``, ``bias`` computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                ntl_weight: float, method: str, reduction: str, reweigh: bool, dmax: float,
                ignore_index: int, rows: int, use_kernel: bool, squash: tuple[float, float] | None,
                huber_delta: float, grad_scale: float | torch.Tensor | None, place: torch.Tensor | None):
        need = cast(tuple[bool, bool, bool], tuple(bool(n) for n in ctx.needs_input_grad[:3]))
        loss, ce_part, ntl_part, grads = _forward(hidden, weight, bias, labels, k, ids, values,
                                                  ntl_weight, method, reduction, reweigh, dmax,
                                                  ignore_index, rows, use_kernel, squash, huber_delta,
                                                  need, grad_scale, place)
        ctx.grad_scale = grad_scale
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels, k, ids, values, place)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.args = (ntl_weight, method, reweigh, dmax, ignore_index, rows, use_kernel, squash, huber_delta,
                    need)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(ce_part, ntl_part)
        return loss, ce_part, ntl_part

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any):  # pyright: ignore[reportIncompatibleMethodOverride]
        backward_once(ctx, "linear_cross_entropy_with_ntl",
                      "its gradients are computed in forward and scaled in place")
        ntl_weight, method, reweigh, dmax, ignore_index, rows, use_kernel, squash, huber_delta, need = ctx.args
        if ctx.reduction == "none":
            hidden, weight, bias, labels, k, ids, values, place = ctx.saved_tensors
            u = grad_out.reshape(-1).float()
            zero = torch.zeros((), device=u.device)
            valid = (labels != ignore_index) & (labels >= 0) & (labels < weight.shape[0])
            a = torch.where(valid, u, zero)
            b = torch.where(k >= 0, u * ntl_weight, zero)
            if place is not None:
                b = b * place
            cd = _compute_dtype(hidden.dtype)
            _ce, _ntl, grads = _chunk_pass(hidden.to(cd), weight.to(cd), _as(bias, cd), labels, k, ids,
                                      values, a, b, method, reweigh, dmax, rows, need, use_kernel, squash,
                                      huber_delta)
            scale = None
        else:
            grads, ctx.grads = ctx.grads, None  # drop ctx's reference: autograd can take the buffers
            # the fp32 incoming gradient as is (fp16: 2^16 from a GradScaler is inf in fp16)
            gs = ctx.grad_scale
            scale = grad_out.float() if gs is None else grad_out.float() / gs
        out: list[torch.Tensor | None] = []
        for g, dt in zip(grads, ctx.dtypes, strict=True):
            if g is not None and scale is not None:
                g = _scale(g, scale, in_place=g.dtype == dt, use_kernel=use_kernel)
            out.append(None if g is None else g.to(dt))
        return (*out, *(None,) * 16)


def _scale(g: torch.Tensor, f: torch.Tensor, in_place: bool, use_kernel: bool) -> torch.Tensor:
    """``g * f`` (``f`` a 0-d fp32 tensor), in place where ``in_place``. A factor of exactly 1
    touches nothing: decided on the device on the Triton path (:func:`scale_rows_triton` skips
    such rows), on the host on a CPU; PyTorch on CUDA always multiplies (no host sync)."""
    if not in_place:
        return g * f
    if use_kernel:
        from .kernels.ce_ntl import scale_rows_triton

        scale_rows_triton(g.view(-1, g.shape[-1]) if g.dim() > 1 else g.view(1, -1), f, None)
        return g
    if f.is_cuda or float(f) != 1.0:
        g.mul_(f)
    return g


# --------------------------------------------------------------------------- public API


def _check_options(ntl_weight: Any, chunk_size: Any, **flags: Any) -> None:
    C.check_ntl_weight(ntl_weight)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for name, flag in flags.items():
        C.check_bool(name, flag)


# The type of the result follows ``return_parts`` (overloads for type checkers only).
@overload
def linear_cross_entropy_with_ntl(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *,
    bias: torch.Tensor | None = ..., ntl_weight: float = ..., method: MethodLike = ..., ignore_index: int = ...,
    reduction: str = ..., reweigh: bool = ..., chunk_size: int | None = ...,
    return_parts: Literal[False] = ..., backend: str = ..., squash_factor: float | None = ...,
    huber_delta: float | None = ...,
    grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor: ...
@overload
def linear_cross_entropy_with_ntl(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *,
    bias: torch.Tensor | None = ..., ntl_weight: float = ..., method: MethodLike = ..., ignore_index: int = ...,
    reduction: str = ..., reweigh: bool = ..., chunk_size: int | None = ...,
    return_parts: Literal[True], backend: str = ..., squash_factor: float | None = ...,
    huber_delta: float | None = ...,
    grad_scale: float | torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@overload
def linear_cross_entropy_with_ntl(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *,
    bias: torch.Tensor | None = ..., ntl_weight: float = ..., method: MethodLike = ..., ignore_index: int = ...,
    reduction: str = ..., reweigh: bool = ..., chunk_size: int | None = ...,
    return_parts: bool = ..., backend: str = ..., squash_factor: float | None = ...,
    huber_delta: float | None = ...,
    grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@shared_docs
def linear_cross_entropy_with_ntl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    bias: torch.Tensor | None = None,
    ntl_weight: float = 0.3,
    method: MethodLike = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    reweigh: bool = False,
    chunk_size: int | None = None,
    return_parts: bool = False,
    backend: str = "auto",
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    grad_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``CE(hidden @ weight.T + bias, labels) + ntl_weight * NTL(...)`` without any ``[N, V]`` tensor.

    Equal in value and in the gradients of ``hidden``, ``weight`` and ``bias`` to
    ``ntl.cross_entropy_with_ntl(F.linear(hidden, weight, bias), labels, vocab, ...)``, i.e.
    ``F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=ignore_index,
    reduction=reduction) + ntl_weight * ntl_loss(logits, labels, vocab, method=method, ...)``
    (a batch with no non-ignored label gives CE = 0 instead of NaN; the CE mean is over
    non-ignored labels, the NTL mean over number-token labels). The rows are processed
    ``chunk_size`` at a time: each chunk's logits ``[chunk, V]`` live in one reused
    buffer, are turned into their gradient in place, and the gradients of ``hidden``,
    ``weight`` and ``bias`` are accumulated during the forward (see the module
    docstring), so backward only scales them (``reduction="none"``: backward runs the
    chunk pass once more with the incoming per-row gradients). One backward per forward;
    no second derivatives. Under ``torch.no_grad()``, or when none of ``hidden``,
    ``weight``, ``bias`` requires grad, no gradient is built.

    Args:
        hidden: ``[..., H]`` hidden states (fp32/bf16/fp16), aligned with ``labels``
            (for a causal LM, the state at position ``t-1`` scores the token at ``t``).
        weight: ``[V, H]`` LM-head weight (tied embeddings work the same way), same dtype.
        labels: ``[...]`` token ids (``hidden.shape[:-1]``); ``ignore_index`` takes no part.
        {vocab_or_tokenizer}
        {bias}
        {ntl_weight}
        {method}
        {ignore_index}
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``labels``-shaped).
        {reweigh}
        chunk_size: rows per chunk (default: :func:`linear_chunk_rows`); memory of the
            logits buffer is ``chunk_size x V`` elements.
        return_parts: also return the detached CE and NTL parts (for logging).
        backend: ``"auto"`` (the fused CE + NTL Triton kernel on CUDA), ``"torch"`` or
            ``"triton"``.
        {squash_factor}
        {huber_delta}
        grad_scale: the incoming gradient backward will get (a non-zero number or a 0-d float
            tensor on ``hidden``'s device; ``None``: 1), as in :func:`ntl.cross_entropy_with_ntl`:
            folded into the row scales, so the stored gradients are ``grad_scale`` times the
            loss's; the returned loss is not scaled. Backward multiplies them by ``grad_out /
            grad_scale``: exactly 1 touches none of them (the Triton path decides on the device,
            no host sync). Ignored with ``reduction="none"`` (backward runs the chunk pass with
            the incoming gradients then). Labels outside ``[0, V)`` take no part with strict
            checks off (and raise with them on).

    Returns:
        fp32 loss, or ``(loss, ce, ntl)`` with ``return_parts=True``.

    Raises:
        ValueError: shapes or dtypes that do not match, a bad ``chunk_size``/``ntl_weight``,
            options as in :func:`ntl.cross_entropy_with_ntl`.

    Example:
        >>> import torch, ntl
        >>> import torch.nn.functional as F
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> hidden, w = torch.randn(2, 3, 8), torch.randn(12, 8)
        >>> labels = torch.tensor([[3, 11, -100], [7, 0, 5]])
        >>> loss = ntl.linear_cross_entropy_with_ntl(hidden, w, labels, vocab, chunk_size=2)
        >>> ref = ntl.cross_entropy_with_ntl(F.linear(hidden, w), labels, vocab)
        >>> torch.allclose(loss, ref, atol=1e-5)
        True
    """
    m = resolve_method(method, squash_factor, huber_delta)
    _check_options(ntl_weight, chunk_size, reweigh=reweigh, return_parts=return_parts)
    m.check_reweigh(reweigh)
    V = C.check_head(hidden, weight, bias, same_dtype=True)
    labels1d, vocab, k, _ = prepare_labels(labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]",
                                           V, vocab_or_tokenizer, ignore_index, None, reduction)
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    use_kernel = resolve_backend(backend, *tensors, method=m)
    H = hidden.shape[-1]
    h2d = hidden.reshape(-1, H)
    rows = linear_chunk_rows(h2d.shape[0], H, V, hidden.device, chunk_size)
    dev = hidden.device
    spec = loss_spec(vocab, None, V, m)  # D and the method's scalars, cached per vocab
    args = (labels1d, k, vocab.ids(dev), vocab.values_on(dev), float(ntl_weight), spec.method, reduction,
            reweigh, float(spec.dmax), ignore_index, rows, use_kernel,
            (spec.sq_a, spec.sq_b) if spec.squash else None, spec.delta)
    grad_scale = C.check_grad_scale(grad_scale, hidden.device)
    place = place_scale(m, labels, vocab_or_tokenizer, spec, ignore_index, V)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        loss, ce, ntl = _LinearCENTL.apply(h2d, weight, bias, *args, grad_scale, place)
    else:
        with torch.no_grad():
            loss, ce, ntl, _ = _forward(h2d, weight, bias, *args, (False, False, False), None, place)
    if reduction == "none":
        loss, ce, ntl = (t.view(labels.shape) for t in (loss, ce, ntl))
    return (loss, ce, ntl) if return_parts else loss


@shared_docs
class LinearCrossEntropyWithNTL(nn.Module):
    """:func:`linear_cross_entropy_with_ntl` as a module: ``crit(hidden, weight, labels, bias=None)``.

    The LM head stays with the model (pass ``model.lm_head.weight``, tied or not); the
    vocabulary and the method are resolved once at construction.

    Args:
        {vocab_or_tokenizer}
        {ntl_weight}
        {method}
        {ignore_index}
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``labels``-shaped).
        {reweigh}
        chunk_size: rows per chunk (default: :func:`linear_chunk_rows`).
        backend: ``"auto"`` (the fused CE + NTL Triton kernel on CUDA), ``"torch"`` or
            ``"triton"``.
        {vocab_size}
        {squash_factor}
        {huber_delta}

    Raises:
        ValueError: an option out of range, a method the vocab cannot take.

    Example:
        >>> import torch, ntl
        >>> crit = ntl.LinearCrossEntropyWithNTL(ntl.DigitVocab(range(10), 12), ntl_weight=0.5)
        >>> hidden = torch.randn(4, 8, requires_grad=True)
        >>> loss = crit(hidden, torch.randn(12, 8), torch.tensor([3, 11, 7, -100]))
        >>> loss.backward(); hidden.grad.shape
        torch.Size([4, 8])
    """

    vocab: NumberVocab
    method: Method
    ntl_weight: float
    ignore_index: int
    reduction: str
    backend: str
    reweigh: bool
    chunk_size: int | None

    def __init__(
        self,
        vocab_or_tokenizer: VocabLike,
        *,
        ntl_weight: float = 0.3,
        method: MethodLike = "wasserstein",
        ignore_index: int = -100,
        reduction: str = "mean",
        reweigh: bool = False,
        chunk_size: int | None = None,
        backend: str = "auto",
        vocab_size: int | None = None,
        squash_factor: float | None = None,
        huber_delta: float | None = None,
    ) -> None:
        super().__init__()
        self.vocab = resolve_vocab(vocab_or_tokenizer, vocab_size)
        self.method = bind_decimal_point(resolve_method(method, squash_factor, huber_delta), vocab_or_tokenizer)
        self.method.kernel_scalars(self.vocab)  # a vocab the method cannot use fails here
        _check_options(ntl_weight, chunk_size, reweigh=reweigh)
        self.method.check_reweigh(reweigh)
        self.ntl_weight = float(ntl_weight)
        self.ignore_index = C.check_ignore_index(ignore_index)
        self.reduction = C.check_choice("reduction", reduction, C.REDUCTIONS)
        self.backend = C.check_backend(backend)
        self.reweigh = reweigh
        self.chunk_size = chunk_size

    @shared_docs
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``hidden @ weight.T + bias`` against ``labels``.

        Args:
            hidden: ``[..., H]`` hidden states.
            weight: ``[V, H]`` LM-head weight.
            labels: ``[...]`` token ids (``hidden.shape[:-1]``).
            {bias}

        Returns:
            fp32 loss (``labels``-shaped for ``reduction="none"``).
        """
        return linear_cross_entropy_with_ntl(  # type: ignore[return-value]
            hidden, weight, labels, self.vocab, bias=bias, ntl_weight=self.ntl_weight, method=self.method,
            ignore_index=self.ignore_index, reduction=self.reduction, reweigh=self.reweigh,
            chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ntl_weight={self.ntl_weight}, method={self.method.describe()}, K={self.vocab.K}, "
                f"reduction={self.reduction!r}, reweigh={self.reweigh}, chunk_size={self.chunk_size}")
