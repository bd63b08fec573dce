"""Kernels 2 and 3 — expected-digit MSE and Wasserstein-1, loss and dL/dz in one pass.

One program handles a tile of rows: it gathers the ``K`` number logits of each
row (rows whose label is not a number token load nothing), takes the softmax
over ``K`` (padded to a power of two with ``-inf``), and writes the per-row loss
and ``dL/dz [N, K]`` (fp32). Backward scatters ``grad_row * dL/dz`` into the
number-token columns (:func:`gather.scatter_rows`). Formulas: see
:func:`reference.ntl_rows_grad_torch`, the plain-PyTorch twin.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, no_double_backward, tl, triton
from .gather import scatter_rows, tiles

__all__ = ["ntl_rows_triton"]

_METHOD = {"mse": 0, "wasserstein": 1}

if HAS_TRITON:

    @triton.jit
    def ntl_row_math(z, cmask, kt, vals, gaps, soft, METHOD: tl.constexpr, SOFT: tl.constexpr):
        """Per-row loss and dL/dz for a ``[BLOCK_N, BLOCK_K]`` tile of number logits ``z``.

        ``kt [BLOCK_N]`` target index, ``vals``/``gaps [BLOCK_K]`` values and
        ``v_{k+1} - v_k`` (0 past the end), ``soft`` the target distribution (SOFT only).
        """
        z = tl.where(cmask[None, :], z, float("-inf"))
        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        q = e / tl.sum(e, axis=1)[:, None]
        cols = tl.arange(0, z.shape[1])
        y = tl.sum(tl.where(cols[None, :] == kt[:, None], vals[None, :], 0.0), axis=1)
        if METHOD == 0:
            yhat = tl.sum(q * vals[None, :], axis=1)
            diff = yhat - y
            loss = diff * diff
            grad = 2.0 * diff[:, None] * q * (vals[None, :] - yhat[:, None])
        elif SOFT:
            d = tl.cumsum(q, axis=1) - tl.cumsum(soft, axis=1)
            loss = tl.sum(tl.abs(d) * gaps[None, :], axis=1)
            s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) * gaps[None, :]
            g = tl.sum(s, axis=1)[:, None] - tl.cumsum(s, axis=1) + s  # sum_{k >= i} s_k
            grad = q * (g - tl.sum(q * g, axis=1)[:, None])
        else:
            dist = tl.abs(vals[None, :] - y[:, None])
            loss = tl.sum(q * dist, axis=1)
            grad = q * (dist - loss[:, None])
        grad = tl.where(cmask[None, :], grad, 0.0)
        return loss, grad

    @triton.jit
    def _ntl_rows_fwd(x_ptr, ids_ptr, k_ptr, vals_ptr, soft_ptr, loss_ptr, dz_ptr, N, K,
                      stride_x, stride_s, METHOD: tl.constexpr, SOFT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < N
        cmask = cols < K
        kt = tl.load(k_ptr + rows, mask=rmask, other=-1)
        active = kt >= 0
        r64 = rows.to(tl.int64)
        ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        vals = tl.load(vals_ptr + cols, mask=cmask, other=0.0)
        vnext = tl.load(vals_ptr + cols + 1, mask=cols + 1 < K, other=0.0)
        gaps = tl.where(cols + 1 < K, vnext - vals, 0.0)
        lmask = active[:, None] & cmask[None, :]
        z = tl.load(x_ptr + r64[:, None] * stride_x + ids[None, :], mask=lmask, other=0.0).to(tl.float32)
        soft = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if SOFT:
            soft = tl.load(soft_ptr + r64[:, None] * stride_s + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
        loss, grad = ntl_row_math(z, cmask, kt, vals, gaps, soft, METHOD, SOFT)
        loss = tl.where(active, loss, 0.0)
        grad = tl.where(active[:, None], grad, 0.0)
        tl.store(loss_ptr + rows, loss, mask=rmask)
        tl.store(dz_ptr + r64[:, None] * K + cols[None, :], grad, mask=rmask[:, None] & cmask[None, :])


class NTLRows(torch.autograd.Function):
    """Per-row NTL on ``[N, V]`` logits via the fused Triton kernel."""

    @staticmethod
    def forward(ctx, x, k, ids, values, method, soft):  # type: ignore[override]
        N, V = x.shape
        K = ids.numel()
        loss = torch.empty(N, dtype=torch.float32, device=x.device)
        dz = torch.empty((N, K), dtype=torch.float32, device=x.device)
        if N > 0:
            bn, bk = tiles(K)
            s = soft.contiguous() if soft is not None else dz
            _ntl_rows_fwd[(triton.cdiv(N, bn),)](
                x, ids, k, values, s, loss, dz, N, K, x.stride(0), s.stride(0),
                METHOD=_METHOD[method], SOFT=soft is not None, BLOCK_N=bn, BLOCK_K=bk)
        ctx.save_for_backward(dz, ids)
        ctx.shape = (V, x.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        no_double_backward("the Triton NTL kernel")
        dz, ids = ctx.saved_tensors
        V, dtype = ctx.shape
        return scatter_rows(dz, ids, V, dtype, scale=g.float().contiguous()), None, None, None, None, None


def ntl_rows_triton(x: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                    method: str, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row NTL ``[N]`` fp32 (0 where ``k < 0``) for ``x [N, V]``, differentiable."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return NTLRows.apply(x, k.contiguous(), ids, values, method, soft)
