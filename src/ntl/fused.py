"""Fused cross-entropy + NTL with a single ``N x V`` gradient buffer (or none).

``F.cross_entropy(...) + w * ntl_loss(...)`` materialises the CE gradient and a
second dense ``N x V`` NTL gradient that autograd then adds. Here the gradient
of the whole objective is computed during the forward pass, row block by row
block, into one buffer (or over the logits themselves with ``inplace=True``, as
Liger-Kernel does); backward only scales it by the incoming gradient, and skips
that when the incoming gradient is 1 (on CUDA decided on the device) -- or equals the
``grad_scale`` the forward was told of (``loss / k`` in gradient accumulation, a
GradScaler's scale), which the forward folds into the per-row scales.

Per row with full softmax ``p = softmax(x)``, label ``c`` and CE scale ``a``,
NTL scale ``b`` (``w / n_ntl`` for the mean)::

    dLoss/dx = a (p - e_c) + b * scatter_ids(dNTL/dz)

and with ``reweigh=True`` (``L' = m L + D (1 - m)``, ``m = sum_{k in ids} p_k``)::

    dL'/dx_j = m dL/dx_j + (L - D) (p_j 1[j in ids] - m p_j)

A row with ``a = b = 0`` (label ``ignore_index``) gets a zero gradient. fp16
gradients are stored times a power of two per row, ``S_i``, that puts the row's
largest entry in ``[2^14, 2^15)``; backward multiplies by ``grad_out / S_i`` in
fp32. So a GradScaler scale (a power of two) costs no extra rounding and small
entries are not flushed to zero before it is applied (fp16 has 5 exponent bits;
``a = 1 / n`` alone pushes most entries below its range at ``n = 16k``).

``squash_factor`` (``ntloss.NTLoss(squash_factor=...)``) only reshapes the W1 distance
table: ``d > 0`` becomes ``sq_a + sq_b d`` (:func:`ntl.methods.squash_table`), so ``dNTL/dz``
keeps its form ``q_j (d_j - L)``; with ``reweigh`` ``D = 1.01 squash_factor``.

Eager calls run :class:`_FusedCENTL` (an autograd Function: no custom-op dispatch);
under ``torch.compile`` the call is the custom op ``ntl::ce_ntl_fwd`` (a fake for its
shapes, the same :func:`_fused_call` inside) whose registered backward multiplies the
saved buffer by the incoming gradient with traceable ops.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, overload

import torch

from . import _checks as C
from ._docs import shared_docs
from .kernels._triton import backward_once
from .kernels.reference import ntl_rows_grad_torch, ntl_rows_torch, number_index_torch
from .losses import MethodLike, loss_spec, place_scale, resolve_method, use_triton
from .vocab import VocabLike, vocab_from_handle

__all__ = ["cross_entropy_with_ntl"]

_CHUNK_ELEMS = 1 << 22  # fp32 elements per row block on the CPU path (16 MB): few, large parallel regions


_EPS = torch.finfo(torch.float32).eps


def row_scales(labels: torch.Tensor, k: torch.Tensor, ignore_index: int,
               reduction: str, V: int, weights: torch.Tensor | None = None,
               place: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row reduction scales of CE (``a``) and NTL (``c``), fp32, no host sync.

    mean: ``a_i = 1[label_i valid] / n_valid``, ``c_i = 1[label_i number] / n_number``;
    sum/none: the indicators themselves. Valid: in ``[0, V)`` and not ``ignore_index`` (a
    label outside ``[0, V)`` takes no part, as with strict checks off; ``k`` is then -1).
    With per-position NTL ``weights`` (as :func:`ntl.ntl_loss` takes them):
    ``c_i = w_i 1[label_i number]``, over ``max(sum_i c_i, eps)`` for the mean. ``place [N]``
    (DEL's place weights): ``c_i`` times ``place_i`` after the mean's divisor is formed.
    """
    valid = labels.clamp(0, V - 1) == labels  # in [0, V) (ignore_index outside it: not valid)
    if 0 <= ignore_index < V:
        valid &= labels != ignore_index
    valid = valid.float()
    if weights is None:
        active = (k >= 0).float()
        den = active.sum().clamp_min(1.0)
    else:
        active = torch.where(k >= 0, weights.float(), torch.zeros((), device=k.device))
        den = active.sum().clamp_min(_EPS)
    c = active / den if reduction == "mean" else active
    if place is not None:
        c = c * place
    return (valid / valid.sum().clamp_min(1.0) if reduction == "mean" else valid), c


