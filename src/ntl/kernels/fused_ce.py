"""Kernel 4 — fused cross-entropy + NTL, one program per row.

Pass 1 streams the row once for an online softmax (running max ``m`` and sum
``s``, ``lse = m + log s``), reads the label logit and the ``K`` number logits and
computes the NTL loss and ``dL/dz`` (:func:`rowloss.ntl_row_math`). Pass 2
streams the row again and writes ``coef * p`` (``p = exp(x - lse)``) into the
gradient buffer, which may be the logits themselves (in place). Then the label
column (``- a``) and the ``K`` number columns (``+ b dL/dz``) are rewritten from
values kept in registers. The row's scales ``a`` (CE) and ``b`` (NTL) already
carry the reduction, so backward is a scalar multiply. Plain-PyTorch twin:
:func:`ntl.fused.ce_ntl_rows_torch`.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, next_pow2, tl, triton
from .rowloss import _METHOD, ntl_row_math

__all__ = ["ce_ntl_fwd_triton"]


@triton.jit
def _ce_ntl_fwd(x_ptr, g_ptr, lab_ptr, k_ptr, ids_ptr, vals_ptr, a_ptr, b_ptr, ce_ptr, loss_ptr,
                V, K, stride_x, stride_g, dmax, METHOD: tl.constexpr, REWEIGH: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_x
    grow = g_ptr + row * stride_g
    one = tl.arange(0, 1)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    kt = tl.load(k_ptr + row + one)  # [1]
    lab = tl.minimum(tl.maximum(tl.load(lab_ptr + row), 0), V - 1).to(tl.int64)

    # pass 1: online logsumexp over V
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(xrow + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_lab = tl.load(xrow + lab).to(tl.float32)

    # number tokens: loss and dL/dz from the K logits
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
    vals = tl.load(vals_ptr + cols, mask=cmask, other=0.0)
    vnext = tl.load(vals_ptr + cols + 1, mask=cols + 1 < K, other=0.0)
    gaps = tl.where(cols + 1 < K, vnext - vals, 0.0)
    z = tl.load(xrow + ids[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)  # [1, BLOCK_K]
    nosoft = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    z_ntl = tl.where(kt[:, None] >= 0, z, 0.0)  # a row taking no part may have -inf digit logits
    loss, dz = ntl_row_math(z_ntl, cmask, kt, vals, gaps, nosoft, METHOD, False)
    pd = tl.where(cmask[None, :], tl.exp(z - lse), 0.0)
    L = tl.sum(loss, axis=0)
    if REWEIGH:
        mass = tl.sum(tl.sum(pd, axis=1), axis=0)
        rel = L - dmax
        coef = a - b * rel * mass
        digit = b * (mass * dz + rel * pd)
        L = mass * L + dmax * (1.0 - mass)
    else:
        coef = a
        digit = b * dz
    L = tl.where(tl.sum(kt, axis=0) >= 0, L, 0.0)

    # pass 2: gradient coef * p over the row (may overwrite the logits)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(xrow + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        tl.store(grow + offs, (coef * tl.exp(x - lse)).to(g_ptr.dtype.element_ty), mask=offs < V)
    tl.debug_barrier()
    tl.store(grow + lab, (coef * tl.exp(x_lab - lse) - a).to(g_ptr.dtype.element_ty))
    tl.debug_barrier()
    gd = coef * pd + digit - tl.where(ids[None, :] == lab, a, 0.0)
    tl.store(grow + ids[None, :], gd.to(g_ptr.dtype.element_ty), mask=cmask[None, :])
    tl.store(ce_ptr + row, tl.where(a > 0, lse - x_lab, 0.0))
    tl.store(loss_ptr + row, L)


def launch_config(V: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: big blocks on GPUs, bigger in the interpreter (fewer steps)."""
    block = min(next_pow2(V), 65536 if interpreting() else 32768)
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def ce_ntl_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor,
                      values: torch.Tensor, a: torch.Tensor, b: torch.Tensor, method: str,
                      reweigh: bool, dmax: float, inplace: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run kernel 4: returns ``(grad [N, V] (logits dtype), ce [N], ntl [N])``."""
    N, V = logits.shape
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs logits whose last dimension is contiguous")
        logits = logits.contiguous()
    grad = logits if inplace else torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    ce = torch.empty(N, dtype=torch.float32, device=logits.device)
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return grad, ce, loss
    block, warps = launch_config(V)
    _ce_ntl_fwd[(N,)](
        logits, grad, labels.contiguous(), k.contiguous(), ids, values, a.contiguous(),
        b.contiguous(), ce, loss, V, ids.numel(), logits.stride(0), grad.stride(0), float(dmax),
        METHOD=_METHOD[method], REWEIGH=reweigh, BLOCK_V=block, BLOCK_K=max(16, next_pow2(ids.numel())),
        num_warps=warps)
    return grad, ce, loss
