"""How RL trainers normalise a summed per-token loss: loss aggregation modes and the
gradient-accumulation normaliser.

**Aggregation** (:func:`aggregate_loss`, :func:`aggregation_weights`, :func:`mask_counts`):
reduce a per-token loss matrix the way RL trainers reduce their policy loss.

verl's ``loss_agg_mode``\\ s over a batch of ``B`` sequences: ``loss[b, t]`` a per-token loss,
``mask[b, t]`` True where a token takes part, ``n_b = sum_t mask[b, t]``,
``N = sum_b n_b`` (tokens that take part), ``S = #{b : n_b > 0}`` (sequences that take part):

=========================== ===================================================
``token-mean``              ``L = sum_{b,t} m l / N``
``token-sum``               ``L = sum_{b,t} m l``
``seq-mean-token-sum``      ``L = (1/S) sum_b sum_t m l``
``seq-mean-token-mean``     ``L = (1/S) sum_{b: n_b > 0} (1/n_b) sum_t m l``
``seq-mean-token-sum-norm`` ``L = (1/(S H)) sum_b sum_t m l``, ``H`` a horizon
=========================== ===================================================

This is verl's ``agg_loss`` (``verl.trainer.ppo.core_algos``) with the token and sequence
counts taken on ``mask``, as its own fallback counts them when no global counts are given.
A batch is often split into chunks (micro-batches, data-parallel ranks): with ``N`` and ``S``
counted over the whole batch (:func:`mask_counts`, summed over chunks),
``L = sum_chunks aggregate_loss(loss_c, mask_c, mode, num_tokens=N, num_sequences=S)``, whatever
the split (``H`` must then be the same in every chunk). No participating token: ``L = 0``,
finite and connected to the graph. Vectorised, no host sync.

**Accumulation** (:func:`accumulation_normalizer`): a summed loss normalised by the target count
of a whole gradient-accumulation window.

A per-micro-batch mean divided by the accumulation count weighs a micro-batch with one
target as much as one with 500, and micro-batches without targets dilute the rest. The
token-level normalisation RL trainers use for their policy loss (TRL's ``dapo``,
verl's ``token-mean``) instead divides each micro-batch's *sum* by a constant ``D``::

    D = max(N, 1) / P * G / S

* ``N``: targets in the generation batch, summed over all ``P`` processes;
* ``G``: micro-batches in the current accumulation window (fewer in a short last window);
* ``S``: micro-batches the generation batch is split into (``steps_per_generation``).

Each process adds ``L_pg = sum_{i in micro-batch g} l_i / D`` to its loss; data-parallel
training (DDP, FSDP) averages the gradients over the ``P`` processes, so with ``S = G``
(the generation batch is the window) the update is that of::

    (1/P) sum_p sum_g L_pg = sum_{i in window} l_i / N,

the mean over every target of the window, however the targets fall on micro-batches and
processes (``S != G``: the window holds ``G/S`` of the generation batch and ``N G / S`` is
its expected target count). With no targets at all the sums are 0, so ``max(N, 1)`` only
avoids 0/0.
"""

from __future__ import annotations

import torch

from .._docs import shared_docs

__all__ = [
    "LOSS_AGG_MODES",
    "accumulation_normalizer",
    "aggregate_loss",
    "aggregation_weights",
    "mask_counts",
]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

Count = int | float | torch.Tensor


def _check_mode(mode: object) -> str:
    if not isinstance(mode, str) or mode not in LOSS_AGG_MODES:
        raise ValueError(f"mode must be one of {list(LOSS_AGG_MODES)}, got {mode!r}")
    return mode


