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

Plain-PyTorch twin (:func:`.reference.number_mass_torch`, the CPU path): one fused fp32 ``softmax``
per row (its own max subtraction; ``p_j`` exact to rounding, ``m = sum_k p_{id_k}``) on
only the rows that need the mass (``rows=``: ``number_level_loss`` needs it at each
number's first digit only); it keeps ``p`` and its backward turns that buffer into the
gradient in place (``p_j <- -g_m m p_j``, then the number columns), so fwd+bwd is one
``softmax`` and one multiply over ``[n, V]``, with one fp32 ``[n, V]`` buffer.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2, no_double_backward, tl, triton

__all__ = ["number_mass_triton"]


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
