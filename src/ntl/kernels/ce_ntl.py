"""Cross-entropy + NTL fused in one kernel, one program per row; and its backward scale.

One program per row on a GPU (``BLOCK_N = 1``); the interpreter, whose cost is per
program, tiles up to 16 rows (every per-row decision below is then a mask).
Forward (``_ce_ntl_fwd``), per row with CE scale ``a`` and NTL scale ``b`` (they
carry the reduction, so backward is a multiply):

* ``a = b = 0`` (the row takes part in neither loss): write zeros, never read the row
  (an all ``-inf`` row cannot give NaN).
* A label outside ``[0, V)`` zeroes ``a`` (no CE; the caller's ``k`` is then -1: no NTL).
* Otherwise read the label logit and, for number rows, the ``K`` number logits first,
  then pass 1 streams the row for an online softmax (running max ``m`` and sum ``s``,
  ``lse = m + log s`` for the CE value); the NTL loss and ``dL/dz`` come from the ``K``
  logits (:func:`ntl_loss.ntl_row_math`; W1 distances ``d > 0`` squashed to
  ``sq_a + sq_b d``, ``(0, 1)`` without ``squash_factor``). Pass 2 (``WRITE_GRAD``)
  streams the row again and writes ``coef * p`` with ``p = exp(x - m) * (1 / s)`` (Liger's
  form: ``exp(x - lse)`` with ``lse`` rounded to fp32 is ``~|lse| eps`` off in every ``p``,
  2e-6 relative for logits x10) into the gradient buffer, which may be the logits
  themselves (in place); then the label column (``- a``) and the number columns
  (``+ dNTL``) are rewritten from values kept in registers. Without ``WRITE_GRAD`` (no
  grad / evaluation) the kernel only reads.
* Every exponential is ``exp2(t log2 e)`` (``ex2.approx.ftz``: ``tl.exp`` compiles to the
  non-flushing form, 3 more instructions an element).
* Rows are streamed as a 16-byte aligned body (no mask along ``V``: 128-bit loads and
  stores for any ``V``, also GPT-2's odd 50,257), a tail masked at a multiple of 16 bytes,
  and one small masked block for the < 16 bytes at each unaligned end (``VEC`` and
  ``mod0`` from the launcher: the logits and gradient rows share their alignment, else
  ``VEC = 1`` assumes none).
* ``ROW_SCALE`` (fp16 gradients): the row is stored times a power of two ``S_i`` that
  puts its largest entry in ``[2^14, 2^15)`` and ``1 / S_i`` is written to ``rinv``,
  so that small entries are not flushed to zero before backward applies the
  incoming gradient (the mean's ``1/n`` alone, ``n = 16k``, puts most entries of a
  ``V = 1000`` row below fp16's smallest subnormal ``2^-24``, before a GradScaler
  scale of ``2^16`` could lift them). The bound on the row's largest entry is
  ``max(|coef| e^{m - lse}, |g_label|, max_k |g_k|)``.

Backward (``_scale_rows``): row ``i`` of the buffer times ``f_i = go[i or 0] * rinv_i``
(``go = grad_out / grad_scale``, the scale the forward folded into ``a`` and ``b``); a row
with ``f_i == 1`` is neither read nor written, so an incoming gradient equal to
``grad_scale`` (1 by default) in bf16/fp32 costs one launch and no ``N x V`` traffic,
decided on the device. Same aligned body and masked ends.

Plain-PyTorch twin: :func:`.reference.ce_ntl_rows_torch`.

The op around them: :func:`row_scales` (the reduction as per-row CE and NTL scales),
:func:`fused_forward` / :func:`fused_backward` (kernel or twin), the eager
:class:`CENTLFunction` and the custom op ``ntl::ce_ntl_fwd`` (``torch.compile``), both reached
through :func:`ce_ntl_apply`; the front end is :func:`ntl.cross_entropy_with_ntl`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..methods import kernel_code
from ._triton import HAS_TRITON, backward_once, interpreting, next_pow2, tl, triton, triton_before
from .ntl_loss import ntl_row_math
from .reference import ce_ntl_rows_torch, ntl_rows_grad_torch, ntl_rows_torch, number_index_torch
from .settings import OpSettings, check_label_values

__all__ = ["CENTLFunction", "ce_ntl_apply", "ce_ntl_fwd_triton", "fused_backward", "fused_forward",
           "fwd_config", "row_scales", "scale_config", "scale_rows_triton"]


if HAS_TRITON:

    @triton.jit
    def _lse_step(x, m, s):
        """One step of the online log-sum-exp of ``x [BLOCK_N, B]`` (fp32, ``-inf`` where masked):
        running max ``m`` and sum ``s = sum exp(x - m)`` (base 2: ``exp(t) = 2^(t log2 e)``)."""
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully -inf block keeps s = 0
        s = (s * tl.exp2((m - shift) * 1.4426950408889634)
             + tl.sum(tl.exp2((x - shift[:, None]) * 1.4426950408889634), axis=1))
        return m_new, s

    @triton.jit
    def _grad_step(xp, gp, lmask, smask, cs, mref):
        """Store ``cs exp(x - mref)`` (``cs = coef / s``: the row's scaled ``coef * p``) at ``gp``."""
        x = tl.load(xp, mask=lmask, other=float("-inf")).to(tl.float32)
        gv = cs[:, None] * tl.exp2((x - mref[:, None]) * 1.4426950408889634)
        tl.store(gp, gv.to(gp.dtype.element_ty), mask=smask)

    @triton.jit
    def _row_layout(rows, V, mod0, stride, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
        """How a row is streamed: ``(lead, nbody, tal)``. ``lead [BLOCK_N]`` elements (< VEC)
        before the first 16-byte boundary; from there ``nbody`` (a multiple of ``BLOCK_V``, the
        same for every row) elements in unmasked blocks, then a tail masked at ``tal [BLOCK_N]``
        (a multiple of ``VEC``); the < VEC elements left at each end go through one small
        masked block (:func:`_edge_offsets`). ``mod0``: the row base's element offset modulo
        ``VEC`` for row 0 (``VEC = 1``: no alignment is assumed, ``lead = 0``)."""
        lead = (VEC - (mod0 + rows.to(tl.int64) * stride) % VEC) % VEC
        nbody = tl.maximum((V - (VEC - 1)) // BLOCK_V, 0) * BLOCK_V
        tal = tl.multiple_of((V - lead) // VEC * VEC, VEC)  # (triton < 3.9 does not infer it)
        return lead, nbody, tal

    @triton.jit
    def _edge_offsets(lead, tal, V):
        """Offsets (from the row start) and mask of the row's two unaligned ends: ``[0, lead)``
        and ``[lead + tal, V)``, 8 slots each (``VEC <= 8``)."""
        eo = tl.arange(0, 16)
        head = (eo < 8)[None, :]
        pos = tl.where(head, eo[None, :], (lead + tal)[:, None] + (eo[None, :] - 8))
        msk = tl.where(head, eo[None, :] < lead[:, None], pos < V)
        return pos, msk

    @triton.jit
    def _ce_ntl_fwd(x_ptr, g_ptr, lab_ptr, k_ptr, ids_ptr, vals_ptr, a_ptr, b_ptr, ce_ptr, loss_ptr,
                    rinv_ptr, N, V, K, stride_x, stride_g, mod0, dmax, sq_a, sq_b, delta, METHOD: tl.constexpr,
                    REWEIGH: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
                    VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        xrow = x_ptr + r64 * stride_x  # [BLOCK_N] row pointers
        grow = g_ptr + r64 * stride_g
        lead, nbody, tal = _row_layout(rows, V, mod0, stride_x, VEC, BLOCK_V)
        xal = xrow + lead  # 16-byte aligned (x and g rows share their alignment: the launcher)
        gal = grow + lead
        if VEC > 1:
            xal = tl.multiple_of(xal, 16)
            gal = tl.multiple_of(gal, 16)
        epos, emask = _edge_offsets(lead, tal, V)
        lab_raw = tl.load(lab_ptr + rows, mask=rmask, other=-1)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        a = tl.where((lab_raw >= 0) & (lab_raw < V), a, 0.0)  # a label outside [0, V): no CE
        b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
        live = (tl.abs(a) + tl.abs(b)) > 0.0  # in either loss (a, b may be < 0: upstream gradients); others never read
        if tl.max(live.to(tl.int32), axis=0) == 0:  # GPU (BLOCK_N = 1): this row takes no part
            if WRITE_GRAD:  # zeros (the loads below are all masked off: nothing is read)
                zero = tl.zeros((BLOCK_N,), tl.float32)
                for start in range(0, nbody, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    _grad_step(xal[:, None] + offs[None, :], gal[:, None] + offs[None, :], live[:, None],
                               rmask[:, None], zero, zero)
                for start in range(nbody, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    tm = offs[None, :] < tal[:, None]
                    _grad_step(xal[:, None] + offs[None, :], gal[:, None] + offs[None, :],
                               live[:, None] & tm, rmask[:, None] & tm, zero, zero)
                _grad_step(xrow[:, None] + epos, grow[:, None] + epos, live[:, None] & emask,
                           rmask[:, None] & emask, zero, zero)
                if ROW_SCALE:
                    tl.store(rinv_ptr + rows, tl.full((BLOCK_N,), 1.0, tl.float32), mask=rmask)
            tl.store(ce_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)
            tl.store(loss_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)
        else:
            # scattered reads first: the label logit and (number rows only) the K logits
            kt = tl.load(k_ptr + rows, mask=live, other=-1)
            lab = tl.minimum(tl.maximum(lab_raw, 0), V - 1).to(tl.int64)
            x_lab = tl.load(xrow + lab, mask=live, other=0.0).to(tl.float32)
            cols = tl.arange(0, BLOCK_K)
            cmask = cols < K
            dmask = cmask[None, :] & (kt[:, None] >= 0)  # [BLOCK_N, BLOCK_K]
            ids = tl.load(ids_ptr + cols, mask=cmask, other=0).to(tl.int64)
            z = tl.load(xrow[:, None] + ids[None, :], mask=dmask, other=0.0).to(tl.float32)
            vals = tl.load(vals_ptr + cols, mask=cmask, other=0.0)
            vnext = tl.load(vals_ptr + cols + 1, mask=cols + 1 < K, other=0.0)
            gaps = tl.where(cols + 1 < K, vnext - vals, 0.0)

            # pass 1: online log-sum-exp over V: the aligned body (unmasked along V: 16-byte
            # loads), the masked tail, then the two unaligned ends
            m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_N,), tl.float32)
            for start in range(0, nbody, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(xal[:, None] + offs[None, :], mask=live[:, None],
                            other=float("-inf")).to(tl.float32)
                m, s = _lse_step(x, m, s)
            for start in range(nbody, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(xal[:, None] + offs[None, :], mask=live[:, None] & (offs[None, :] < tal[:, None]),
                            other=float("-inf")).to(tl.float32)
                m, s = _lse_step(x, m, s)
            x = tl.load(xrow[:, None] + epos, mask=live[:, None] & emask, other=float("-inf")).to(tl.float32)
            m, s = _lse_step(x, m, s)
            mref = tl.where(live & (m != float("-inf")), m, 0.0)
            s = tl.where(live, tl.maximum(s, 1.0), 1.0)  # >= 1 with a finite logit; 1: all -inf
            inv_s = 1.0 / s
            lse = tl.where(live, m + tl.log(s), 0.0)  # 0: rows taking no part

            # NTL loss and dL/dz from the K logits (text rows: z = 0, masked out below); the
            # probabilities from the running max and sum, p = exp(x - m) / s (not exp(x - lse):
            # lse rounded to fp32 costs ~|lse| eps relative in every p)
            nosoft = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            L, dz = ntl_row_math(z, cmask, kt, vals, gaps, nosoft, METHOD, False, sq_a, sq_b, delta)
            pd = tl.where(dmask, tl.exp2((z - mref[:, None]) * 1.4426950408889634) * inv_s[:, None], 0.0)
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
                g_lab = coef * tl.exp2((x_lab - mref) * 1.4426950408889634) * inv_s - a
                gd = coef[:, None] * pd + digit - tl.where(ids[None, :] == lab[:, None], a[:, None], 0.0)
                if ROW_SCALE:
                    gd_max = tl.max(tl.where(dmask, tl.abs(gd), 0.0), axis=1)
                    gmax = tl.maximum(tl.maximum(tl.abs(coef) * inv_s, tl.where(live, tl.abs(g_lab), 0.0)),
                                      gd_max)
                    e = (gmax.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent
                    sb = tl.where(gmax > 0.0, tl.minimum(tl.maximum(268 - e, 1), 253), 127)
                    S = (sb << 23).to(tl.float32, bitcast=True)  # 2^(141 - e): max in [2^14, 2^15)
                    coef = coef * S
                    g_lab = g_lab * S
                    gd = gd * S[:, None]
                    tl.store(rinv_ptr + rows, 1.0 / S, mask=rmask)
                # pass 2: coef * p over the row (may overwrite the logits), in pass 1's order;
                # zeros for rows taking no part
                cs = tl.where(live, coef * inv_s, 0.0)
                for start in range(0, nbody, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    _grad_step(xal[:, None] + offs[None, :], gal[:, None] + offs[None, :], live[:, None],
                               rmask[:, None], cs, mref)
                for start in range(nbody, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    tm = offs[None, :] < tal[:, None]
                    _grad_step(xal[:, None] + offs[None, :], gal[:, None] + offs[None, :],
                               live[:, None] & tm, rmask[:, None] & tm, cs, mref)
                _grad_step(xrow[:, None] + epos, grow[:, None] + epos, live[:, None] & emask,
                           rmask[:, None] & emask, cs, mref)
                tl.debug_barrier()
                tl.store(grow + lab, g_lab.to(g_ptr.dtype.element_ty), mask=live)
                tl.debug_barrier()
                tl.store(grow[:, None] + ids[None, :], gd.to(g_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _scale_rows(g_ptr, go_ptr, rinv_ptr, N, V, stride_g, stride_go, mod0, HAS_RINV: tl.constexpr,
                    VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        f = tl.load(go_ptr + rows * stride_go, mask=rmask, other=1.0).to(tl.float32)
        if HAS_RINV:
            f = f * tl.load(rinv_ptr + rows, mask=rmask, other=1.0)
        todo = rmask & (f != 1.0)  # a factor of exactly 1: the row is neither read nor written
        if tl.max(todo.to(tl.int32), axis=0) != 0:
            grow = g_ptr + rows.to(tl.int64) * stride_g
            lead, nbody, tal = _row_layout(rows, V, mod0, stride_g, VEC, BLOCK_V)
            gal = grow + lead
            if VEC > 1:
                gal = tl.multiple_of(gal, 16)
            for start in range(0, nbody, BLOCK_V):
                p = gal[:, None] + (start + tl.arange(0, BLOCK_V))[None, :]
                g = tl.load(p, mask=todo[:, None], other=0.0).to(tl.float32)
                tl.store(p, (g * f[:, None]).to(g_ptr.dtype.element_ty), mask=todo[:, None])
            for start in range(nbody, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                msk = todo[:, None] & (offs[None, :] < tal[:, None])
                g = tl.load(gal[:, None] + offs[None, :], mask=msk, other=0.0).to(tl.float32)
                tl.store(gal[:, None] + offs[None, :], (g * f[:, None]).to(g_ptr.dtype.element_ty), mask=msk)
            epos, emask = _edge_offsets(lead, tal, V)
            msk = todo[:, None] & emask
            g = tl.load(grow[:, None] + epos, mask=msk, other=0.0).to(tl.float32)
            tl.store(grow[:, None] + epos, (g * f[:, None]).to(g_ptr.dtype.element_ty), mask=msk)


def _rows_per_program(block_v: int) -> int:
    """One row per program on a GPU; in the interpreter (whose cost is per program) up to 16
    rows per program, 2^16 elements a tile."""
    return max(1, min(16, 65536 // block_v)) if interpreting() else 1


_BEFORE_3_9 = triton_before((3, 9))
_BEFORE_3_5 = triton_before((3, 5))


def _forced() -> dict[str, int]:
    """``NTL_FUSED_BLOCK_V`` / ``NTL_FUSED_WARPS``: override the GPU launch table of
    ``_ce_ntl_fwd`` (the launch sweep of ``scripts/gpu_check.sh``); unset: the table."""
    out = {}
    for env, key in (("NTL_FUSED_BLOCK_V", "BLOCK_V"), ("NTL_FUSED_WARPS", "num_warps")):
        val = os.environ.get(env, "")
        if val:
            n = int(val)
            if n < 1 or n & (n - 1):
                raise ValueError(f"{env} must be a power of two, got {val!r}")
            out[key] = n
    return out


def fwd_config(V: int, K: int, row_scale: bool = False, esize: int = 2,
               reweigh: bool = False) -> dict[str, int]:
    """Launch constants of ``_ce_ntl_fwd``: ``BLOCK_V`` (the row is streamed in blocks; bigger
    in the interpreter, fewer steps), ``BLOCK_K`` (K padded to a power of two), ``BLOCK_N``
    (rows per program) and ``num_warps``; ``esize``: bytes per logit.

    On a GPU 32 warps over 64 KB blocks (32k bf16/fp16 elements, as Liger-Kernel's CE; 16k
    fp32: 32k fp32 spill at the 64 registers a thread has under 32 warps). The fp16 row
    scaling, ``reweigh`` and ``K > 512`` keep more per thread (under 32 warps: 8 B of stack
    with reweigh, triton 3.9), so they get 16 warps over 16k elements (128 registers a
    thread), and so does everything on triton < 3.9, whose code for the 32-warp variant
    needs more than 64 registers (3.7: 8-104 B of stack).

    ``maxnreg=128`` with 16 warps: without it ptxas aims at two 16-warp programs per SM on
    sm_80 and caps the read-only ``K = 1,110`` variant at 64 registers, 24 B of stack
    (triton 3.9); elsewhere it changes nothing that matters (sm_90, fp16 row scaling: 90 / 99
    registers for K = 10 / 1,110 without it, 97 / 117 with it, no stack either way; 3.7:
    128 either way). No register spills for sm_80/sm_90 on triton 3.5-3.9
    (``tests/kernels/test_compile_offline.py``); triton 3.4 streams 8k-element blocks (16k: 8-64 B of
    stack with gradients at V = 50,257, where 3.4 assumes no alignment). ``NTL_FUSED_BLOCK_V`` and ``NTL_FUSED_WARPS`` (powers
    of two) override the table on a GPU (launch sweeps: ``scripts/gpu_check.sh``).
    """
    block_k = max(16, next_pow2(K))
    if interpreting():
        return {"BLOCK_N": _rows_per_program(min(next_pow2(V), 65536)),
                "BLOCK_V": min(next_pow2(V), 65536), "BLOCK_K": block_k, "num_warps": 4}
    wide = row_scale or reweigh or block_k > 512 or _BEFORE_3_9
    # triton 3.4 assumes no alignment (_vec) and spills 8-64 B over 16k elements at odd V
    block = min(next_pow2(V), 8192 if _BEFORE_3_5 else 16384 if wide or esize > 2 else 32768)
    equiv = block if wide else block * max(esize, 2) // 2  # in 16-bit elements (64 KB: 32 warps)
    warps = 32 if equiv >= 32768 else 16 if equiv >= 8192 else 8 if equiv >= 2048 else 4
    cfg = {"BLOCK_N": 1, "BLOCK_V": block, "BLOCK_K": block_k, "num_warps": warps}
    cfg.update(_forced())
    if cfg["num_warps"] == 16:
        cfg["maxnreg"] = 128
    return cfg


def _vec(*ts: torch.Tensor) -> tuple[int, int]:
    """``(VEC, mod0)``: elements per 16 bytes when the rows of every tensor in ``ts`` (one
    dtype) start at the same offset modulo 16 bytes, and row 0's element offset modulo
    ``VEC``; ``(1, 0)`` (no alignment assumed) otherwise."""
    es = ts[0].element_size()
    vec = 16 // es
    if _BEFORE_3_5:  # triton 3.4 spills 368-520 B at V = 50,257 with the hints (8-64 B without)
        return 1, 0
    mods = {(t.data_ptr() // es) % vec for t in ts}
    strides = {t.stride(0) % vec for t in ts}
    if len(mods) != 1 or len(strides) != 1 or any(t.data_ptr() % es for t in ts):
        return 1, 0
    return vec, mods.pop()


def scale_config(V: int) -> dict[str, int]:
    """Launch constants of ``_scale_rows`` (a streaming multiply): ``BLOCK_N``, ``BLOCK_V``,
    ``num_warps``."""
    block = min(next_pow2(V), 65536 if interpreting() else 8192)
    return {"BLOCK_N": _rows_per_program(block), "BLOCK_V": block, "num_warps": 8 if block >= 4096 else 4}


def ce_ntl_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, ids: torch.Tensor,
                      values: torch.Tensor, a: torch.Tensor, b: torch.Tensor, method: str,
                      reweigh: bool, dmax: float, inplace: bool, write_grad: bool = True, *,
                      squash: tuple[float, float] | None = None, huber_delta: float = 1.0,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Run the fused forward ``_ce_ntl_fwd``: ``(grad [N, V] logits dtype, rinv [N] fp32 | None, ce [N], ntl [N])``.

    ``write_grad=False``: one read-only pass, ``grad`` is ``None``. ``rinv`` (the
    inverse per-row scale of the stored gradient) is returned for fp16 gradients only.
    ``squash = (sq_a, sq_b)``: W1 distances ``d > 0`` become ``sq_a + sq_b d`` (runtime
    scalars of the kernel: ``(0, 1)`` keeps ``d``, no separate specialisation); ``huber_delta``
    the Huber threshold (a runtime scalar too). ``method``: a name registered in
    :mod:`ntl.methods` (its ``code`` selects the branch of ``ntl_row_math``).
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
    cfg = fwd_config(V, ids.numel(), row_scale, logits.element_size(), reweigh)
    vec, mod0 = _vec(logits, g)
    sq_a, sq_b = squash if squash is not None else (0.0, 1.0)
    _ce_ntl_fwd[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        logits, g, labels.contiguous(), k.contiguous(), ids, values, a.contiguous(), b.contiguous(),
        ce, loss, rinv if rinv is not None else ce, N, V, ids.numel(), logits.stride(0), g.stride(0),
        mod0, float(dmax), float(sq_a), float(sq_b), float(huber_delta), METHOD=kernel_code(method), REWEIGH=reweigh,
        WRITE_GRAD=write_grad, ROW_SCALE=row_scale, VEC=vec, **cfg)
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
    vec, mod0 = _vec(grad)
    _scale_rows[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        grad, go, rinv if rinv is not None else go, N, V, grad.stride(0), 0 if go.numel() == 1 else 1,
        mod0, HAS_RINV=rinv is not None, VEC=vec, **cfg)


# ------------------------------------------------------------------ the op: row scales, forward, backward
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
        scale_rows_triton(grad, f, rinv)
        return grad
    go = f.reshape(-1, 1) if reduction == "none" else f
    if rinv is not None:
        grad.mul_(go * rinv[:, None])
    elif f.is_cuda or not bool((f == 1.0).all()):
        grad.mul_(go)
    return grad


def _fused_call(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                ids: torch.Tensor, values: torch.Tensor, table: torch.Tensor, cfg: OpSettings,
                write_grad: bool, inplace: bool, grad_scale: float | torch.Tensor | None = None,
                place: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    """The label (and weight) checks, label -> number index, and :func:`fused_forward`; what both
    the eager Function and the custom op run (so the compiled graph runs the same code as eager)."""
    if cfg.check:
        check_label_values(labels, cfg.hi, cfg.ignore_index, weights, cfg.hi_what)
    k = number_index_torch(labels, table, cfg.ignore_index)
    return fused_forward(logits, labels, k, ids, values, cfg.ntl_weight, cfg.method, cfg.reduction,
                         cfg.reweigh, cfg.dmax, cfg.ignore_index, inplace, cfg.use_triton, write_grad,
                         cfg.squash, grad_scale, cfg.delta, weights, place)


class CENTLFunction(torch.autograd.Function):
    """Eager path: gradient computed in forward (:func:`fused_forward`), scaled in place in backward."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                ids: torch.Tensor, values: torch.Tensor, table: torch.Tensor, cfg: OpSettings,
                inplace: bool, grad_scale: float | torch.Tensor | None, place: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad, rinv, loss, ce_part, ntl_part = _fused_call(logits, labels, weights, ids, values, table, cfg,
                                                          True, inplace, grad_scale, place)
        if inplace and cfg.use_triton:  # the kernel wrote over the logits: let autograd see it
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad.detach(), rinv)  # type: ignore[union-attr]
        ctx.reduction = cfg.reduction
        ctx.use_kernel = cfg.use_triton
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(ce_part, ntl_part)
        return loss, ce_part, ntl_part

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:  # pyright: ignore[reportIncompatibleMethodOverride]
        backward_once(ctx, "cross_entropy_with_ntl", "its gradient buffer is scaled in place")
        grad, rinv = ctx.saved_tensors
        return ((fused_backward(grad, rinv, grad_out, ctx.reduction, ctx.use_kernel, ctx.grad_scale),)
                + (None,) * 9)


# ------------------------------------------------------------------ custom op (torch.compile)
_N_FIELDS = len(OpSettings._fields)
_N_HEAD = 6  # logits, labels, weights, ids, values, table: then the settings, then the call's own


@torch.library.custom_op("ntl::ce_ntl_fwd", mutates_args=())
def _ce_ntl_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, ids: torch.Tensor,
    values: torch.Tensor, table: torch.Tensor, method: str, reduction: str, ignore_index: int,
    reweigh: bool, dmax: float, sq_a: float, sq_b: float, delta: float, ntl_weight: float,
    use_triton: bool, check: bool, hi: int, hi_what: str, need_dz: bool,
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
    cfg = OpSettings(method=method, reduction=reduction, ignore_index=ignore_index, reweigh=reweigh,
                     dmax=dmax, sq_a=sq_a, sq_b=sq_b, delta=delta, ntl_weight=ntl_weight,
                     use_triton=use_triton, check=check, hi=hi, hi_what=hi_what, need_dz=need_dz)
    gs = gscale_t if gscale_t is not None else (None if gscale == 1.0 else gscale)
    grad, rinv, loss, ce, ntl = _fused_call(logits, labels, weights, ids, values, table, cfg, write_grad,
                                            False, gs, place)
    return (grad if grad is not None else logits.new_empty(0),
            rinv if rinv is not None else logits.new_empty(0, dtype=torch.float32), loss, ce, ntl)


@_ce_ntl_fwd_op.register_fake
def _(logits, labels, weights, ids, values, table, method, reduction, ignore_index, reweigh, dmax, sq_a,
      sq_b, delta, ntl_weight, use_triton, check, hi, hi_what, need_dz, write_grad, inplace, gscale,
      gscale_t, place):
    N = logits.shape[0]
    grad = (logits.new_empty(logits.shape) if write_grad
            else logits.new_empty(0))
    rinv = logits.new_empty(N if write_grad and logits.dtype == torch.float16 else 0, dtype=torch.float32)
    shape = (N,) if reduction == "none" else ()
    return (grad, rinv, *(logits.new_empty(shape, dtype=torch.float32) for _ in range(3)))


def _op_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad, rinv, _loss, ce, ntl = output
    ctx.mark_non_differentiable(grad, rinv, ce, ntl)
    cfg = OpSettings._make(inputs[_N_HEAD:_N_HEAD + _N_FIELDS])
    _write_grad, _inplace, gscale, gscale_t, _place = inputs[_N_HEAD + _N_FIELDS:]
    ctx.save_for_backward(grad, rinv, gscale_t if gscale_t is not None else rinv.new_empty(0))
    ctx.reduction = cfg.reduction
    ctx.gscale = gscale


def _op_backward(ctx: Any, _g_grad: Any, _g_rinv: Any, g: torch.Tensor, *_parts: Any):
    """``grad x g / grad_scale`` (``x rinv`` for fp16) in fp32, traceable: under inductor a
    pointwise kernel that may write into the saved buffer (AOTAutograd donates it to the
    backward)."""
    grad, rinv, gscale_t = ctx.saved_tensors
    f = g.float().reshape(-1, 1) if ctx.reduction == "none" else g.float()
    f = f / (gscale_t.reshape(()) if gscale_t.numel() else ctx.gscale)
    if rinv.numel():
        f = f * rinv[:, None]
    return ((grad.float() * f).to(grad.dtype),) + (None,) * (_N_HEAD - 1 + _N_FIELDS + 5)


_ce_ntl_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def ce_ntl_apply(logits2d: torch.Tensor, labels1d: torch.Tensor, weights: torch.Tensor | None,
                 ids: torch.Tensor, values: torch.Tensor, table: torch.Tensor, cfg: OpSettings,
                 grad: bool, inplace: bool, grad_scale: float | torch.Tensor | None = None,
                 place: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, ntl)`` of ``logits2d [N, V]``: the eager Function (``grad``) or no-grad call,
    or under ``torch.compile`` the custom op. The vocab as tensors: ``ids [K]``, ``values [K]``,
    ``table [V + 1]`` (:meth:`ntl.NumberVocab.index_table`)."""
    if torch.compiler.is_compiling():
        gs_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
        gs = grad_scale if isinstance(grad_scale, float) else 1.0
        return torch.ops.ntl.ce_ntl_fwd(logits2d, labels1d, weights, ids, values, table, *cfg, grad,
                                        inplace and grad, gs, gs_t, place)[2:]
    if grad:
        return CENTLFunction.apply(logits2d, labels1d, weights, ids, values, table, cfg, inplace,
                                   grad_scale, place)
    return _fused_call(logits2d, labels1d, weights, ids, values, table, cfg, False, False, None, place)[2:]
