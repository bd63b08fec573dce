"""The standalone losses as one autograd Function, and as ``torch.library`` custom ops.

:func:`ntl_loss_apply` is what every standalone entry point calls. In eager mode it
runs :class:`NTLLossFunction` (no custom-op dispatch cost); under ``torch.compile``
it calls the custom op ``ntl::loss_fwd``, which ``register_fake`` gives shapes and
``register_autograd`` a backward (``ntl::loss_bwd``), so Dynamo sees one opaque,
traceable node and the compiled graph runs the same code as eager. Either way the
forward is :func:`ntl.kernels.ntl_loss.ntl_loss_fwd_triton` (CUDA, or the interpreter)
or its twin :func:`ntl.kernels.reference.ntl_loss_fwd_torch`, and the data-dependent
checks run inside (so with strict checks on they cannot break a compiled graph).

The vocab travels as its integer :attr:`ntl.NumberVocab.handle`; its device tensors
(ids, values, the dense label -> index table) come from the vocab's cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from .. import _checks as C
from ..vocab import vocab_from_handle
from ._triton import no_double_backward
from .reference import ntl_loss_bwd_torch, ntl_loss_fwd_torch, number_index_torch

__all__ = ["LossConfig", "ntl_loss_apply", "number_rows"]


class LossConfig(NamedTuple):
    """Everything but the tensors: constants of one call (hashable, Python scalars only)."""

    handle: int  # the vocab
    W: int  # width of the label -> number-index table (labels >= W are text)
    digit_cols: bool  # x holds the K number logits themselves (else: [N, V] logits)
    pre_indexed: bool  # labels are already number indices k (-1: no part)
    method: str  # a name registered in ntl.methods (the twin's formula, the kernel's code)
    reduction: str  # none | sum | mean
    ignore_index: int
    reweigh: bool
    dmax: float  # reweigh ceiling D
    squash: bool
    sq_a: float
    sq_b: float
    delta: float  # Huber delta
    use_triton: bool
    check: bool  # data-dependent checks (strict)
    hi: int  # labels must be < hi (-1: no upper bound)
    hi_what: str  # where hi came from (error message)
    need_dz: bool


def _vocab_tensors(cfg: LossConfig, device: torch.device) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(ids or None, values, index table [W + 1])`` from the vocab's cache."""
    vocab = vocab_from_handle(cfg.handle)
    ids = None if cfg.digit_cols else vocab.ids(device)
    table = vocab.index_table(None if cfg.pre_indexed else cfg.W, device)
    return ids, vocab.values_on(device), table


def _forward(x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
             cfg: LossConfig, scale: Tensor | None = None) -> tuple[Tensor, ...]:
    if cfg.check:
        C.check_values(labels, cfg.hi if cfg.hi >= 0 else None, cfg.ignore_index, weights, cfg.hi_what)
    ids, values, lut = _vocab_tensors(cfg, x.device)
    squash = (cfg.sq_a, cfg.sq_b) if cfg.squash else None
    args = (x, labels, weights, soft, ids, values, lut, cfg.ignore_index, cfg.method, cfg.reduction,
            cfg.reweigh, cfg.dmax, squash, cfg.delta)
    if cfg.use_triton:
        from .ntl_loss import ntl_loss_fwd_triton

        if weights is not None and weights.dtype == torch.bool:
            weights = weights.view(torch.uint8)
            args = (*args[:2], weights, *args[3:])
        return ntl_loss_fwd_triton(*args, cfg.need_dz, scale)
    return ntl_loss_fwd_torch(*args, cfg.need_dz, scale)


def _backward_x(g: Tensor, x: Tensor | None, size: tuple[int, int], dtype: torch.dtype,
                saved: tuple[Tensor, ...], cfg: LossConfig) -> Tensor:
    """``dOut/dx``; ``x`` itself is read only with reweigh."""
    dz, rw, den, L, mass, lse = saved
    ids = None if cfg.digit_cols else vocab_from_handle(cfg.handle).ids(dz.device)
    args = (g, x, size, dtype, dz, rw, den, L, mass, lse, ids, cfg.reweigh, cfg.dmax)
    if cfg.use_triton:
        from .ntl_loss import ntl_loss_bwd_triton

        return ntl_loss_bwd_triton(*args)
    return ntl_loss_bwd_torch(*args)