def pow2_row_scale(gmax: torch.Tensor) -> torch.Tensor:
    """``S = 2^j`` with ``gmax * S`` in ``[2^14, 2^15)`` (``j`` in ``[-126, 126]``; 1 where
    ``gmax == 0``): the per-row scale of fp16 gradients (the kernel's ``ROW_SCALE``)."""
    _, e = torch.frexp(gmax)  # gmax in [2^(e-1), 2^e)
    S = torch.ldexp(torch.ones_like(gmax), (15 - e).clamp(-126, 126))
    return torch.where(gmax > 0, S, torch.ones((), device=gmax.device))


def ce_ntl_rows_torch(
    x: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, method: str, reweigh: bool, dmax: float,
    out: torch.Tensor | None, rinv: torch.Tensor | None = None,
    squash: tuple[float, float] | None = None, huber_delta: float = 1.0,
    rows: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row block: CE and NTL per row, and the scaled gradient written to ``out``.

    ``out`` may alias ``x`` (in-place mode): everything read from ``x`` is read first;
    ``out=None``: losses only (evaluation), ``x`` is only read.
    With ``rinv`` (fp16 gradients) row ``i`` is stored times ``S_i``
    (:func:`pow2_row_scale` of the bound ``max(|coef|, |g_label|, max_k |g_k|)``, as in
    the kernel) and ``rinv[i] = 1 / S_i``. A row with ``a = b = 0`` gets zeros (also
    when its logits are all ``-inf``). ``squash = (sq_a, sq_b)``: the W1 distances
    ``d > 0`` become ``sq_a + sq_b d`` (:func:`ntl.methods.squash_table`); ``huber_delta``:
    the Huber threshold; ``method`` a name in :mod:`ntl.methods`. ``rows``: the block's
    ``(L [n], dL/dz [n, K])`` of the row formula computed beforehand (for all blocks at once:
    :func:`fused_forward`); ``dL/dz`` may be ``None`` with ``out=None``. Returns
    ``(ce [n], ntl [n])`` fp32 (unscaled per-row losses).
    """
    V = x.shape[1]
    zero = torch.zeros((), device=x.device)
    xf = x.float()
    z = xf.index_select(1, ids) if rows is None else None  # read before out (maybe x) is written
    lab = labels.clamp(0, V - 1)[:, None]
    x_lab = xf.gather(1, lab).squeeze(1)
    m = xf.amax(1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)  # an all -inf row: p = 0, not NaN
    if out is not None and out.dtype == torch.float32 and (
            out.data_ptr() == x.data_ptr() or out.is_contiguous()):
        p = torch.sub(xf, m, out=out)  # exp computed straight into the gradient buffer
    else:
        p = xf - m
    p.exp_()
    s = p.sum(1)
    ce = m.squeeze(1) + s.log() - x_lab
    if rows is not None:
        L, dz_given = rows
        if dz_given is not None:
            dz = dz_given
        elif out is not None:
            raise ValueError("ce_ntl_rows_torch: rows needs dL/dz when the gradient is written")
    elif out is None:
        L = ntl_rows_torch(z, k, values, method, squash=squash, huber_delta=huber_delta)  # pyright: ignore[reportArgumentType]
    else:
        L, dz, _ = ntl_rows_grad_torch(z, k, values, method, squash=squash, huber_delta=huber_delta)  # pyright: ignore[reportArgumentType]
    s = s.clamp_min(1.0)  # no-op for a row with a finite logit; 0 -> 1 for an all -inf row
    coef = a / s
    # dz and digit are bound exactly when out is not None (which the type checker cannot follow)
    if reweigh:
        pd = torch.where((k >= 0)[:, None], p.index_select(1, ids) / s[:, None], zero)
        mass = pd.sum(1)
        if out is not None:
            rel = L - dmax
            coef = coef - b * rel * mass / s
            digit = b[:, None] * (mass[:, None] * dz + rel[:, None] * pd)  # pyright: ignore[reportPossiblyUnboundVariable]
        L = torch.where(k >= 0, mass * L + dmax * (1.0 - mass), zero)
    elif out is not None:
        digit = b[:, None] * dz  # pyright: ignore[reportPossiblyUnboundVariable]
    if out is None:
        return ce, L
    a_s = a
    if rinv is not None:
        g_lab = coef * torch.exp(x_lab - m.squeeze(1)) - a
        gd = coef[:, None] * p.index_select(1, ids) + digit - torch.where(ids[None, :] == lab, a[:, None], zero)  # pyright: ignore[reportPossiblyUnboundVariable]
        gd_max = torch.where((k >= 0)[:, None], gd.abs(), zero).amax(1)
        S = pow2_row_scale(torch.maximum(torch.maximum(coef.abs(), g_lab.abs()), gd_max))
        coef, a_s, digit = coef * S, a * S, digit * S[:, None]  # pyright: ignore[reportPossiblyUnboundVariable]
        rinv.copy_(1.0 / S)
    p.mul_(coef[:, None])
    p.scatter_add_(1, lab, -a_s[:, None])
    p.index_add_(1, ids, digit)  # pyright: ignore[reportPossiblyUnboundVariable]
    if p.data_ptr() != out.data_ptr():
        out.copy_(p)
    return ce, L


def _combine(a: torch.Tensor, c: torch.Tensor, ce: torch.Tensor, L: torch.Tensor, ntl_weight: float,
             reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce_part, ntl_part)`` from per-row losses (rows ``[N]`` for ``"none"``)."""
    if reduction == "none":
        ce_part, ntl_part = ce, c * L  # c: the weights (1 without) on number rows, L: 0 elsewhere
    else:
        ce_part, ntl_part = (a * ce).sum(), (c * L).sum()
    return ce_part + ntl_weight * ntl_part, ce_part, ntl_part


def fused_forward(
    logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor,
    values: torch.Tensor, ntl_weight: float, method: str, reduction: str, reweigh: bool, dmax: float,
    ignore_index: int, inplace: bool, use_kernel: bool, write_grad: bool = True,
    squash: tuple[float, float] | None = None, grad_scale: float | torch.Tensor | None = None,
    huber_delta: float = 1.0, weights: torch.Tensor | None = None, place: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of ``CE + w NTL`` on ``logits [N, V]`` and, with ``write_grad``, its gradient.

    Returns ``(grad, rinv, loss, ce_part, ntl_part)``: ``grad [N, V]`` in the logits'
    dtype (the logits themselves with ``inplace``; ``None`` without ``write_grad``), times
    ``grad_scale`` when given (the loss is not scaled),
    ``rinv [N]`` (fp16 gradients only: row ``i`` of ``grad`` is stored times
    ``1 / rinv[i]``; else ``None``). On the Triton path this is one kernel launch
    (plus the ``[N]``-sized scales and sums), with no host sync; without ``write_grad``
    it only reads the logits. ``weights [N]``: per-position NTL weights, ``place [N]`` the
    per-row loss factor (DEL's place weights; :func:`row_scales`).
    """
    N, V = logits.shape
    a, c = row_scales(labels, k, ignore_index, reduction, V, weights, place)
    b = c * ntl_weight
    ga, gb = (a, b) if grad_scale is None else (a * grad_scale, b * grad_scale)
    if use_kernel:
        from .kernels.ce_ntl import ce_ntl_fwd_triton

        grad, rinv, ce, L = ce_ntl_fwd_triton(logits, labels, k, ids, values, ga, gb, method, reweigh,
                                              dmax, inplace, write_grad, squash=squash,
                                              huber_delta=huber_delta)
    else:
        grad = rinv = None
        if write_grad:
            grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
            if grad.dtype == torch.float16:
                rinv = torch.empty(N, device=logits.device)
        ce = torch.empty(N, device=logits.device)
        L = torch.empty(N, device=logits.device)
        step = max(1, _CHUNK_ELEMS // V)
        # the row formula over the N x K number logits once, not per row block: on a loaded CPU
        # every small op costs about a scheduler time slice, and the methods differ in op count
        z = logits.index_select(1, ids).float()  # read before an in-place block overwrites them
        if write_grad:
            L_all, dz_all, _ = ntl_rows_grad_torch(z, k, values, method, squash=squash, huber_delta=huber_delta)
        else:
            L_all, dz_all = ntl_rows_torch(z, k, values, method, squash=squash, huber_delta=huber_delta), None
        for s in range(0, N, step):
            e = min(N, s + step)
            ce[s:e], L[s:e] = ce_ntl_rows_torch(
                logits[s:e], labels[s:e], k[s:e], ids, values, ga[s:e], gb[s:e], method, reweigh, dmax,
                grad[s:e] if grad is not None else None, rinv[s:e] if rinv is not None else None,
                squash=squash, huber_delta=huber_delta,
                rows=(L_all[s:e], dz_all[s:e] if dz_all is not None else None))
        ce = torch.where(a != 0, ce, torch.zeros((), device=ce.device))
    return (grad, rinv, *_combine(a, c, ce, L, ntl_weight, reduction))


def fused_backward(grad: torch.Tensor, rinv: torch.Tensor | None, grad_out: torch.Tensor,
                   reduction: str, use_kernel: bool,
                   grad_scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Scale the stored gradient in place by ``grad_out / grad_scale`` (and ``rinv``), in fp32.

    Triton: one launch; rows whose factor is exactly 1 are not touched, so an incoming
    gradient equal to ``grad_scale`` (1 without it) costs no ``N x V`` traffic and no host
    sync. PyTorch: skipped on a CPU when the factor is 1; on CUDA always one multiply.
    """
    # the fp32 incoming gradient as is: casting it to fp16 first would turn a GradScaler
    # scale of 2^16 into inf
    f = grad_out.float() if grad_scale is None else grad_out.float() / grad_scale
    if use_kernel:
        from .kernels.ce_ntl import scale_rows_triton

        scale_rows_triton(grad, f, rinv)
        return grad
    go = f.reshape(-1, 1) if reduction == "none" else f
    if rinv is not None:
        grad.mul_(go * rinv[:, None])
    elif f.is_cuda or not bool((f == 1.0).all()):
        grad.mul_(go)
    return grad


class FusedConfig(NamedTuple):
    """Everything but the tensors: the constants of one call (hashable Python scalars)."""

    handle: int  # the vocab (:attr:`ntl.NumberVocab.handle`)
    W: int  # labels must lie in [0, W) (W = V, the logits' width)
    method: str  # a name registered in ntl.methods
    reduction: str
    ignore_index: int
    reweigh: bool
    dmax: float  # reweigh ceiling D
    squash: bool
    sq_a: float
    sq_b: float
    delta: float  # Huber delta
    ntl_weight: float
    use_triton: bool
    check: bool  # data-dependent label checks (strict)


def _fused_call(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                cfg: FusedConfig, write_grad: bool, inplace: bool,
                grad_scale: float | torch.Tensor | None = None, place: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    """The label (and weight) checks, label -> number index, and :func:`fused_forward`; what both
    the eager Function and the custom op run (so the compiled graph runs the same code as eager)."""
    if cfg.check:
        C.check_values(labels, cfg.W, cfg.ignore_index, weights)
    vocab = vocab_from_handle(cfg.handle)
    dev = logits.device
    k = number_index_torch(labels, vocab.index_table(cfg.W, dev), cfg.ignore_index)
    return fused_forward(logits, labels, k, vocab.ids(dev), vocab.values_on(dev), cfg.ntl_weight,
                         cfg.method, cfg.reduction, cfg.reweigh, cfg.dmax, cfg.ignore_index, inplace,
                         cfg.use_triton, write_grad, (cfg.sq_a, cfg.sq_b) if cfg.squash else None,
                         grad_scale, cfg.delta, weights, place)


class _FusedCENTL(torch.autograd.Function):
    """Eager path: gradient computed in forward (:func:`fused_forward`), scaled in place in backward."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                cfg: FusedConfig, inplace: bool, grad_scale: float | torch.Tensor | None,
                place: torch.Tensor | None):
        grad, rinv, loss, ce_part, ntl_part = _fused_call(logits, labels, weights, cfg, True, inplace,
                                                          grad_scale, place)
        if inplace and cfg.use_triton:  # the kernel wrote over the logits: let autograd see it
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad.detach(), rinv)  # type: ignore[union-attr]
        ctx.reduction = cfg.reduction
        ctx.use_kernel = cfg.use_triton
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(ce_part, ntl_part)
        return loss, ce_part, ntl_part

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any):  # pyright: ignore[reportIncompatibleMethodOverride]
        backward_once(ctx, "cross_entropy_with_ntl", "its gradient buffer is scaled in place")
        grad, rinv = ctx.saved_tensors
        return (fused_backward(grad, rinv, grad_out, ctx.reduction, ctx.use_kernel, ctx.grad_scale),
                None, None, None, None, None, None)


# ------------------------------------------------------------------ custom op (torch.compile)
@torch.library.custom_op("ntl::ce_ntl_fwd", mutates_args=())
def _ce_ntl_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, handle: int, W: int,
    method: str, reduction: str, ignore_index: int, reweigh: bool, dmax: float, squash: bool,
    sq_a: float, sq_b: float, delta: float, ntl_weight: float, use_triton: bool, check: bool,
    write_grad: bool, inplace: bool, gscale: float, gscale_t: torch.Tensor | None,
    place: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad [N, V] | [0], rinv [N] | [0], loss, ce, ntl)``: :func:`fused_forward` out of place
    (empty tensors stand for ``None``), the gradient times ``gscale_t`` (a tensor
    ``grad_scale``) or else ``gscale`` (1: none). ``inplace`` (asked for in a compiled graph) raises when
    the graph runs: with or without ``fullgraph`` the graph holds the logits as a functional
    value, so writing the gradient "over" them would write into a copy."""
    if inplace:
        raise ValueError(
            "cross_entropy_with_ntl: inplace=True is not supported under torch.compile (the "
            "compiled graph would write the gradient into a copy of the logits, not over them); "
            "pass inplace=False in compiled code, or call it eagerly")
    cfg = FusedConfig(handle=handle, W=W, method=method, reduction=reduction,
                      ignore_index=ignore_index, reweigh=reweigh, dmax=dmax, squash=squash,
                      sq_a=sq_a, sq_b=sq_b, delta=delta, ntl_weight=ntl_weight,
                      use_triton=use_triton, check=check)
    gs = gscale_t if gscale_t is not None else (None if gscale == 1.0 else gscale)
    grad, rinv, loss, ce, ntl = _fused_call(logits, labels, weights, cfg, write_grad, False, gs, place)
    return (grad if grad is not None else logits.new_empty(0),
            rinv if rinv is not None else logits.new_empty(0, dtype=torch.float32), loss, ce, ntl)


@_ce_ntl_fwd_op.register_fake
def _(logits, labels, weights, handle, W, method, reduction, ignore_index, reweigh, dmax, squash, sq_a,
      sq_b, delta, ntl_weight, use_triton, check, write_grad, inplace, gscale, gscale_t, place):
    N = logits.shape[0]
    grad = (logits.new_empty(logits.shape) if write_grad
            else logits.new_empty(0))
    rinv = logits.new_empty(N if write_grad and logits.dtype == torch.float16 else 0, dtype=torch.float32)
    shape = (N,) if reduction == "none" else ()
    return (grad, rinv, *(logits.new_empty(shape, dtype=torch.float32) for _ in range(3)))


def _op_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad, rinv, _loss, ce, ntl = output
    ctx.mark_non_differentiable(grad, rinv, ce, ntl)
    gscale_t = inputs[20]
    ctx.save_for_backward(grad, rinv, gscale_t if gscale_t is not None else rinv.new_empty(0))
    ctx.reduction = inputs[6]
    ctx.gscale = inputs[19]


def _op_backward(ctx: Any, _g_grad: Any, _g_rinv: Any, g: torch.Tensor, *_parts: Any):
    """``grad x g / grad_scale`` (``x rinv`` for fp16) in fp32, traceable: under inductor a
    pointwise kernel that may write into the saved buffer (AOTAutograd donates it to the
    backward)."""
    grad, rinv, gscale_t = ctx.saved_tensors
    f = g.float().reshape(-1, 1) if ctx.reduction == "none" else g.float()
    f = f / (gscale_t.reshape(()) if gscale_t.numel() else ctx.gscale)
    if rinv.numel():
        f = f * rinv[:, None]
    return ((grad.float() * f).to(grad.dtype),) + (None,) * 21


_ce_ntl_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def _ce_ntl(logits2d: torch.Tensor, labels1d: torch.Tensor, weights: torch.Tensor | None,
            cfg: FusedConfig, grad: bool, inplace: bool,
            grad_scale: float | torch.Tensor | None = None, place: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, ntl)``: the eager Function or no-grad call, or under ``torch.compile`` the op."""
    if torch.compiler.is_compiling():
        gs_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
        gs = grad_scale if isinstance(grad_scale, float) else 1.0
        return torch.ops.ntl.ce_ntl_fwd(logits2d, labels1d, weights, *cfg, grad, inplace and grad, gs,
                                        gs_t, place)[2:]
    if grad:
        return _FusedCENTL.apply(logits2d, labels1d, weights, cfg, inplace, grad_scale, place)
    return _fused_call(logits2d, labels1d, weights, cfg, False, False, None, place)[2:]


# The type of the result follows ``return_parts`` (overloads for type checkers only).
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: Literal[False] = ...,
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor: ...
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: Literal[True],
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: bool = ...,
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@shared_docs
def cross_entropy_with_ntl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ntl_weight: float = 0.3,
    method: MethodLike = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    reweigh: bool = False,
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    weights: torch.Tensor | None = None,
    inplace: bool = False,
    return_parts: bool = False,
    backend: str = "auto",
    grad_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``CE(logits, labels) + ntl_weight * NTL(logits, labels)`` with one ``N x V`` gradient.

    Equal in value and gradient to
    ``F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=ignore_index,
    reduction=reduction) + ntl_weight * ntl_loss(logits, labels, vocab, method=method,
    weights=weights, ...)`` (for every method of :mod:`ntl.methods`),
    except that a batch with no non-ignored label gives CE = 0 instead of NaN. The
    CE mean is over non-ignored labels, the NTL mean over number-token labels.

    The gradient is computed during forward into one ``N x V`` buffer in the
    logits' dtype; backward scales it by the incoming gradient, so only one
    backward per forward is allowed. With ``inplace=True`` that buffer **is the
    logits tensor**: after the call ``logits`` holds the gradient, not the logits
    (use it only when nothing else needs the logits, e.g. straight after the LM
    head; autograd raises if another node saved them). Under ``torch.no_grad()``
    or for logits that do not require grad, no gradient is built and the logits
    are left untouched, ``inplace`` or not. On a leaf tensor, ``inplace=True``
    makes ``logits.grad`` share the logits' storage (it is the same gradient).
    fp16 logits: until backward each row holds its gradient times a power of two
    (see the module docstring), so fp16 backward always rescales the ``N x V`` buffer;
    bf16/fp32 backward with an incoming gradient of 1 touches nothing.
    Second derivatives are not supported (backward raises under ``create_graph``).

    ``grad_scale=s``: the incoming gradient the caller will send (``(loss * s).backward()``,
    ``(loss / k).backward()`` with ``s = 1 / k``, ``scaler.scale(loss).backward()`` with
    ``s`` the GradScaler's scale). The stored gradient is ``s dLoss/dlogits`` (folded into
    the row scales in forward); the returned loss (and the parts) are **not** scaled. Backward
    multiplies by ``grad_out / s`` (fp32): when ``grad_out == s`` exactly, the Triton path
    reads and writes nothing over ``N x V`` and makes no host sync (bf16/fp32; fp16 rescales
    anyway, see above); any other ``grad_out`` still gives the right gradient, with that
    extra pass. A 0-d tensor on the logits' device avoids the host read of a float (e.g.
    pass the GradScaler's scale tensor rather than ``scaler.get_scale()``, which syncs).
    Labels outside ``[0, V)`` (other than ``ignore_index``) raise with strict checks on; with
    them off (:func:`ntl.set_strict_checks`) they take no part in CE or NTL (nor in the mean's
    count).

    ``torch.compile(fullgraph=True)``: the call is one custom op (``ntl::ce_ntl_fwd``, the
    vocab a constant; the label checks run inside it, so strict checks do not break the
    graph); its backward is a traceable multiply of the saved buffer (always run, even for
    an incoming gradient of 1). ``inplace=True`` with a gradient to build raises a
    ``ValueError`` when the compiled graph runs (``fullgraph`` or not): the graph holds the
    logits as a functional value, so the gradient would land in a copy, not over them.

    Args:
        {logits}
        labels: ``[...]`` token ids; ``ignore_index`` positions take no part in CE, and
            only number-token labels in NTL.
        {vocab_or_tokenizer}
        {ntl_weight}
        {method}
        {ignore_index}
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``labels``-shaped).
        {reweigh}
        {squash_factor}
        {huber_delta}
        {weights} CE is unweighted; they get no gradient
            (a ``weights`` tensor that requires grad is refused).
        inplace: write the gradient over ``logits`` (no extra ``N x V`` memory); see above.
        return_parts: also return the detached CE and NTL parts (for logging).
        {backend}
        grad_scale: the incoming gradient backward will get (a non-zero number or a 0-d
            float tensor on the logits' device; ``None``: 1); see above.

    Returns:
        fp32 loss, or ``(loss, ce, ntl)`` with ``return_parts=True``.

    Raises:
        ValueError: shapes, options or labels out of range (strict checks); ``inplace=True``
            inside a compiled graph that builds a gradient.
        TypeError: non-float logits, non-integer labels, a vocab of the wrong kind.

    Example:
        >>> import torch, ntl
        >>> import torch.nn.functional as F
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(2, 12, requires_grad=True)
        >>> labels = torch.tensor([3, 11])
        >>> loss, ce, nt = ntl.cross_entropy_with_ntl(logits, labels, vocab, ntl_weight=0.5,
        ...                                           return_parts=True)
        >>> torch.allclose(ce, F.cross_entropy(logits, labels)), round(nt.item(), 2)
        (True, 2.7)
        >>> loss.backward(); logits.grad.shape
        torch.Size([2, 12])
    """
    m = resolve_method(method, squash_factor, huber_delta)
    C.check_ntl_weight(ntl_weight)
    for name, flag in (("reweigh", reweigh), ("inplace", inplace), ("return_parts", return_parts)):
        C.check_bool(name, flag)
    m.check_reweigh(reweigh)
    logits = C.check_logits(logits)
    V = logits.shape[-1]
    labels = C.check_labels(labels, logits.shape[:-1], logits.device)
    ignore_index = C.check_ignore_index(ignore_index)
    C.check_choice("reduction", reduction, C.REDUCTIONS)
    w = C.check_weights(weights, labels)
    if w is not None and w.requires_grad and torch.is_grad_enabled():
        raise ValueError("cross_entropy_with_ntl does not differentiate weights; pass weights.detach() "
                         "(or use ntl.ntl_loss, whose weights get a gradient)")
    spec = loss_spec(vocab_or_tokenizer, None, V, m)
    C.check_ids_fit(spec.max_id, spec.vocab_size, V)
    logits2d = logits.reshape(-1, V)
    if inplace and not torch.compiler.is_compiling() and (
            logits2d.data_ptr() != logits.data_ptr() or logits2d.stride(-1) != 1):
        raise ValueError("inplace=True needs logits that can be viewed as [N, V] without a copy, "
                         f"with a contiguous last dimension (got strides {tuple(logits.stride())})")
    cfg = FusedConfig(handle=spec.handle, W=V, method=spec.method, reduction=reduction,
                      ignore_index=ignore_index, reweigh=reweigh, dmax=spec.dmax,
                      squash=spec.squash, sq_a=spec.sq_a, sq_b=spec.sq_b, delta=spec.delta,
                      ntl_weight=float(ntl_weight),
                      use_triton=use_triton(backend, logits2d, method=m), check=C.strict_checks())
    grad_scale = C.check_grad_scale(grad_scale, logits.device)
    grad = torch.is_grad_enabled() and logits.requires_grad
    w1d = w.reshape(-1).contiguous() if w is not None else None
    place = place_scale(m, labels, vocab_or_tokenizer, spec, ignore_index, V)
    loss, ce, ntl = _ce_ntl(logits2d, labels.reshape(-1), w1d, cfg, grad, inplace, grad_scale, place)
    if reduction == "none":
        loss, ce, ntl = (t.view(labels.shape) for t in (loss, ce, ntl))
    return (loss, ce, ntl) if return_parts else loss
