"""Plain-PyTorch twins of the Triton kernels: the CPU path and the test reference.

Shapes: ``logits [N, V]``, ``ids [K]`` (number-token ids sorted by value),
``values [K]`` fp32 ascending, ``k [N]`` int64 target index (``-1``: the row does
not take part), ``soft [N, K]`` optional target distribution. All math in fp32.
Vectorised: no loop over rows; no host sync except where a docstring says so
(the ``reweigh`` rows are gathered with ``nonzero``, free on a CPU).

Methods: any name registered in :data:`ntl.methods.REGISTRY` (``"mse"``, ``"mae"``,
``"huber"``, ``"wasserstein"``/``"w1"``, ...); the row formula is the method's own
(:meth:`ntl.methods.Method.row_loss_grad`), given the runtime scalars the kernels get:
``squash = (a, b)``, the W1 distance table ``d = |v_j - y|`` becoming ``a + b d`` where
``d > 0`` (``ntloss``'s ``squash_factor`` table; ``None`` keeps ``d``), and ``huber_delta``.
"""

from __future__ import annotations

import torch

from ..methods import Row, RowScalars, method_class
from ._triton import backward_once

__all__ = [
    "digit_gather_torch",
    "ntl_loss_bwd_torch",
    "ntl_loss_fwd_torch",
    "ntl_rows_grad_torch",
    "ntl_rows_torch",
    "number_index_torch",
    "number_mass_torch",
]

