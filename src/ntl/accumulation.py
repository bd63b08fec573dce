"""Normalising a summed loss by the target count of a whole gradient-accumulation window.

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

__all__ = ["accumulation_normalizer"]


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
    docstring for why the accumulated, process-averaged result is the window mean.

    Args:
        total_targets: ``N``, the generation batch's target count summed over processes
            (a tensor keeps the result on its device with no host sync).
        num_processes: ``P``, data-parallel processes whose gradients are averaged.
        accumulation_steps: ``G``, micro-batches in this accumulation window.
        steps_per_generation: ``S``, micro-batches the generation batch is split into.
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