def _check_mask(mask: object, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (sequences x tokens), got shape {tuple(mask.shape)}")
    return mask.bool()


def _count(value: Count | None, fallback: torch.Tensor, name: str) -> torch.Tensor:
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, dtype=torch.float32, device=fallback.device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a single count, got shape {tuple(t.shape)}")
    return t.reshape(())


@shared_docs
def mask_counts(mask: torch.Tensor) -> torch.Tensor:
    """``[N, S]`` (fp32): participating tokens and participating sequences of ``mask [B, T]``.

    Sum it over the chunks (e.g. ``torch.distributed.all_reduce``) to get the whole batch's
    counts for :func:`aggregate_loss`.

    Args:
        {mask}

    Returns:
        ``tensor([N, S])``, fp32.

    Raises:
        TypeError: ``mask`` is not a tensor.
        ValueError: ``mask`` is not 2-D.

    Example:
        >>> import torch
        >>> from ntl.rl.normalization import mask_counts
        >>> mask_counts(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]]))
        tensor([3., 2.])
    """
    m = _check_mask(mask)
    per_seq = m.sum(-1)
    return torch.stack([per_seq.sum(), (per_seq > 0).sum()]).float()


@shared_docs
def aggregation_weights(
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: Count | None = None,
    num_sequences: Count | None = None,
    horizon: Count | None = None,
) -> torch.Tensor:
    """Per-token weights ``w [B, T]`` (fp32, 0 where ``mask`` is False) with
    ``aggregate_loss(loss, mask, mode, ...) == (w * loss).sum()`` (module docstring, Aggregation).

    Args:
        {mask}
        {mode}
        {num_tokens}
        {num_sequences}
        {horizon}

    Returns:
        ``[B, T]`` fp32 weights.

    Raises:
        ValueError: an unknown ``mode``, a mask that is not 2-D, a count that is not a scalar,
            ``horizon <= 0``.
        TypeError: a count that is not a number or a tensor.

    Example:
        >>> import torch
        >>> from ntl.rl.normalization import aggregation_weights
        >>> aggregation_weights(torch.tensor([[1, 1, 0], [1, 0, 0]]), "seq-mean-token-mean")
        tensor([[0.2500, 0.2500, 0.0000],
                [0.5000, 0.0000, 0.0000]])
    """
    mode = _check_mode(mode)
    m = _check_mask(mask)
    mf = m.float()
    per_seq = mf.sum(-1, keepdim=True)  # n_b
    one = torch.ones((), device=m.device)
    if mode == "token-sum":
        return mf
    if mode == "token-mean":
        n = _count(num_tokens, per_seq.sum(), "num_tokens")
        return mf / torch.maximum(n, one)
    s = _count(num_sequences, (per_seq > 0).sum().float(), "num_sequences")
    w = mf / torch.maximum(s, one)
    if mode == "seq-mean-token-mean":
        return w / per_seq.clamp_min(1.0)
    if mode == "seq-mean-token-sum-norm":
        if isinstance(horizon, (int, float)) and not isinstance(horizon, bool) and not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        h = _count(horizon, torch.tensor(float(m.shape[-1]), device=m.device), "horizon")
        return w / h
    return w  # seq-mean-token-sum


@shared_docs
def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: Count | None = None,
    num_sequences: Count | None = None,
    horizon: Count | None = None,
) -> torch.Tensor:
    """``L`` of ``mode`` (module docstring, Aggregation) for ``loss [B, T]`` over ``mask [B, T]``: a 0-dim
    fp32 tensor; entries of ``loss`` outside ``mask`` are ignored (also NaN/inf ones).

    Args:
        loss: ``[B, T]`` float per-token loss.
        {mask}
        {mode}
        {num_tokens}
        {num_sequences}
        {horizon}

    Returns:
        A 0-dim fp32 tensor, connected to ``loss``'s graph.

    Raises:
        TypeError: a ``loss`` that is not a float tensor.
        ValueError: ``loss`` and ``mask`` shapes differ, and as :func:`aggregation_weights`.

    Example:
        >>> import torch
        >>> from ntl.rl.normalization import aggregate_loss
        >>> loss = torch.tensor([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        >>> aggregate_loss(loss, mask, "token-mean")
        tensor(2.6667)
        >>> aggregate_loss(loss, mask, "seq-mean-token-mean")
        tensor(3.)
    """
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(f"loss must be a float tensor, got {getattr(loss, 'dtype', type(loss).__name__)}")
    mask = _check_mask(mask)
    if loss.shape != mask.shape:
        raise ValueError(f"loss and mask must have the same shape, got {tuple(loss.shape)} and {tuple(mask.shape)}")
    w = aggregation_weights(mask, mode, num_tokens=num_tokens, num_sequences=num_sequences, horizon=horizon)
    zero = torch.zeros((), device=loss.device)
    return (w * torch.where(mask, loss.float(), zero)).sum()


# ----------------------------------------------------------------------------- accumulation
def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def accumulation_normalizer(
    total_targets: torch.Tensor | int | float,
    *,
    num_processes: int = 1,
    accumulation_steps: int = 1,
    steps_per_generation: int = 1,
) -> torch.Tensor:
    """``D = max(N, 1) / num_processes * accumulation_steps / steps_per_generation`` (fp32).

    Divide each micro-batch's summed loss (``reduction="sum"``) by ``D``; see the module
    docstring (Accumulation) for why the accumulated, process-averaged result is the window mean.

    Args:
        total_targets: ``N``, the generation batch's target count summed over processes
            (a tensor keeps the result on its device with no host sync).
        num_processes: ``P``, data-parallel processes whose gradients are averaged.
        accumulation_steps: ``G``, micro-batches in this accumulation window.
        steps_per_generation: ``S``, micro-batches the generation batch is split into.

    Returns:
        ``D``, a 0-dim fp32 tensor (on ``total_targets``' device).

    Raises:
        ValueError: a count that is not a positive int, a non-scalar or negative
            ``total_targets``.
        TypeError: ``total_targets`` not a number or a tensor.

    Example:
        >>> from ntl.rl.normalization import accumulation_normalizer
        >>> accumulation_normalizer(120, num_processes=4, accumulation_steps=2,
        ...                         steps_per_generation=2)  # 120 / 4 * 2 / 2
        tensor(30.)
    """
    P = _positive_int("num_processes", num_processes)
    G = _positive_int("accumulation_steps", accumulation_steps)
    S = _positive_int("steps_per_generation", steps_per_generation)
    if isinstance(total_targets, torch.Tensor):
        if total_targets.numel() != 1:
            raise ValueError(f"total_targets must be a scalar, got shape {tuple(total_targets.shape)}")
        n = total_targets.detach().reshape(()).float()
    elif isinstance(total_targets, (int, float)) and not isinstance(total_targets, bool):
        n = torch.tensor(float(total_targets))
    else:
        raise TypeError(f"total_targets must be a number or a scalar tensor, got {type(total_targets).__name__}")
    if n.device.type == "cpu" and not (bool(torch.isfinite(n)) and float(n) >= 0):  # no sync elsewhere
        raise ValueError(f"total_targets must be a finite count >= 0, got {float(n)}")
    return n.clamp(min=1.0) / P * G / S
