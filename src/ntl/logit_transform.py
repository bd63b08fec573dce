"""Elementwise maps some models apply to their LM-head logits, for the ``K`` number-token logits.

Most causal LMs emit ``z = h @ W.T + b``. Some transform it first, and RL trainers then
divide by the sampling temperature ``T``:

* a logit scale ``s`` (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``,
  Granite's ``1 / logits_scaling``, ...): ``z -> s z``;
* final-logit soft-capping ``c`` (Gemma 2/3): ``z -> c tanh(z / c)``.

In that order (scale, cap, temperature, as HF models and TRL's fused head apply them)::

    f(z) = c tanh(s z / c) / T        (no cap: f(z) = s z / T)
    df/dz = s (1 - tanh(s z / c)^2) / T

``f`` acts on every logit separately, so ``f`` of the gathered digit logits ``z[..., K]``
*is* the digit columns of the model's transformed logits: NTL (a softmax over those ``K``
columns) then sees exactly what the model's log-probabilities see. Math in fp32; gradients
from autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LogitTransform"]


def _finite(name: str, v: object, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"LogitTransform.{name} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"LogitTransform.{name} must be > 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class LogitTransform:
    """``f(z) = softcap * tanh(scale * z / softcap) / temperature`` (``scale * z / temperature``
    when ``softcap`` is None), applied elementwise.

    Attributes:
        scale: logit multiplier ``s`` (``1.0``: none). Any finite value; ``0.0`` is kept
            as given (it makes every logit 0, as it would in the model).
        softcap: soft-capping constant ``c > 0``, or ``None`` for no capping.
        temperature: ``T > 0`` dividing the result (the RL sampling temperature).
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _finite("scale", self.scale, positive=False))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", _finite("softcap", self.softcap, positive=True))
        object.__setattr__(self, "temperature",
                           _finite("temperature", self.temperature, positive=True))

    @property
    def is_identity(self) -> bool:
        """True when ``f(z) = z``."""
        return self.scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """``f(z)`` in fp32 (same shape as ``z``)."""
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
            raise TypeError("LogitTransform expects a float tensor of logits, got "
                            + (str(z.dtype) if isinstance(z, torch.Tensor) else type(z).__name__))
        z = z.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z
