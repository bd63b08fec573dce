"""Kernel 4 — fused cross-entropy + NTL, one program per row; and its backward scale.

One program per row on a GPU (``BLOCK_N = 1``); the interpreter, whose cost is per
program, tiles up to 16 rows (every per-row decision below is then a mask).
Forward (``_ce_ntl_fwd``), per row with CE scale ``a`` and NTL scale ``b`` (they
carry the reduction, so backward is a multiply):

* ``a = b = 0`` (the row takes part in neither loss): write zeros, never read the row
  (an all ``-inf`` row cannot give NaN).
* Otherwise read the label logit and, for number rows, the ``K`` number logits first,
  then pass 1 streams the row for an online softmax (running max ``m`` and sum ``s``,
  ``lse = m + log s``); the NTL loss and ``dL/dz`` come from the ``K`` logits
  (:func:`rowloss.ntl_row_math`; W1 distances ``d > 0`` squashed to ``sq_a + sq_b d``,
  ``(0, 1)`` without ``squash_factor``). Pass 2 (``WRITE_GRAD``) streams the row again and
  writes ``coef * p`` (``p = exp(x - lse)``) into the gradient buffer, which may be
  the logits themselves (in place); then the label column (``- a``) and the number
  columns (``+ dNTL``) are rewritten from values kept in registers. Without
  ``WRITE_GRAD`` (no grad / evaluation) the kernel only reads.
* ``ROW_SCALE`` (fp16 gradients): the row is stored times a power of two ``S_i`` that
  puts its largest entry in ``[2^14, 2^15)`` and ``1 / S_i`` is written to ``rinv``,
  so that small entries are not flushed to zero before backward applies the
  incoming gradient (the mean's ``1/n`` alone, ``n = 16k``, puts most entries of a
  ``V = 1000`` row below fp16's smallest subnormal ``2^-24``, before a GradScaler
  scale of ``2^16`` could lift them). The bound on the row's largest entry is
  ``max(|coef| e^{m - lse}, |g_label|, max_k |g_k|)``.

Backward (``_scale_rows``): row ``i`` of the buffer times ``f_i = grad_out[i or 0] *
rinv_i``; a row with ``f_i == 1`` is neither read nor written, so ``grad_out == 1``
in bf16/fp32 costs one launch and no ``N x V`` traffic, decided on the device.

Plain-PyTorch twin: :func:`ntl.fused.ce_ntl_rows_torch`.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, interpreting, next_pow2, tl, triton
from .rowloss import _METHOD, ntl_row_math

__all__ = ["ce_ntl_fwd_triton", "fwd_config", "scale_config", "scale_rows_triton"]


if HAS_TRITON:

    @triton.jit
    def _ce_ntl_fwd(x_ptr, g_ptr, lab_ptr, k_ptr, ids_ptr, vals_ptr, a_ptr, b_ptr, ce_ptr, loss_ptr,
                    rinv_ptr, N, V, K, stride_x, stride_g, dmax, sq_a, sq_b, METHOD: tl.constexpr,
                    REWEIGH: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        xrow = x_ptr + r64 * stride_x  # [BLOCK_N] row pointers
        grow = g_ptr + r64 * stride_g
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
        live = (tl.abs(a) + tl.abs(b)) > 0.0  # in either loss (a, b may be < 0: upstream gradients); others never read
        if tl.max(live.to(tl.int32), axis=0) == 0:  # GPU (BLOCK_N = 1): this row takes no part
            if WRITE_GRAD:
                zero = tl.zeros((BLOCK_N, BLOCK_V), dtype=g_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    tl.store(grow[:, None] + offs[None, :], zero,
                             mask=rmask[:, None] & (offs < V)[None, :])
                if ROW_SCALE:
                    tl.store(rinv_ptr + rows, tl.full((BLOCK_N,), 1.0, tl.float32), mask=rmask)
            tl.store(ce_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)
            tl.store(loss_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)
        else:
            # scattered reads first: the label logit and (number rows only) the K logits
            kt = tl.load(k_ptr + rows, mask=live, other=-1)
            lab = tl.minimum(tl.maximum(tl.load(lab_ptr + rows, mask=live, other=0), 0), V - 1).to(tl.int64)
            x_lab = tl.load(xrow + lab, mask=live, other=0.0).to(tl.float32)
            cols = tl.arange(0, BLOCK_K)
            cmask = cols < K
            dmask = cmask[None, :] & (kt[:, None] >= 0)  # [BLOCK_N, BLOCK_K]
            ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
            z = tl.load(xrow[:, None] + ids[None, :], mask=dmask, other=0.0).to(tl.float32)
            vals = tl.load(vals_ptr + cols, mask=cmask, other=0.0)
            vnext = tl.load(vals_ptr + cols + 1, mask=cols + 1 < K, other=0.0)
            gaps = tl.where(cols + 1 < K, vnext - vals, 0.0)

            # pass 1: online log-sum-exp over V (a fully -inf block keeps s = 0, no NaN)
            m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_N,), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(xrow[:, None] + offs[None, :], mask=live[:, None] & (offs < V)[None, :],
                            other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
                m = m_new
            lse = tl.where(live, m + tl.log(tl.where(live, s, 1.0)), 0.0)  # 0: rows taking no part

            # NTL loss and dL/dz from the K logits (text rows: z = 0, masked out below)
            nosoft = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            L, dz = ntl_row_math(z, cmask, kt, vals, gaps, nosoft, METHOD, False, sq_a, sq_b)
            pd = tl.where(dmask, tl.exp(z - lse[:, None]), 0.0)
            if REWEIGH:
                mass = tl.sum(pd, axis=1)
                rel = L - dmax
                coef = a - b * rel * mass
                digit = b[:, None] * (mass[:, None] * dz + rel[:, None] * pd)
                L = mass * L + dmax * (1.0 - mass)
            else:
                coef = a
                digit = b[:, None] * dz
            tl.store(ce_ptr + rows, tl.where(a != 0.0, lse - x_lab, 0.0), mask=rmask)
            tl.store(loss_ptr + rows, tl.where(kt >= 0, L, 0.0), mask=rmask)

            if WRITE_GRAD:
                g_lab = coef * tl.exp(x_lab - lse) - a
                gd = coef[:, None] * pd + digit - tl.where(ids[None, :] == lab[:, None], a[:, None], 0.0)
                if ROW_SCALE:
                    gd_max = tl.max(tl.where(dmask, tl.abs(gd), 0.0), axis=1)
                    pmax = tl.where(live, tl.exp(m - lse), 0.0)
                    gmax = tl.maximum(tl.maximum(tl.abs(coef) * pmax, tl.where(live, tl.abs(g_lab), 0.0)),
                                      gd_max)
                    e = (gmax.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent
                    sb = tl.where(gmax > 0.0, tl.minimum(tl.maximum(268 - e, 1), 253), 127)
                    S = (sb << 23).to(tl.float32, bitcast=True)  # 2^(141 - e): max in [2^14, 2^15)
                    coef = coef * S
                    g_lab = g_lab * S
                    gd = gd * S[:, None]
                    tl.store(rinv_ptr + rows, 1.0 / S, mask=rmask)
                # pass 2: gradient coef * p over the row (may overwrite the logits); zeros for
                # rows taking no part
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    vmask = (offs < V)[None, :]
                    x = tl.load(xrow[:, None] + offs[None, :], mask=live[:, None] & vmask,
                                other=float("-inf")).to(tl.float32)
                    gv = tl.where(live[:, None], coef[:, None] * tl.exp(x - lse[:, None]), 0.0)
                    tl.store(grow[:, None] + offs[None, :], gv.to(g_ptr.dtype.element_ty),
                             mask=rmask[:, None] & vmask)
                tl.debug_barrier()
                tl.store(grow + lab, g_lab.to(g_ptr.dtype.element_ty), mask=live)
                tl.debug_barrier()
                tl.store(grow[:, None] + ids[None, :], gd.to(g_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _scale_rows(g_ptr, go_ptr, rinv_ptr, N, V, stride_g, stride_go, HAS_RINV: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        f = tl.load(go_ptr + rows * stride_go, mask=rmask, other=1.0).to(tl.float32)
        if HAS_RINV:
            f = f * tl.load(rinv_ptr + rows, mask=rmask, other=1.0)
        todo = rmask & (f != 1.0)  # a factor of exactly 1: the row is neither read nor written
        if tl.max(todo.to(tl.int32), axis=0) != 0:
            grow = g_ptr + rows.to(tl.int64) * stride_g
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                msk = todo[:, None] & (offs < V)[None, :]
                g = tl.load(grow[:, None] + offs[None, :], mask=msk, other=0.0).to(tl.float32)
                tl.store(grow[:, None] + offs[None, :], (g * f[:, None]).to(g_ptr.dtype.element_ty),
                         mask=msk)


def _rows_per_program(block_v: int) -> int:
    """One row per program on a GPU; in the interpreter (whose cost is per program) up to 16
    rows per program, 2^16 elements a tile."""
    return max(1, min(16, 65536 // block_v)) if interpreting() else 1


def fwd_config(V: int, K: int, row_scale: bool = False) -> dict[str, int]:
    """Launch constants of ``_ce_ntl_fwd``: ``BLOCK_V`` (the row is streamed in blocks; bigger
    in the interpreter, fewer steps), ``BLOCK_K`` (K padded to a power of two), ``BLOCK_N``
    (rows per program) and ``num_warps``.

    On a GPU 32 warps (as Liger-Kernel's CE) cap a thread at 64 registers; the fp16 row
    scaling and ``K > 512`` need more, so they get 16 warps over half the block and
    ``maxnreg=128`` (ptxas would otherwise aim at two 16-warp programs per SM, i.e. 64
    registers again, and spill). No register spills for sm_80/sm_90:
    ``tests/test_compile_offline.py``.
    """
    block_k = max(16, next_pow2(K))
    if interpreting():
        return {"BLOCK_N": _rows_per_program(min(next_pow2(V), 65536)),
                "BLOCK_V": min(next_pow2(V), 65536), "BLOCK_K": block_k, "num_warps": 4}
    wide = row_scale or block_k > 512
    block = min(next_pow2(V), 16384 if wide else 32768)
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    cfg = {"BLOCK_N": 1, "BLOCK_V": block, "BLOCK_K": block_k, "num_warps": warps}
    if wide and warps == 16:
        cfg["maxnreg"] = 128
    return cfg


def scale_config(V: int) -> dict[str, int]:
    """Launch constants of ``_scale_rows`` (a streaming multiply): ``BLOCK_N``, ``BLOCK_V``,
    ``num_warps``."""
    block = min(next_pow2(V), 65536 if interpreting() else 8192)
    return {"BLOCK_N": _rows_per_program(block), "BLOCK_V": block, "num_warps": 8 if block >= 4096 else 4}


def ce_ntl_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor,
                      values: torch.Tensor, a: torch.Tensor, b: torch.Tensor, method: str,
                      reweigh: bool, dmax: float, inplace: bool, write_grad: bool = True, *,
                      squash: tuple[float, float] | None = None,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Run kernel 4: ``(grad [N, V] logits dtype, rinv [N] fp32 | None, ce [N], ntl [N])``.

    ``write_grad=False``: one read-only pass, ``grad`` is ``None``. ``rinv`` (the
    inverse per-row scale of the stored gradient) is returned for fp16 gradients only.
    ``squash = (sq_a, sq_b)``: W1 distances ``d > 0`` become ``sq_a + sq_b d`` (runtime
    scalars of the kernel: ``(0, 1)`` keeps ``d``, no separate specialisation).
    """
    N, V = logits.shape
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs logits whose last dimension is contiguous")
        logits = logits.contiguous()
    dev = logits.device
    grad = None
    if write_grad:
        grad = logits if inplace else torch.empty((N, V), dtype=logits.dtype, device=dev)
    row_scale = write_grad and logits.dtype == torch.float16
    rinv = torch.empty(N, dtype=torch.float32, device=dev) if row_scale else None
    ce = torch.empty(N, dtype=torch.float32, device=dev)
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return grad, rinv, ce, loss
    g = grad if grad is not None else logits
    cfg = fwd_config(V, ids.numel(), row_scale)
    sq_a, sq_b = squash if squash is not None else (0.0, 1.0)
    _ce_ntl_fwd[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        logits, g, labels.contiguous(), k.contiguous(), ids, values, a.contiguous(), b.contiguous(),
        ce, loss, rinv if rinv is not None else ce, N, V, ids.numel(), logits.stride(0), g.stride(0),
        float(dmax), float(sq_a), float(sq_b), METHOD=_METHOD[method], REWEIGH=reweigh,
        WRITE_GRAD=write_grad, ROW_SCALE=row_scale, **cfg)
    return grad, rinv, ce, loss


def scale_rows_triton(grad: torch.Tensor, grad_out: torch.Tensor, rinv: torch.Tensor | None) -> None:
    """``grad[i] *= grad_out[i or 0] * rinv[i]`` in place (fp32 math), skipping rows whose
    factor is exactly 1. ``grad_out``: a scalar or one value per row."""
    N, V = grad.shape
    if N == 0:
        return
    go = grad_out.detach().reshape(-1).float().contiguous()
    if go.numel() not in (1, N):
        raise ValueError(f"grad_out must have 1 or N={N} elements, got {go.numel()}")
    cfg = scale_config(V)
    _scale_rows[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        grad, go, rinv if rinv is not None else go, N, V, grad.stride(0), 0 if go.numel() == 1 else 1,
        HAS_RINV=rinv is not None, **cfg)
