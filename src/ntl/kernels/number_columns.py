"""The number-token columns of the logits (digit-gather): ``logits[N, V]`` (any row stride) +
``ids[K]`` -> ``[N, K]``.

Forward reads the ``K`` number-token columns of a tile of rows; backward
scatters ``grad[N, K]`` (optionally scaled per row) into a zero ``[N, V]``
gradient at those columns. Plain-PyTorch twin: :func:`reference.digit_gather_torch`.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import (
    HAS_TRITON,
    check_backend,
    next_pow2,
    no_double_backward,
    resolve_backend,
    tl,
    triton,
)
from .reference import digit_gather_torch

__all__ = ["digit_gather", "scatter_rows"]


def tiles(K: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_K)``: K padded to a power of two, ~4k elements per tile."""
    block_k = max(16, next_pow2(K))
    return max(1, min(64, 4096 // block_k)), block_k


def tile_warps(block_k: int) -> int:
    """Warps for a :func:`tiles` tile: 8 once a row holds >= 1024 number tokens (Llama-3's
    K = 1,110), where 4 warps spill the int64 column addresses on sm_80."""
    return 8 if block_k >= 1024 else 4


if HAS_TRITON:

    @triton.jit
    def _gather_fwd(x_ptr, ids_ptr, out_ptr, N, K, stride_x, stride_o,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < N
        cmask = cols < K
        ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + r64[:, None] * stride_x + ids[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + r64[:, None] * stride_o + cols[None, :], x, mask=m2)

    @triton.jit
    def _scatter_bwd(g_ptr, scale_ptr, ids_ptr, out_ptr, N, K, stride_g, stride_o,
                     HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < N
        cmask = cols < K
        ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + r64[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            g = g * s[:, None]
        tl.store(out_ptr + r64[:, None] * stride_o + ids[None, :], g.to(out_ptr.dtype.element_ty), mask=m2)


def gather_triton(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[:, ids]`` for ``x [N, V]`` with unit column stride (any row stride)."""
    N, K = x.shape[0], ids.numel()
    out = torch.empty((N, K), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    bn, bk = tiles(K)
    _gather_fwd[(triton.cdiv(N, bn),)](x, ids, out, N, K, x.stride(0), out.stride(0),
                                        BLOCK_N=bn, BLOCK_K=bk, num_warps=tile_warps(bk))
    return out


def scatter_rows(g: torch.Tensor, ids: torch.Tensor, V: int, dtype: torch.dtype,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Zero ``[N, V]`` tensor with ``out[:, ids] = g * scale[:, None]`` (Triton)."""
    N, K = g.shape
    out = torch.zeros((N, V), dtype=dtype, device=g.device)
    if N == 0:
        return out
    g = g.contiguous()
    bn, bk = tiles(K)
    _scatter_bwd[(triton.cdiv(N, bn),)](
        g, scale if scale is not None else g, ids, out, N, K, g.stride(0), out.stride(0),
        HAS_SCALE=scale is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=tile_warps(bk))
    return out


class DigitGather(torch.autograd.Function):
    """Triton digit-gather with a scatter backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.shape = (x.shape[1], x.dtype)
        return gather_triton(x, ids)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        no_double_backward("digit_gather")
        (ids,) = ctx.saved_tensors
        V, dtype = ctx.shape
        return scatter_rows(g, ids, V, dtype), None


def digit_gather(logits: torch.Tensor, ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Number-token logits ``logits[..., ids]``: ``[..., V] -> [..., K]``, differentiable.

    Works for any leading shape and row stride (a non-unit column stride is
    copied first). ``ids`` must be unique integer ids in ``[0, V)``, as a
    :class:`ntl.NumberVocab` provides (``vocab.ids(device)``).
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating-point tensor (fp32/bf16/fp16), got "
                        + (str(logits.dtype) if isinstance(logits, torch.Tensor) else type(logits).__name__))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    check_backend(backend)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
        raise TypeError("ids must be a 1-D int64/int32 tensor of token ids, got "
                        + (f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                           else type(ids).__name__))
    if ids.numel() == 0:
        raise ValueError("ids is empty: a number vocabulary needs at least one token")
    if ids.device != logits.device:
        raise ValueError(f"ids are on {ids.device} but logits are on {logits.device}")
    V = logits.shape[-1]
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    n_unique = ids.unique().numel()
    if lo < 0 or hi >= V:
        raise ValueError(f"ids must lie in [0, V={V}), got values in [{lo}, {hi}]")
    if n_unique != ids.numel():
        raise ValueError("ids must be unique (the backward scatters into those columns)")
    ids = ids.long()
    lead = logits.shape[:-1]
    x = logits.reshape(-1, V)
    if not resolve_backend(backend, logits):
        return digit_gather_torch(x, ids).view(*lead, ids.numel())
    if x.stride(-1) != 1:
        x = x.contiguous()
    return DigitGather.apply(x, ids).view(*lead, ids.numel())
