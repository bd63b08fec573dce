"""The standalone NTL loss op: kernels, launchers, autograd Function and ``torch.library`` ops.

Kernels: the forward (loss and dL/dz in one pass, sync-free) and its finalize.

``_ntl_loss_fwd``: one program handles a tile of rows. It maps each label to its
number index ``k`` through a dense ``[W]`` table (``-1``: text, out of range or
``ignore_index``), gathers the ``K`` number logits of the rows that take part (the
others load nothing), takes the softmax over ``K`` (padded to a power of two with
``-inf``) and writes the per-row loss, ``dL/dz [N, K]`` (fp32) and the weighted
row sums of its tile, which ``_ntl_finalize`` (one program) reduces to the sum or
mean: two launches, no host sync. With ``REWEIGH`` an online log-sum-exp over the
whole row gives the full-softmax mass ``m`` of the number tokens, on rows that
take part only. Backward: ``_ntl_loss_bwd`` scatters ``s dL/dz`` (``s = rw g / den``)
into a zero ``[N, V]`` gradient; ``_ntl_loss_bwd_reweigh`` writes the dense rows
of the reweighed loss. Formulas and twins: :mod:`.reference`
(:func:`~.reference.ntl_rows_grad_torch`, :func:`~.reference.ntl_loss_fwd_torch`,
:func:`~.reference.ntl_loss_bwd_torch`).

Autograd: :func:`ntl_loss_apply` is what every standalone entry point calls. In eager mode
it runs :class:`NTLLossFunction` (no custom-op dispatch cost); under ``torch.compile`` it
calls the custom op ``ntl::loss_fwd``, which ``register_fake`` gives shapes and
``register_autograd`` a backward (``ntl::loss_bwd``), so Dynamo sees one opaque, traceable
node and the compiled graph runs the same code as eager. Either way the forward is
:func:`ntl_loss_fwd_triton` (CUDA, or the interpreter) or its twin
:func:`.reference.ntl_loss_fwd_torch`, and the strict data checks run inside (so they
cannot break a compiled graph).

The vocab travels as tensors (its number-token ids, values and label -> index table, which
the front end takes from the vocab's cache) and the call's constants as one
:class:`.settings.OpSettings`: this file imports nothing from the front end.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from ..methods import kernel_code
from ._triton import HAS_TRITON, interpreting, next_pow2, no_double_backward, tl, triton
from .number_columns import tiles
from .reference import ntl_loss_bwd_torch, ntl_loss_fwd_torch, number_index_torch
from .settings import OpSettings, check_label_values

__all__ = ["OpSettings", "ntl_loss_apply", "ntl_loss_bwd_triton", "ntl_loss_fwd_triton"]

_FINAL_BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def ntl_row_math(z, cmask, kt, vals, gaps, soft, METHOD: tl.constexpr, SOFT: tl.constexpr,
                     sq_a=0.0, sq_b=1.0, delta=1.0):
        """Per-row loss and dL/dz for a ``[BLOCK_N, BLOCK_K]`` tile of number logits ``z``.

        ``kt [BLOCK_N]`` target index, ``vals``/``gaps [BLOCK_K]`` values and
        ``v_{k+1} - v_k`` (0 past the end), ``soft`` the target distribution (SOFT only).
        ``METHOD`` is the method's ``code`` in :mod:`ntl.methods` (the one registry; the
        launchers read it with :func:`ntl.methods.kernel_code`): 0/2/3 MSE/MAE/Huber(``delta``)
        of ``yhat - y``; 1: W1 with the distance ``d = |v - y|`` squashed to ``sq_a + sq_b d``
        where ``d > 0`` (defaults keep ``d``); 4: DEL (raw logits, target column ``kt``; its
        place weight is a per-row factor applied by the caller); 5: DIST² with ``tau = delta``. ``sq_a``, ``sq_b``, ``delta`` are the method's
        runtime scalars (:meth:`ntl.methods.Method.kernel_scalars`). A new method adds its
        branch here; twin: :meth:`ntl.methods.Method.row_loss_grad`.
        """
        zraw = tl.where(cmask[None, :], z, 0.0)
        z = tl.where(cmask[None, :], z, float("-inf"))
        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        se = tl.sum(e, axis=1)
        q = e / se[:, None]
        cols = tl.arange(0, z.shape[1])
        hit = cols[None, :] == kt[:, None]
        y = tl.sum(tl.where(hit, vals[None, :], 0.0), axis=1)
        if METHOD == 4:  # DEL: (1/K) sum_k q_k BCE(sigmoid(z_k), [k = t]) on the raw logits
            nk = tl.sum(cmask.to(tl.float32), axis=0)
            sp = tl.maximum(zraw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zraw)))  # softplus
            bce = tl.where(cmask[None, :], sp - tl.where(hit, zraw, 0.0), 0.0)
            S = tl.sum(q * bce, axis=1)
            sig = 1.0 / (1.0 + tl.exp(-zraw))
            loss = S / nk
            grad = q * (sig - tl.where(hit, 1.0, 0.0) + bce - S[:, None]) / nk
        elif METHOD == 5:  # DIST2: KL(t || q), t = softmax(-(v - y)^2 / tau), tau in delta
            a = tl.where(cmask[None, :], -(vals[None, :] - y[:, None]) * (vals[None, :] - y[:, None]) / delta,
                         float("-inf"))
            amax = tl.max(a, axis=1)
            ea = tl.exp(a - amax[:, None])
            sa = tl.sum(ea, axis=1)
            t = ea / sa[:, None]
            # log t - log q on the K columns only (the padding's -inf would give inf - inf)
            lr = (tl.where(cmask[None, :], a, 0.0) - amax[:, None] - tl.log(sa)[:, None]
                  - (zraw - zmax[:, None] - tl.log(se)[:, None]))
            loss = tl.sum(tl.where(cmask[None, :], t * lr, 0.0), axis=1)
            grad = q - t
        elif METHOD == 1:
            if SOFT:
                d = tl.cumsum(q, axis=1) - tl.cumsum(soft, axis=1)
                loss = tl.sum(tl.abs(d) * gaps[None, :], axis=1)
                s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) * gaps[None, :]
                g = tl.sum(s, axis=1)[:, None] - tl.cumsum(s, axis=1) + s  # sum_{k >= i} s_k
                grad = q * (g - tl.sum(q * g, axis=1)[:, None])
            else:
                dist = tl.abs(vals[None, :] - y[:, None])
                dist = tl.where(dist > 0, sq_a + sq_b * dist, 0.0)
                loss = tl.sum(q * dist, axis=1)
                grad = q * (dist - loss[:, None])
        else:
            yhat = tl.sum(q * vals[None, :], axis=1)
            r = yhat - y
            if METHOD == 0:
                loss = r * r
                de = 2.0 * r
            elif METHOD == 2:
                loss = tl.abs(r)
                de = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
            else:
                small = tl.abs(r) < delta
                loss = tl.where(small, 0.5 * r * r, delta * (tl.abs(r) - 0.5 * delta))
                de = tl.minimum(tl.maximum(r, -delta), delta)
            grad = de[:, None] * q * (vals[None, :] - yhat[:, None])
        grad = tl.where(cmask[None, :], grad, 0.0)
        return loss, grad

    @triton.jit
    def _ntl_loss_fwd(x_ptr, lab_ptr, lut_ptr, ids_ptr, vals_ptr, w_ptr, soft_ptr, ps_ptr,
                      out_ptr, rows_ptr, dz_ptr, rw_ptr, L_ptr, mass_ptr, lse_ptr, part_ptr,
                      N, V, K, W, ignore_index, stride_x, stride_s, n_part, dmax, sq_a, sq_b, delta,
                      METHOD: tl.constexpr, SOFT: tl.constexpr, REWEIGH: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_PS: tl.constexpr, IDS: tl.constexpr, PARTIAL: tl.constexpr,
                      STORE_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_V: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < N
        cmask = cols < K
        r64 = rows.to(tl.int64)
        # label -> number index through the dense table; text / out of range / ignored: -1
        lab = tl.load(lab_ptr + r64, mask=rmask, other=-1).to(tl.int64)
        inside = rmask & (lab >= 0) & (lab < W) & (lab != ignore_index)
        kt = tl.load(lut_ptr + lab, mask=inside, other=-1).to(tl.int32)
        active = kt >= 0
        if IDS:
            ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        else:  # x holds the K number logits themselves
            ids = cols.to(tl.int64)
        vals = tl.load(vals_ptr + cols, mask=cmask, other=0.0)
        vnext = tl.load(vals_ptr + cols + 1, mask=cols + 1 < K, other=0.0)
        gaps = tl.where(cols + 1 < K, vnext - vals, 0.0)
        lmask = active[:, None] & cmask[None, :]
        xrow = x_ptr + r64[:, None] * stride_x
        z = tl.load(xrow + ids[None, :], mask=lmask, other=0.0).to(tl.float32)
        soft = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if SOFT:
            soft = tl.load(soft_ptr + r64[:, None] * stride_s + cols[None, :], mask=lmask, other=0.0).to(tl.float32)
        loss, grad = ntl_row_math(z, cmask, kt, vals, gaps, soft, METHOD, SOFT, sq_a, sq_b, delta)
        if HAS_PS:  # a per-row factor of the row loss (DEL's place weights), not in the divisor
            ps = tl.load(ps_ptr + r64, mask=rmask, other=0.0).to(tl.float32)
            loss = loss * ps
            grad = grad * ps[:, None]
        loss = tl.where(active, loss, 0.0)
        if HAS_W:
            w = tl.load(w_ptr + r64, mask=rmask, other=0).to(tl.float32)
            rw = tl.where(active, w, 0.0)
        else:
            rw = tl.where(active, 1.0, 0.0)
        if REWEIGH:
            # online log-sum-exp over the whole row, on rows that take part only
            m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_N,), dtype=tl.float32)
            vend = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, V, 0)
            for start in range(0, vend, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                xm = active[:, None] & (offs < V)[None, :]
                xx = tl.load(xrow + offs[None, :], mask=xm, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(xx, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = (s * tl.exp2((m - m_ref) * 1.4426950408889634)
                     + tl.sum(tl.exp2((xx - m_ref[:, None]) * 1.4426950408889634), axis=1))
                m = m_new
            m = tl.where(active & (m != float("-inf")), m, 0.0)
            s = tl.where(active, tl.maximum(s, 1.0), 1.0)  # >= 1 with a finite logit
            pd = tl.where(lmask, tl.exp2((z - m[:, None]) * 1.4426950408889634), 0.0)
            mass = tl.where(active, tl.sum(pd, axis=1) / s, 0.0)
            tl.store(L_ptr + r64, loss, mask=rmask)
            tl.store(mass_ptr + r64, mass, mask=rmask)
            tl.store(lse_ptr + r64, m, mask=rmask)  # the row max M and sum S (not lse = M + log S:
            tl.store(lse_ptr + N + r64, s, mask=rmask)  # backward's p = exp(x - M) / S is exact)
            loss = tl.where(active, mass * loss + dmax * (1.0 - mass), 0.0)
        contrib = rw * loss
        tl.store(rows_ptr + r64, loss, mask=rmask)
        tl.store(rw_ptr + r64, rw, mask=rmask)
        if STORE_DZ:
            grad = tl.where(active[:, None], grad, 0.0)
            tl.store(dz_ptr + r64[:, None] * K + cols[None, :], grad, mask=rmask[:, None] & cmask[None, :])
        if PARTIAL:  # this tile's share of the sum / mean (reduced by _ntl_finalize)
            tl.store(part_ptr + pid, tl.sum(contrib, axis=0))
            tl.store(part_ptr + n_part + pid, tl.sum(rw, axis=0))
        else:
            tl.store(out_ptr + r64, contrib, mask=rmask)

    @triton.jit
    def _ntl_finalize(part_ptr, out_ptr, den_ptr, n_part, eps, MEAN: tl.constexpr, BLOCK: tl.constexpr):
        """``out = sum(part[0]) (/ max(sum(part[1]), eps) for the mean)``; ``den`` = that divisor (1 for sum)."""
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        wacc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_part, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + offs, mask=offs < n_part, other=0.0)
            wacc += tl.load(part_ptr + n_part + offs, mask=offs < n_part, other=0.0)
        num = tl.sum(acc, axis=0)
        den = tl.sum(wacc, axis=0)
        # the mean divides by max(sum of weights, eps); the sum by 1
        den = tl.maximum(den, eps) if MEAN else den * 0.0 + 1.0
        tl.store(out_ptr, num / den)
        tl.store(den_ptr, den)

    @triton.jit
    def _bwd_row_scale(rw_ptr, g_ptr, den_ptr, N, stride_g, G_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's rows (int64), their scale ``s = rw g / den`` (``rw g`` per row with
        ``G_ROWS``: reduction="none", any stride of ``g``) and which rows take part (``rw != 0``)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        rw = tl.load(rw_ptr + r64, mask=rmask, other=0.0)
        if G_ROWS:
            s = rw * tl.load(g_ptr + r64 * stride_g, mask=rmask, other=0.0).to(tl.float32)
        else:
            s = rw * (tl.load(g_ptr).to(tl.float32) / tl.load(den_ptr))
        return r64, s, rmask & (rw != 0.0)

    @triton.jit
    def _ntl_loss_bwd(dz_ptr, rw_ptr, g_ptr, den_ptr, ids_ptr, out_ptr, N, K, stride_o, stride_g,
                      G_ROWS: tl.constexpr, IDS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """``out[i, ids] = s_i dL/dz_i`` with ``s = rw g / den`` into a zero ``out``; rows with ``s = 0`` store nothing."""
        r64, s, live = _bwd_row_scale(rw_ptr, g_ptr, den_ptr, N, stride_g, G_ROWS, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        if IDS:
            ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        else:
            ids = cols.to(tl.int64)
        m2 = live[:, None] & cmask[None, :]
        dz = tl.load(dz_ptr + r64[:, None] * K + cols[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + r64[:, None] * stride_o + ids[None, :],
                 (s[:, None] * dz).to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _ntl_loss_bwd_reweigh(x_ptr, dz_ptr, rw_ptr, L_ptr, mass_ptr, lse_ptr, g_ptr, den_ptr, ids_ptr,
                              out_ptr, N, V, K, stride_x, stride_o, stride_g, dmax, G_ROWS: tl.constexpr,
                              IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_V: tl.constexpr):
        """Dense rows of ``dL'/dx`` (``L' = m L + D (1 - m)``) into a zero ``out``, for rows with ``s != 0``::

            j in ids: s (m dL/dz_j + (L - D) p_j (1 - m)),   else: -s (L - D) m p_j,   p = exp(x - M) / S

        (``lse_ptr``: the forward's row max ``M [N]`` then sum ``S [N]``)."""
        r64, s, live = _bwd_row_scale(rw_ptr, g_ptr, den_ptr, N, stride_g, G_ROWS, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        L = tl.load(L_ptr + r64, mask=live, other=0.0)
        mass = tl.load(mass_ptr + r64, mask=live, other=0.0)
        top = tl.load(lse_ptr + r64, mask=live, other=0.0)
        inv = 1.0 / tl.load(lse_ptr + N + r64, mask=live, other=1.0)
        rel = L - dmax
        coef = -s * rel * mass * inv
        xrow = x_ptr + r64[:, None] * stride_x
        orow = out_ptr + r64[:, None] * stride_o
        vend = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, V, 0)
        for start in range(0, vend, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            xm = live[:, None] & (offs < V)[None, :]
            xx = tl.load(xrow + offs[None, :], mask=xm, other=float("-inf")).to(tl.float32)
            p = tl.exp2((xx - top[:, None]) * 1.4426950408889634)
            tl.store(orow + offs[None, :], (coef[:, None] * p).to(out_ptr.dtype.element_ty), mask=xm)
        tl.debug_barrier()
        if IDS:
            ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
        else:
            ids = cols.to(tl.int64)
        m2 = live[:, None] & cmask[None, :]
        z = tl.load(xrow + ids[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        pd = tl.exp2((z - top[:, None]) * 1.4426950408889634) * inv[:, None]
        dz = tl.load(dz_ptr + r64[:, None] * K + cols[None, :], mask=m2, other=0.0)
        gd = s[:, None] * (mass[:, None] * dz + (rel * (1.0 - mass))[:, None] * pd)
        tl.store(orow + ids[None, :], gd.to(out_ptr.dtype.element_ty), mask=m2)


def row_blocks(K: int, V: int, reweigh: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, BLOCK_V, num_warps)`` of the forward / backward launches.

    Without reweigh: ``tiles(K)`` rows per program (~4k elements), 4 warps. With it
    the programs stream whole rows: on a GPU one row per program (``BLOCK_V <= 4096``,
    8 warps, 4 for ``K >= 1024``), in the interpreter the same row tiles as without
    (fewer programs; the result does not depend on the tiling).
    """
    bn, bk = tiles(K)
    if not reweigh:
        return bn, bk, 16, 4
    if interpreting():
        return bn, bk, max(16, min(next_pow2(V), (1 << 18) // bn)), 4
    bv = max(16, min(next_pow2(V), 4096))
    # K >= 1024 (Llama-3): 4 warps leave each thread the registers for its share of the
    # BLOCK_K-wide row beside the V stream (8 warps spill 8 B on sm_90; tests/kernels/test_compile_offline.py)
    return 1, bk, bv, 8 if bv >= 2048 and bk < 1024 else 4


def ntl_loss_fwd_triton(
    x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, soft: torch.Tensor | None,
    ids: torch.Tensor | None, values: torch.Tensor, table: torch.Tensor, ignore_index: int, method: str,
    reduction: str, reweigh: bool, dmax: float, squash: tuple[float, float] | None, huber_delta: float,
    need_dz: bool, scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward (1 program per row tile, + 1 finalize for sum/mean). Same contract as
    :func:`.reference.ntl_loss_fwd_torch` (``x`` needs a unit column stride; ``dz`` is empty
    unless ``need_dz``)."""
    N, V = x.shape
    K = values.numel()
    dev = x.device
    f32 = torch.float32
    rows = torch.empty(N, dtype=f32, device=dev)
    rw = torch.empty(N, dtype=f32, device=dev)
    dz = torch.empty((N, K) if need_dz else (0,), dtype=f32, device=dev)
    L = torch.empty(N if reweigh else 0, dtype=f32, device=dev)
    mass = torch.empty(N if reweigh else 0, dtype=f32, device=dev)
    lse = torch.empty(2 * N if reweigh else 0, dtype=f32, device=dev)  # row max M, then sum S
    bn, bk, bv, warps = row_blocks(K, V, reweigh)
    n_part = triton.cdiv(N, bn)
    partial = reduction != "none"
    out = torch.empty((() if partial else (N,)), dtype=f32, device=dev)
    den = torch.empty(() if partial else (0,), dtype=f32, device=dev)
    part = torch.empty(2 * n_part if partial else 0, dtype=f32, device=dev)
    a, b = squash if squash is not None else (0.0, 1.0)
    if N > 0:
        _ntl_loss_fwd[(n_part,)](
            x, labels, table, ids if ids is not None else values, values,
            weights if weights is not None else rows, soft if soft is not None else rows,
            scale if scale is not None else rows, out, rows, dz, rw, L, mass, lse, part,
            N, V, K, table.numel() - 1, ignore_index, x.stride(0), soft.stride(0) if soft is not None else 0,
            n_part, float(dmax), float(a), float(b), float(huber_delta),
            METHOD=kernel_code(method), SOFT=soft is not None, REWEIGH=reweigh, HAS_W=weights is not None,
            HAS_PS=scale is not None, IDS=ids is not None, PARTIAL=partial, STORE_DZ=need_dz, BLOCK_N=bn, BLOCK_K=bk, BLOCK_V=bv,
            num_warps=warps)
    if partial:
        _ntl_finalize[(1,)](part, out, den, n_part, float(torch.finfo(f32).eps),
                            MEAN=reduction == "mean", BLOCK=_FINAL_BLOCK, num_warps=4)
    return out, rows, dz, rw, den, L, mass, lse


def ntl_loss_bwd_triton(
    g: torch.Tensor, x: torch.Tensor | None, size: tuple[int, int], dtype: torch.dtype,
    dz: torch.Tensor, rw: torch.Tensor, den: torch.Tensor, L: torch.Tensor, mass: torch.Tensor,
    lse: torch.Tensor, ids: torch.Tensor | None, reweigh: bool, dmax: float,
) -> torch.Tensor:
    """``dOut/dx`` (a zero ``[N, V]`` + one launch); same contract as :func:`.reference.ntl_loss_bwd_torch`."""
    N, V = size
    K = dz.shape[1]
    out = torch.zeros((N, V), dtype=dtype, device=dz.device)
    if N == 0:
        return out
    g_rows = g.dim() > 0
    stride_g = g.stride(0) if g_rows else 0
    den_arg = den if not g_rows else rw  # den is not read for reduction="none"
    bn, bk, bv, warps = row_blocks(K, V, reweigh)
    grid = (triton.cdiv(N, bn),)
    ids_arg = ids if ids is not None else rw
    if reweigh:
        assert x is not None, "reweigh reads x"
        _ntl_loss_bwd_reweigh[grid](
            x, dz, rw, L, mass, lse, g, den_arg, ids_arg, out, N, V, K, x.stride(0), out.stride(0),
            stride_g, float(dmax), G_ROWS=g_rows, IDS=ids is not None, BLOCK_N=bn, BLOCK_K=bk,
            BLOCK_V=bv, num_warps=warps)
    else:
        _ntl_loss_bwd[grid](dz, rw, g, den_arg, ids_arg, out, N, K, out.stride(0), stride_g,
                            G_ROWS=g_rows, IDS=ids is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out


# ------------------------------------------------------------------ the op (eager Function)
def _forward(x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
             ids: Tensor | None, values: Tensor, table: Tensor, cfg: OpSettings,
             scale: Tensor | None = None) -> tuple[Tensor, ...]:
    if cfg.check:
        check_label_values(labels, cfg.hi if cfg.hi >= 0 else None, cfg.ignore_index, weights, cfg.hi_what)
    args = (x, labels, weights, soft, ids, values, table, cfg.ignore_index, cfg.method, cfg.reduction,
            cfg.reweigh, cfg.dmax, cfg.squash, cfg.delta)
    if cfg.use_triton:
        if weights is not None and weights.dtype == torch.bool:
            weights = weights.view(torch.uint8)
            args = (*args[:2], weights, *args[3:])
        return ntl_loss_fwd_triton(*args, cfg.need_dz, scale)
    return ntl_loss_fwd_torch(*args, cfg.need_dz, scale)


def _backward_x(g: Tensor, x: Tensor | None, size: tuple[int, int], dtype: torch.dtype,
                saved: tuple[Tensor, ...], ids: Tensor | None, reweigh: bool, dmax: float,
                use_triton: bool) -> Tensor:
    """``dOut/dx``; ``x`` itself is read only with reweigh."""
    dz, rw, den, L, mass, lse = saved
    args = (g, x, size, dtype, dz, rw, den, L, mass, lse, ids, reweigh, dmax)
    if use_triton:
        return ntl_loss_bwd_triton(*args)
    return ntl_loss_bwd_torch(*args)


def _backward_w(g: Tensor, out: Tensor, rows: Tensor, rw: Tensor, den: Tensor, labels: Tensor,
                table: Tensor, cfg: OpSettings) -> Tensor:
    """``dOut/dw``: ``g rows`` (none, sum), ``g (rows - out) / den`` (mean), 0 off the number rows."""
    active = number_index_torch(labels, table, cfg.ignore_index) >= 0
    gw = g * (rows - out) / den if cfg.reduction == "mean" else g * rows
    return torch.where(active, gw, torch.zeros((), device=gw.device))


class NTLLossFunction(torch.autograd.Function):
    """Eager path: the forward kernel (or twin); backward from the saved ``dL/dz`` and row data."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
                ids: Tensor | None, values: Tensor, table: Tensor, cfg: OpSettings,
                scale: Tensor | None) -> Tensor:  # type: ignore[override]
        out, rows, dz, rw, den, L, mass, lse = _forward(x, labels, weights, soft, ids, values, table,
                                                        cfg, scale)
        ctx.cfg = cfg
        ctx.shape = (tuple(x.shape), x.dtype)
        ctx.save_for_backward(x if cfg.reweigh else None, labels, dz, rw, den, L, mass, lse, out, rows,
                              ids, table)
        ctx.mark_non_differentiable(labels)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        no_double_backward("the standalone NTL loss")
        x, labels, dz, rw, den, L, mass, lse, out, rows, ids, table = ctx.saved_tensors
        cfg = ctx.cfg
        gx = gw = None
        if ctx.needs_input_grad[0]:
            size, dtype = ctx.shape
            gx = _backward_x(g, x, size, dtype, (dz, rw, den, L, mass, lse), ids, cfg.reweigh, cfg.dmax,
                             cfg.use_triton)
        if ctx.needs_input_grad[2]:
            gw = _backward_w(g, out, rows, rw, den, labels, table, cfg)
        return gx, None, gw, None, None, None, None, None, None


# ------------------------------------------------------------------ custom ops (torch.compile)
_N_FIELDS = len(OpSettings._fields)


@torch.library.custom_op("ntl::loss_fwd", mutates_args=())
def _loss_fwd_op(
    x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None, ids: Tensor | None,
    values: Tensor, table: Tensor, method: str, reduction: str, ignore_index: int, reweigh: bool,
    dmax: float, sq_a: float, sq_b: float, delta: float, ntl_weight: float, use_triton: bool,
    check: bool, hi: int, hi_what: str, need_dz: bool, scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = OpSettings(method=method, reduction=reduction, ignore_index=ignore_index, reweigh=reweigh,
                     dmax=dmax, sq_a=sq_a, sq_b=sq_b, delta=delta, ntl_weight=ntl_weight,
                     use_triton=use_triton, check=check, hi=hi, hi_what=hi_what, need_dz=need_dz)
    return _forward(x, labels, weights, soft, ids, values, table, cfg, scale)  # type: ignore[return-value]


@_loss_fwd_op.register_fake
def _(x, labels, weights, soft, ids, values, table, method, reduction, ignore_index, reweigh, dmax,
      sq_a, sq_b, delta, ntl_weight, use_triton, check, hi, hi_what, need_dz, scale):
    N = x.shape[0]
    K = values.shape[0]

    def f32(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    scalar = reduction != "none"
    n_rw = N if reweigh else 0
    return (f32() if scalar else f32(N), f32(N), f32(N, K) if need_dz else f32(0), f32(N),
            f32() if scalar else f32(0), f32(n_rw), f32(n_rw), f32(2 * n_rw))


@torch.library.custom_op("ntl::loss_bwd", mutates_args=())
def _loss_bwd_op(
    g: Tensor, x: Tensor, dz: Tensor, rw: Tensor, den: Tensor, L: Tensor, mass: Tensor, lse: Tensor,
    ids: Tensor | None, reweigh: bool, dmax: float, use_triton: bool,
) -> Tensor:
    size = cast(tuple[int, int], tuple(x.shape))  # x is [N, V]
    return _backward_x(g, x, size, x.dtype, (dz, rw, den, L, mass, lse), ids, reweigh, dmax, use_triton)


@_loss_bwd_op.register_fake
def _(g, x, dz, rw, den, L, mass, lse, ids, reweigh, dmax, use_triton):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fwd_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, labels, _weights, _soft, ids, _values, table, *rest = inputs
    cfg = OpSettings._make(rest[:_N_FIELDS])  # the last input: the per-row scale
    out, rows, dz, rw, den, L, mass, lse = output
    ctx.cfg = cfg
    ctx.save_for_backward(x, labels, dz, rw, den, L, mass, lse, out, rows, ids, table)


def _fwd_backward(ctx: Any, g: Tensor, *_unused: Any):
    x, labels, dz, rw, den, L, mass, lse, out, rows, ids, table = ctx.saved_tensors
    cfg = ctx.cfg
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.ntl.loss_bwd(g, x, dz, rw, den, L, mass, lse, ids, cfg.reweigh, cfg.dmax,
                                    cfg.use_triton)
    if ctx.needs_input_grad[2]:
        gw = _backward_w(g, out, rows, rw, den, labels, table, cfg)
    return (gx, None, gw) + (None,) * (4 + _N_FIELDS + 1)


_loss_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def ntl_loss_apply(x: Tensor, labels: Tensor, weights: Tensor | None, soft: Tensor | None,
                   ids: Tensor | None, values: Tensor, table: Tensor, cfg: OpSettings,
                   scale: Tensor | None = None) -> Tensor:
    """The loss (scalar, or ``[N]`` for ``reduction="none"``) of ``x [N, V or K]`` and ``labels [N]``.

    The vocab as tensors: ``ids [K]`` the number-token columns of ``x`` (``None``: ``x`` holds the
    ``K`` number logits themselves), ``values [K]`` fp32, ``table [W + 1]`` the label -> number
    index lookup (:meth:`ntl.NumberVocab.index_table`). ``scale [N]`` fp32: a per-row factor of
    the row loss (DEL's place weights; not in the mean's divisor)."""
    if torch.compiler.is_compiling():
        return torch.ops.ntl.loss_fwd(x, labels, weights, soft, ids, values, table, *cfg, scale)[0]
    return NTLLossFunction.apply(x, labels, weights, soft, ids, values, table, cfg, scale)
