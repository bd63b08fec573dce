"""Number-token mass: ``x [N, V]`` + ``ids [K]`` -> number logits ``z [N, K]`` and mass ``[N]``.

``m = sum_k softmax(x)_{id_k}``, the full-vocabulary probability on the number
tokens (``reweigh`` and :func:`ntl.predict_numbers`). Both sums are taken relative
to the row max ``M`` (``s = sum_j exp(x_j - M)``, ``m = sum_k exp(z_k - M) / s``),
never as ``exp(logsumexp - logsumexp)``, which loses ~``eps |lse|``. With
``p_j = exp(x_j - M) / s`` and upstream gradients ``g_m [N]``, ``g_z [N, K]``::

    dL/dx_j = -g_m m p_j + 1[j = id_k] (g_m p_j + g_z,k)

Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): forward streams each row once
(online max and sum) and keeps only ``M``, ``s`` and ``m`` per row; backward streams
it once more and writes the gradient, then rewrites the ``K`` number columns. No
``[N, V]`` buffer lives between forward and backward.

Plain-PyTorch twin (:func:`number_mass_torch`, the CPU path): one fused fp32 ``softmax``
per row (its own max subtraction; ``p_j`` exact to rounding, ``m = sum_k p_{id_k}``) on
only the rows that need the mass (``rows=``: ``number_level_loss`` needs it at each
number's first digit only); it keeps ``p`` and its backward turns that buffer into the
gradient in place (``p_j <- -g_m m p_j``, then the number columns), so fwd+bwd is one
``softmax`` and one multiply over ``[n, V]``, with one fp32 ``[n, V]`` buffer.
"""

from __future__ import annotations

import torch

from ._triton import (
    HAS_TRITON,
    backward_once,
    interpreting,
    next_pow2,
    no_double_backward,
    tl,
    triton,
)

__all__ = ["number_mass_torch", "number_mass_triton"]


_CHUNK_ELEMS = 1 << 20  # fp32 elements per row block (4 MB): max, shift, exp and sum while in cache


def _exp_rows(x: torch.Tensor, idx: torch.Tensor | None = None, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e = exp(x - M) [n, V] fp32, s = sum_j e_j [n])`` for the rows ``idx`` of ``x`` (all
    rows if ``None``), ``M`` the row max (0 for an all ``-inf`` row, whose ``e`` is then 0). A
    block of rows at a time, each written once into ``out`` (gathered straight into it) and
    then shifted, exponentiated and summed in place while in cache."""
    V = x.shape[1]
    n = x.shape[0] if idx is None else idx.numel()
    e = torch.empty((n, V), device=x.device) if out is None else out
    s = torch.empty(n, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for a in range(0, n, step):
        eb = e[a:a + step]
        if idx is None:
            xb = x[a:a + step]
            top = xb.amax(1, keepdim=True).float()
            top.masked_fill_(top == float("-inf"), 0.0)
            if xb.dtype == torch.float32:
                torch.sub(xb, top, out=eb)
            else:
                eb.copy_(xb).sub_(top)
        else:
            sel = idx[a:a + step]
            if x.dtype == torch.float32:
                torch.index_select(x, 0, sel, out=eb)
            else:
                eb.copy_(x.index_select(0, sel))
            top = eb.amax(1, keepdim=True)
            eb.sub_(top.masked_fill_(top == float("-inf"), 0.0))
        s[a:a + step] = eb.exp_().sum(1)
    return e, s


class _NumberMassTorch(torch.autograd.Function):
    """The twin with the kernels' shape of work: forward ``e = exp(x - M)`` (one fp32 buffer,
    over the rows that need the mass only), backward turns ``e`` into the gradient in place
    (no second ``[n, V]`` buffer); rows outside ``rows`` get only ``g_z``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None):  # type: ignore[override]
        N = x.shape[0]
        z = x.index_select(1, ids).float()
        idx = None if rows is None else rows.nonzero().squeeze(1)  # a host sync; free on a CPU
        e, s = _exp_rows(x, idx)
        m = e.index_select(1, ids).sum(1) / s
        if idx is not None:
            m = torch.zeros(N, device=x.device).index_copy_(0, idx, m)
        ctx.e, ctx.idx, ctx.shape = e, idx, (tuple(x.shape), x.dtype)
        ctx.save_for_backward(ids, m, s)
        return z, m

    @staticmethod
    def backward(ctx, gz: torch.Tensor, gm: torch.Tensor):  # type: ignore[override]
        backward_once(ctx, "the number-mass twin", "its exp buffer becomes the gradient in place",
                      label="number mass")
        ids, m, s = ctx.saved_tensors
        e, idx = ctx.e, ctx.idx
        ctx.e = None
        (N, V), dtype = ctx.shape
        gz, gm = gz.float(), gm.float()  # (autograd materialises unused outputs' grads as zeros)
        if idx is not None:
            gm, m = gm.index_select(0, idx), m.index_select(0, idx)
        pd = e.index_select(1, ids) / s[:, None]  # p at the number columns
        e.mul_((-gm * m / s)[:, None])  # -g_m m p_j everywhere
        digits = e.index_select(1, ids).add_(gm[:, None] * pd)  # + g_m p_j at the number columns
        if idx is None:
            e.index_copy_(1, ids, digits.add_(gz))
            return (e if dtype == torch.float32 else e.to(dtype)), None, None
        grad = torch.zeros((N, V), dtype=dtype, device=e.device)
        grad.index_copy_(0, idx, e if dtype == torch.float32 else e.to(dtype))
        grad.index_copy_(1, ids, gz.index_add(0, idx, digits).to(dtype))  # out of place: gz is autograd's
        return grad, None, None


