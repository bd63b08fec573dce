"""Plain-PyTorch twins of the Triton kernels: the CPU path and the test reference.

Shapes: ``logits [N, V]``, ``ids [K]`` (number-token ids sorted by value),
``values [K]`` fp32 ascending, ``k [N]`` int64 target index (``-1``: the row does
not take part), ``soft [N, K]`` optional target distribution. All math in fp32.
Vectorised: no loop over rows; no host sync except where a docstring says so
(the ``reweigh`` rows are gathered with ``nonzero``, free on a CPU).

Methods: ``"mse"``, ``"mae"``, ``"huber"`` (an error of the expected value,
``ntl_dot_loss``) and ``"wasserstein"``. ``squash`` is ``(a, b)``: the W1 distance
table ``d = |v_j - y|`` becomes ``a + b d`` where ``d > 0`` (0 on the diagonal), which
is ``ntloss``'s ``squash_factor`` table; ``None`` keeps ``d``.
"""

from __future__ import annotations

import torch

__all__ = [
    "digit_gather_torch",
    "ntl_loss_bwd_torch",
    "ntl_loss_fwd_torch",
    "ntl_rows_grad_torch",
    "ntl_rows_torch",
    "number_index_torch",
]

_EPS = torch.finfo(torch.float32).eps
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def digit_gather_torch(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits[N, V], ids[K] -> logits[:, ids]`` of shape ``[N, K]`` (input dtype)."""
    return logits.index_select(-1, ids)


def _error(r: torch.Tensor, method: str, delta: float) -> torch.Tensor:
    """``e(r)`` of the expected-value losses: ``r^2``, ``|r|`` or Huber with ``delta``."""
    if method == "mse":
        return r.square()
    if method == "mae":
        return r.abs()
    a = r.abs()
    return torch.where(a < delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _error_grad(r: torch.Tensor, method: str, delta: float) -> torch.Tensor:
    """``e'(r)``: ``2 r``, ``sign(r)`` or ``clamp(r, -delta, delta)``."""
    if method == "mse":
        return 2.0 * r
    if method == "mae":
        return torch.sign(r)
    return r.clamp(-delta, delta)


def _w1_dist(values: torch.Tensor, y: torch.Tensor, squash: tuple[float, float] | None) -> torch.Tensor:
    d = (values - y).abs()
    if squash is None:
        return d
    a, b = squash
    return torch.where(d > 0, a + b * d, 0.0)


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

    ``q = softmax(z)``, ``yhat = sum_k q_k v_k``; MSE / MAE / Huber: ``e(yhat - y)``;
    W1 (one-hot target ``y = v[k]``): ``sum_k q_k d_k`` with ``d_k = |v_k - y|`` (squashed:
    ``a + b d_k`` where ``d_k > 0``); W1 (soft target ``T``): ``sum_{k<K-1} |Q_k - C_k| (v_{k+1} - v_k)``
    with ``Q, C`` the CDFs of ``q`` and ``T``.
    """
    active = k >= 0
    # rows that take no part never reach the softmax (their digit logits may be -inf)
    z = torch.where(active[:, None], digit_logits.float(), 0.0)
    q = torch.softmax(z, dim=-1)
    y = values[k.clamp_min(0)]
    if method != "wasserstein":
        loss = _error(q @ values - y, method, huber_delta)
    elif soft is None:
        loss = (q * _w1_dist(values, y[:, None], squash)).sum(-1)
    else:
        gaps = values[1:] - values[:-1]
        cdf_gap = q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]
        loss = (cdf_gap.abs() * gaps).sum(-1)
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

    Returns ``(L [N], dL/dz [N, K], q [N, K])`` in fp32, zero where ``k < 0``::

        MSE/MAE/Huber: r = yhat - y,  dL/dz_j = e'(r) q_j (v_j - yhat),
                       e'(r) = 2 r | sign(r) | clamp(r, -delta, delta)
        W1 one-hot:    dL/dz_j = q_j (d_j - L)      (d_j the, possibly squashed, distance to y)
        W1 soft:       g_i = sum_{k>=i, k<K-1} sign(Q_k - T_k) (v_{k+1} - v_k),
                       dL/dz_j = q_j (g_j - sum_i q_i g_i)
    """
    active = (k >= 0)[:, None]
    z = torch.where(active, z.float(), 0.0)
    q = torch.softmax(z, dim=-1)
    y = values[k.clamp_min(0)][:, None]
    if method != "wasserstein":
        yhat = q @ values
        r = yhat[:, None] - y
        loss = _error(r, method, huber_delta).squeeze(1)
        grad = _error_grad(r, method, huber_delta) * q * (values - yhat[:, None])
    elif soft is None:
        dist = _w1_dist(values, y, squash)
        loss = (q * dist).sum(-1)
        grad = q * (dist - loss[:, None])
    else:
        gaps = values[1:] - values[:-1]
        d = q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]
        loss = (d.abs() * gaps).sum(-1)
        s = torch.sign(d) * gaps  # [N, K-1]
        g = torch.nn.functional.pad(s.flip(-1).cumsum(-1).flip(-1), (0, 1))  # sum_{k>=i}
        grad = q * (g - (q * g).sum(-1, keepdim=True))
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
    need_dz: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Twin of ``rowloss._ntl_loss_fwd`` + ``_ntl_finalize``: the whole standalone forward.

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
    """Twin of ``rowloss._ntl_loss_bwd`` / ``_ntl_loss_bwd_reweigh``: ``dOut/dx [N, Vx]`` (x's dtype).

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
