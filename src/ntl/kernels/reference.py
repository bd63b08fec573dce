"""Plain-PyTorch twins of the Triton kernels: the CPU path and the test reference.

Shapes: ``logits [N, V]``, ``ids [K]`` (number-token ids sorted by value),
``values [K]`` fp32 ascending, ``k [N]`` int64 target index (``-1``: the row does
not take part), ``soft [N, K]`` optional target distribution. All math in fp32;
gradients come from autograd. Vectorised: no loop over rows, no host sync.
"""

from __future__ import annotations

import torch

__all__ = ["digit_gather_torch", "ntl_rows_torch"]


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
    z = digit_logits.float()
    q = torch.softmax(z, dim=-1)
    active = k >= 0
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