def _active(labels: Tensor, cfg: LossConfig) -> Tensor:
    _, _, lut = _vocab_tensors(cfg, labels.device)
    return number_index_torch(labels, lut, cfg.ignore_index) >= 0


def _backward_w(g: Tensor, out: Tensor, rows: Tensor, rw: Tensor, den: Tensor, active: Tensor,
                cfg: LossConfig) -> Tensor:
    """``dOut/dw``: ``g rows`` (none, sum), ``g (rows - out) / den`` (mean), 0 off the number rows."""
    gw = g * (rows - out) / den if cfg.reduction == "mean" else g * rows
    return torch.where(active, gw, torch.zeros((), device=gw.device))


class NTLLossFunction(torch.autograd.Function):
    """Eager path: the forward kernel (or twin); backward from the saved ``dL/dz`` and row data."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
                cfg: LossConfig, scale: Tensor | None) -> Tensor:  # type: ignore[override]
        out, rows, dz, rw, den, L, mass, lse = _forward(x, labels, weights, soft, cfg, scale)
        ctx.cfg = cfg
        ctx.shape = (tuple(x.shape), x.dtype)
        ctx.save_for_backward(x if cfg.reweigh else None, labels, dz, rw, den, L, mass, lse, out, rows)
        ctx.mark_non_differentiable(labels)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None, None]:  # type: ignore[override]
        no_double_backward("the standalone NTL loss")
        x, labels, dz, rw, den, L, mass, lse, out, rows = ctx.saved_tensors
        cfg = ctx.cfg
        gx = gw = None
        if ctx.needs_input_grad[0]:
            size, dtype = ctx.shape
            gx = _backward_x(g, x, size, dtype, (dz, rw, den, L, mass, lse), cfg)
        if ctx.needs_input_grad[2]:
            gw = _backward_w(g, out, rows, rw, den, _active(labels, cfg), cfg)
        return gx, None, gw, None, None, None


# ------------------------------------------------------------------ custom ops (torch.compile)
_CFG_FIELDS = LossConfig._fields


@torch.library.custom_op("ntl::loss_fwd", mutates_args=())
def _loss_fwd_op(
    x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
    handle: int, W: int, digit_cols: bool, pre_indexed: bool, method: str, reduction: str,
    ignore_index: int, reweigh: bool, dmax: float, squash: bool, sq_a: float, sq_b: float,
    delta: float, use_triton: bool, check: bool, hi: int, hi_what: str, need_dz: bool,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = LossConfig(handle=handle, W=W, digit_cols=digit_cols, pre_indexed=pre_indexed,
                     method=method, reduction=reduction, ignore_index=ignore_index,
                     reweigh=reweigh, dmax=dmax, squash=squash, sq_a=sq_a, sq_b=sq_b,
                     delta=delta, use_triton=use_triton, check=check, hi=hi, hi_what=hi_what,
                     need_dz=need_dz)
    return _forward(x, labels, weights, soft, cfg, scale)  # type: ignore[return-value]


@_loss_fwd_op.register_fake
def _(x, labels, weights, soft, handle, W, digit_cols, pre_indexed, method, reduction, ignore_index,
      reweigh, dmax, squash, sq_a, sq_b, delta, use_triton, check, hi, hi_what, need_dz, scale):
    N = x.shape[0]
    K = vocab_from_handle(handle).K

    def f32(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    scalar = reduction != "none"
    n_rw = N if reweigh else 0
    return (f32() if scalar else f32(N), f32(N), f32(N, K) if need_dz else f32(0), f32(N),
            f32() if scalar else f32(0), f32(n_rw), f32(n_rw), f32(2 * n_rw))


@torch.library.custom_op("ntl::loss_bwd", mutates_args=())
def _loss_bwd_op(
    g: Tensor, x: Tensor, dz: Tensor, rw: Tensor, den: Tensor, L: Tensor, mass: Tensor, lse: Tensor,
    handle: int, digit_cols: bool, reweigh: bool, dmax: float, use_triton: bool,
) -> Tensor:
    cfg = LossConfig(handle=handle, W=0, digit_cols=digit_cols, pre_indexed=False, method="mse",
                     reduction="none", ignore_index=-100, reweigh=reweigh, dmax=dmax,
                     squash=False, sq_a=0.0, sq_b=1.0, delta=1.0, use_triton=use_triton,
                     check=False, hi=-1, hi_what="", need_dz=True)
    size = cast(tuple[int, int], tuple(x.shape))  # x is [N, V]
    return _backward_x(g, x, size, x.dtype, (dz, rw, den, L, mass, lse), cfg)


@_loss_bwd_op.register_fake
def _(g, x, dz, rw, den, L, mass, lse, handle, digit_cols, reweigh, dmax, use_triton):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ntl::number_mask", mutates_args=())
def _number_mask_op(labels: Tensor, handle: int, W: int, pre_indexed: bool, ignore_index: int) -> Tensor:
    cfg = LossConfig(handle=handle, W=W, digit_cols=True, pre_indexed=pre_indexed, method="mse",
                     reduction="none", ignore_index=ignore_index, reweigh=False, dmax=0.0,
                     squash=False, sq_a=0.0, sq_b=1.0, delta=1.0, use_triton=False, check=False,
                     hi=-1, hi_what="", need_dz=False)
    return _active(labels, cfg)


@_number_mask_op.register_fake
def _(labels, handle, W, pre_indexed, ignore_index):
    return torch.empty_like(labels, dtype=torch.bool)


def _fwd_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, labels, _weights, _soft, *rest = inputs
    cfg = LossConfig(*rest[:-1])  # the last input: the per-row scale
    out, rows, dz, rw, den, L, mass, lse = output
    ctx.cfg = cfg
    ctx.save_for_backward(x, labels, dz, rw, den, L, mass, lse, out, rows)


def _fwd_backward(ctx: Any, g: Tensor, *_unused: Any):
    x, labels, dz, rw, den, L, mass, lse, out, rows = ctx.saved_tensors
    cfg = ctx.cfg
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.ntl.loss_bwd(g, x, dz, rw, den, L, mass, lse, cfg.handle, cfg.digit_cols,
                                    cfg.reweigh, cfg.dmax, cfg.use_triton)
    if ctx.needs_input_grad[2]:
        active = torch.ops.ntl.number_mask(labels, cfg.handle, cfg.W, cfg.pre_indexed, cfg.ignore_index)
        gw = _backward_w(g, out, rows, rw, den, active, cfg)
    return (gx, None, gw, None) + (None,) * (len(_CFG_FIELDS) + 1)


_loss_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def ntl_loss_apply(x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
                   cfg: LossConfig, scale: Tensor | None = None) -> Tensor:
    """The loss (scalar, or ``[N]`` for ``reduction="none"``) of ``x [N, V or K]`` and ``labels [N]``;
    ``scale [N]`` fp32: a per-row factor of the row loss (DEL's place weights; not in the mean's
    divisor)."""
    if torch.compiler.is_compiling():
        return torch.ops.ntl.loss_fwd(x, labels, weights, soft, *cfg, scale)[0]
    return NTLLossFunction.apply(x, labels, weights, soft, cfg, scale)


# ------------------------------------------------------------------ number rows of the LM head
@torch.library.custom_op("ntl::number_rows", mutates_args=())
def _number_rows_op(weight: Tensor, handle: int) -> Tensor:
    return weight.index_select(0, vocab_from_handle(handle).ids(weight.device))


@_number_rows_op.register_fake
def _(weight, handle):
    K = vocab_from_handle(handle).K
    return weight.new_empty((K, *weight.shape[1:]))


@torch.library.custom_op("ntl::number_rows_bwd", mutates_args=())
def _number_rows_bwd_op(g: Tensor, weight: Tensor, handle: int) -> Tensor:
    ids = vocab_from_handle(handle).ids(weight.device)
    return torch.zeros_like(weight).index_add_(0, ids, g.to(weight.dtype))


@_number_rows_bwd_op.register_fake
def _(g, weight, handle):
    return torch.empty_like(weight)


def _rows_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.handle = inputs[1]


def _rows_backward(ctx: Any, g: Tensor):
    (weight,) = ctx.saved_tensors
    return torch.ops.ntl.number_rows_bwd(g, weight, ctx.handle), None


_number_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def number_rows(weight: Tensor, handle: int) -> Tensor:
    """``weight[ids]`` (rows of an LM-head weight or entries of its bias), differentiable."""
    if torch.compiler.is_compiling():
        return torch.ops.ntl.number_rows(weight, handle)
    return weight.index_select(0, vocab_from_handle(handle).ids(weight.device))