_EPS = torch.finfo(torch.float32).eps
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def digit_gather_torch(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits[N, V], ids[K] -> logits[:, ids]`` of shape ``[N, K]`` (input dtype)."""
    return logits.index_select(-1, ids)


def _scalars(squash: tuple[float, float] | None, huber_delta: float) -> RowScalars:
    a, b = squash if squash is not None else (0.0, 1.0)
    return RowScalars(sq_a=float(a), sq_b=float(b), delta=float(huber_delta))


def ntl_rows_torch(
    digit_logits: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    method: str,
    soft: torch.Tensor | None = None,
    *,
    squash: tuple[float, float] | None = None,
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Per-row NTL from digit logits ``z [N, K]``: ``[N]`` fp32, 0 where ``k < 0``; autograd gives
    the gradient (the test reference for the analytic forms).

    ``q = softmax(z)``, target value ``y = v[k]``, then the method's
    :meth:`~ntl.methods.Method.row_loss` (formulas in :mod:`ntl.methods`; e.g. MSE
    ``(sum_k q_k v_k - y)^2``, W1 ``sum_k q_k |v_k - y|``).
    """
    active = k >= 0
    # rows that take no part never reach the softmax (their digit logits may be -inf)
    z = torch.where(active[:, None], digit_logits.float(), 0.0)
    kc = k.clamp_min(0)
    row = Row(z=z, q=torch.softmax(z, dim=-1), values=values, y=values[kc][:, None], k=kc, soft=soft)
    loss = method_class(method).row_loss(row, _scalars(squash, huber_delta))
    return torch.where(active, loss, 0.0)


def ntl_rows_grad_torch(
    z: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    method: str,
    soft: torch.Tensor | None = None,
    *,
    squash: tuple[float, float] | None = None,
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic per-row NTL and its gradient from digit logits ``z [N, K]``.

    Returns ``(L [N], dL/dz [N, K], q [N, K])`` in fp32, zero where ``k < 0``: the method's
    :meth:`~ntl.methods.Method.row_loss_grad` (e.g. MSE/MAE/Huber ``dL/dz_j = e'(r) q_j (v_j - yhat)``,
    W1 one-hot ``q_j (d_j - L)``; all formulas in :mod:`ntl.methods`).
    """
    active = (k >= 0)[:, None]
    z = torch.where(active, z.float(), 0.0)
    q = torch.softmax(z, dim=-1)
    kc = k.clamp_min(0)
    row = Row(z=z, q=q, values=values, y=values[kc][:, None], k=kc, soft=soft)
    loss, grad = method_class(method).row_loss_grad(row, _scalars(squash, huber_delta))
    return torch.where(active[:, 0], loss, 0.0), torch.where(active, grad, 0.0), q


def number_index_torch(labels: torch.Tensor, table: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``k [N]``: the number index of each label, ``-1`` for labels outside ``[0, W)`` and
    ``ignore_index``. ``table [W + 1]`` is the vocab's lookup with a final ``-1``
    (:meth:`ntl.NumberVocab.index_table`): out-of-range labels clamp onto that entry."""
    W = table.numel() - 1
    k = table[labels.clamp(-1, W)]
    if 0 <= ignore_index < W:
        k = k.masked_fill(labels == ignore_index, -1)
    return k


def ntl_loss_fwd_torch(
    x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, soft: torch.Tensor | None,
    ids: torch.Tensor | None, values: torch.Tensor, table: torch.Tensor, ignore_index: int, method: str,
    reduction: str, reweigh: bool, dmax: float, squash: tuple[float, float] | None, huber_delta: float,
    need_dz: bool = True, scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Twin of ``ntl_loss._ntl_loss_fwd`` + ``_ntl_finalize``: the whole standalone forward.

    ``scale [N]`` (optional, fp32): a per-row factor of the row loss and its ``dL/dz``
    (DEL's place weights), applied straight after the row formula; not in the mean's divisor.

    ``x [N, Vx]`` logits (``ids`` their number columns) or ``[N, K]`` number logits
    (``ids=None``); ``labels [N]`` token ids mapped to ``k`` by ``table``
    (:func:`number_index_torch`). Per row:
    ``L`` the NTL, with ``reweigh`` ``L' = m L + D (1 - m)`` where
    ``m = sum_{j in ids} softmax(x)_j`` (computed on the rows that take part only, from
    their row max ``M`` and ``S = sum_j exp(x_j - M)``);
    ``rw = w 1[k >= 0]``; ``out = rw L'`` (none), ``sum rw L'`` or that over ``max(sum rw, eps)``.

    Returns ``(out, rows=L', dz [N, K], rw, den, L, mass, lse)`` (fp32; ``den`` is the mean's
    divisor, 1 for the sum, empty for "none"; ``lse [2N]`` is ``M`` then ``S`` (0 and 1 on rows
    taking no part), from which backward forms ``p = exp(x - M) / S``, exact to rounding where
    ``exp(x - lse)`` would lose ``~|lse| eps``; ``L``/``mass``/``lse`` are empty without
    ``reweigh``, ``dz`` without ``need_dz``).
    """
    N = x.shape[0]
    dev = x.device
    k = number_index_torch(labels, table, ignore_index)
    z = x if ids is None else x.index_select(1, ids)
    if need_dz:
        L, dz, _ = ntl_rows_grad_torch(z, k, values, method, soft, squash=squash, huber_delta=huber_delta)
    else:
        L = ntl_rows_torch(z, k, values, method, soft, squash=squash, huber_delta=huber_delta)
        dz = x.new_empty(0, dtype=torch.float32)
    if scale is not None:
        L = L * scale
        if need_dz:
            dz = dz * scale[:, None]
    active = k >= 0
    rw = torch.where(active, weights.float(), 0.0) if weights is not None else active.float()
    def empty() -> torch.Tensor:
        return x.new_empty(0, dtype=torch.float32)

    mass, lse, Lraw = empty(), empty(), empty()
    rows = L
    if reweigh:
        idx = active.nonzero().squeeze(1)  # the only host sync of this path (free on a CPU)
        xa = x.index_select(0, idx)
        xa = xa.float() if xa.dtype != torch.float32 else xa  # [n_active, V]: its own copy
        M = xa.amax(1, keepdim=True)
        S = xa.sub_(M).exp_().sum(1)
        ma = (z.index_select(0, idx).float() - M).exp().sum(1) / S
        mass = torch.zeros(N, device=dev).index_copy_(0, idx, ma)
        lse = torch.cat([torch.zeros(N, device=dev).index_copy_(0, idx, M.squeeze(1)),
                         torch.ones(N, device=dev).index_copy_(0, idx, S)])
        Lraw = L
        rows = torch.where(active, mass * L + dmax * (1.0 - mass), 0.0)
    contrib = rw * rows
    if reduction == "none":
        return contrib, rows, dz, rw, empty(), Lraw, mass, lse
    if reduction == "sum":
        return contrib.sum(), rows, dz, rw, torch.ones((), device=dev), Lraw, mass, lse
    den = rw.sum().clamp_min(_EPS)
    return contrib.sum() / den, rows, dz, rw, den, Lraw, mass, lse


def ntl_loss_bwd_torch(
    g: torch.Tensor, x: torch.Tensor | None, size: tuple[int, int], dtype: torch.dtype,
    dz: torch.Tensor, rw: torch.Tensor, den: torch.Tensor, L: torch.Tensor, mass: torch.Tensor,
    lse: torch.Tensor, ids: torch.Tensor | None, reweigh: bool, dmax: float,
) -> torch.Tensor:
    """Twin of ``ntl_loss._ntl_loss_bwd`` / ``_ntl_loss_bwd_reweigh``: ``dOut/dx [N, Vx]`` (x's dtype).

    Row scale ``s = rw g / den`` (``s = rw g`` with ``g`` per row for ``reduction="none"``). Without reweigh the
    gradient is ``s dL/dz`` at the number columns, 0 elsewhere. With it, for ``j`` in ids
    ``s (m dL/dz_j + (L - D) p_j (1 - m))`` and ``-s (L - D) m p_j`` elsewhere, where
    ``p = exp(x - M) / S`` is the full softmax (``lse = [M, S]``, see :func:`ntl_loss_fwd_torch`;
    only rows with ``s != 0`` are read; ``x`` is
    needed only with ``reweigh``, ``size = (N, V)`` and ``dtype`` are the gradient's).
    """
    N, V = size
    s = rw * g.float() if g.dim() else rw * (g.float() / den)
    if not reweigh and ids is None:  # x holds the K number logits: the gradient is dense
        return (s[:, None] * dz).to(dtype)
    out = torch.zeros((N, V), dtype=dtype, device=dz.device)
    cols = ids if ids is not None else torch.arange(V, device=dz.device)
    if not reweigh:
        out.index_copy_(1, cols, (s[:, None] * dz).to(dtype))
        return out
    assert x is not None
    idx = (s != 0).nonzero().squeeze(1)
    sa, La, ma = s[idx], L[idx], mass[idx]
    p = x.index_select(0, idx)  # [n, V]: its own copy, turned in place into the full softmax
    p = (p.float() if p.dtype != torch.float32 else p).sub_(lse[idx, None]).exp_()
    p.div_(lse[N + idx, None])
    rel = La - dmax
    pd = p.index_select(1, cols)
    num = sa[:, None] * (ma[:, None] * dz[idx] + (rel * (1.0 - ma))[:, None] * pd)
    p.mul_((-sa * rel * ma)[:, None])
    p.index_copy_(1, cols, num)
    out.index_copy_(0, idx, p.to(dtype))
    return out


# ------------------------------------------------------------------ number mass (number_mass.py)
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
    :func:`.ce_ntl.fused_forward`); ``dL/dz`` may be ``None`` with ``out=None``. Returns
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