def number_mass_torch(x2d: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [N, K] fp32, m [N] fp32)`` with PyTorch ops; ``rows`` (bool ``[N]``): the mass only
    there (0 elsewhere; those rows are read at their ``K`` number logits only).

    With grad: :class:`_NumberMassTorch` (one backward, no second derivative); its fp32 exp
    buffer covers the selected rows. Without grad: blocks of rows, no ``[N, V]`` buffer.
    """
    if torch.is_grad_enabled() and x2d.requires_grad:
        return _NumberMassTorch.apply(x2d, ids, rows)
    N, V = x2d.shape
    z = x2d.index_select(1, ids).float()
    m = torch.zeros(N, device=x2d.device)
    idx = torch.arange(N, device=x2d.device) if rows is None else rows.nonzero().squeeze(1)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    buf = torch.empty((min(step, idx.numel()), V), device=x2d.device)
    for a in range(0, idx.numel(), step):
        sel = idx[a:a + step]
        e, s = _exp_rows(x2d, sel, buf[:sel.numel()])
        m.index_copy_(0, sel, e.index_select(1, ids).sum(1) / s)
    return z, m


if HAS_TRITON:

    @triton.jit
    def _mass_fwd(x_ptr, ids_ptr, z_ptr, mass_ptr, top_ptr, sum_ptr, V, K, stride_x,
                  BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + row * stride_x
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(xrow + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = (s * tl.exp2((m - m_new) * 1.4426950408889634)
                 + tl.sum(tl.exp2((x - m_new) * 1.4426950408889634), axis=0))
            m = m_new
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        z = tl.load(xrow + ids, mask=cmask, other=float("-inf")).to(tl.float32)
        mass = tl.sum(tl.where(cmask, tl.exp2((z - m) * 1.4426950408889634), 0.0), axis=0) / s
        tl.store(z_ptr + row * K + cols, z, mask=cmask)
        tl.store(mass_ptr + row, mass)
        tl.store(top_ptr + row, m)
        tl.store(sum_ptr + row, s)

    @triton.jit
    def _mass_bwd(x_ptr, ids_ptr, gz_ptr, gm_ptr, mass_ptr, top_ptr, sum_ptr, g_ptr, V, K,
                  stride_x, stride_g, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + row * stride_x
        grow = g_ptr + row * stride_g
        gm = tl.load(gm_ptr + row)
        mass = tl.load(mass_ptr + row)
        m = tl.load(top_ptr + row)
        s = tl.load(sum_ptr + row)
        c = -gm * mass / s
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(xrow + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            tl.store(grow + offs, (c * tl.exp2((x - m) * 1.4426950408889634)).to(g_ptr.dtype.element_ty),
                     mask=offs < V)
        tl.debug_barrier()
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        zz = tl.load(xrow + ids, mask=cmask, other=float("-inf")).to(tl.float32)
        p = tl.exp2((zz - m) * 1.4426950408889634) / s
        gz = tl.load(gz_ptr + row * K + cols, mask=cmask, other=0.0)
        gd = gm * p * (1.0 - mass) + gz
        tl.store(grow + ids, gd.to(g_ptr.dtype.element_ty), mask=cmask)


def _block(V: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: 8k-element tiles on GPUs, 64k in the interpreter (fewer steps)."""
    block = min(next_pow2(V), 65536 if interpreting() else 8192)
    return block, 8 if block >= 4096 else 4


class NumberMass(torch.autograd.Function):
    """Triton number logits and number mass, with the one-pass backward above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor):  # type: ignore[override]
        N, V = x.shape
        K = ids.numel()
        z = torch.empty((N, K), dtype=torch.float32, device=x.device)
        mass, top, total = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(3))
        if N > 0:
            block, warps = _block(V)
            _mass_fwd[(N,)](x, ids, z, mass, top, total, V, K, x.stride(0),
                            BLOCK_V=block, BLOCK_K=max(16, next_pow2(K)), num_warps=warps)
        ctx.save_for_backward(x, ids, mass, top, total)
        return z, mass

    @staticmethod
    def backward(ctx, gz: torch.Tensor, gm: torch.Tensor):  # type: ignore[override]
        no_double_backward("the Triton number-mass kernel")
        x, ids, mass, top, total = ctx.saved_tensors
        N, V = x.shape
        K = ids.numel()
        grad = torch.empty_like(x)
        if N > 0:
            block, warps = _block(V)
            _mass_bwd[(N,)](x, ids, gz.float().contiguous(), gm.float().contiguous(), mass, top, total,
                            grad, V, K, x.stride(0), grad.stride(0),
                            BLOCK_V=block, BLOCK_K=max(16, next_pow2(K)), num_warps=warps)
        return grad, None


def number_mass_triton(x2d: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [N, K] fp32, m [N] fp32)`` through the Triton kernels; any row stride."""
    return NumberMass.apply(x2d if x2d.stride(-1) == 1 else x2d.contiguous(), ids)
