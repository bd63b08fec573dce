"""Plain-PyTorch twins of the Triton kernels: the CPU path and the test reference.

Shapes: ``logits [N, V]``, ``ids [K]`` (number-token ids sorted by value),
``values [K]`` fp32 ascending, ``k [N]`` int64 target index (``-1``: the row does
not take part), ``soft [N, K]`` optional target distribution. All math in fp32;
gradients come from autograd. Vectorised: no loop over rows, no host sync.
"""

from __future__ import annotations

import torch

__all__ = ["digit_gather_torch", "ntl_rows_grad_torch", "ntl_rows_torch"]


def digit_gather_torch(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits[N, V], ids[K] -> logits[:, ids]`` of shape ``[N, K]`` (input dtype)."""
    return logits.index_select(-1, ids)


def ntl_rows_torch(
    digit_logits: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    method: str,
    soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row NTL from digit logits ``z [N, K]``: ``[N]`` fp32, 0 where ``k < 0``.

    ``q = softmax(z)``; MSE: ``(sum_k q_k v_k - y)^2``;
    W1 (one-hot target ``y = v[k]``): ``sum_k q_k |v_k - y|``;
    W1 (soft target ``T``): ``sum_{k<K-1} |Q_k - C_k| (v_{k+1} - v_k)`` with
    ``Q, C`` the CDFs of ``q`` and ``T``.
    """
    active = k >= 0
    # rows that take no part never reach the softmax (their digit logits may be -inf)
    z = torch.where(active[:, None], digit_logits.float(), torch.zeros((), device=digit_logits.device))
    q = torch.softmax(z, dim=-1)
    y = values[k.clamp_min(0)]
    if method == "mse":
        loss = (q @ values - y).square()
    elif soft is None:
        loss = (q * (values - y[:, None]).abs()).sum(-1)
    else:
        gaps = values[1:] - values[:-1]
        cdf_gap = q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]
        loss = (cdf_gap.abs() * gaps).sum(-1)
    return torch.where(active, loss, torch.zeros((), device=loss.device))


def ntl_rows_grad_torch(
    z: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    method: str,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic per-row NTL and its gradient from digit logits ``z [N, K]``.

    Returns ``(L [N], dL/dz [N, K], q [N, K])`` in fp32, zero where ``k < 0``::

        MSE:        dL/dz_j = 2 (yhat - y) q_j (v_j - yhat)
        W1 one-hot: dL/dz_j = q_j (|v_j - y| - L)
        W1 soft:    g_i = sum_{k>=i, k<K-1} sign(Q_k - T_k) (v_{k+1} - v_k),
                    dL/dz_j = q_j (g_j - sum_i q_i g_i)
    """
    active = (k >= 0)[:, None]
    z = torch.where(active, z.float(), torch.zeros((), device=z.device))
    q = torch.softmax(z, dim=-1)
    y = values[k.clamp_min(0)][:, None]
    if method == "mse":
        yhat = q @ values
        diff = yhat[:, None] - y
        loss = diff.squeeze(1).square()
        grad = 2.0 * diff * q * (values - yhat[:, None])
    elif soft is None:
        dist = (values - y).abs()
        loss = (q * dist).sum(-1)
        grad = q * (dist - loss[:, None])
    else:
        gaps = values[1:] - values[:-1]
        d = q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]
        loss = (d.abs() * gaps).sum(-1)
        s = torch.sign(d) * gaps  # [N, K-1]
        g = torch.nn.functional.pad(s.flip(-1).cumsum(-1).flip(-1), (0, 1))  # sum_{k>=i}
        grad = q * (g - (q * g).sum(-1, keepdim=True))
    zero = torch.zeros((), device=z.device)
    return torch.where(active[:, 0], loss, zero), torch.where(active, grad, zero), q
