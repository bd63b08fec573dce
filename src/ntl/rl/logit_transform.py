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

:func:`logit_map_of` reads ``(s, c)`` from a model config and
:meth:`LogitTransform.for_config` builds ``f`` from it: the one place every adapter that
computes number logits from hidden states (TRL's capture, verl's fused-kernel hook) gets
the model's map. A config that declares a final-logit map this module does not implement
is refused (``ValueError``) rather than scored on other logits than the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LogitTransform", "logit_map_of"]

# config fields read by logit_map_of: the soft-cap, the scales (first found wins), the divisor
_SOFTCAP_KEY = "final_logit_softcapping"
_SCALE_KEYS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_DIVISOR_KEY = "logits_scaling"
_KNOWN_KEYS = frozenset({_SOFTCAP_KEY, *_SCALE_KEYS, _DIVISOR_KEY})
# config fields of final-logit maps that logit_map_of does not implement (field: what it does)
_UNSUPPORTED_KEYS = {
    "logits_soft_cap": "RecurrentGemma soft-caps its logits with it",
    "output_logit_soft_cap": "xLSTM soft-caps its logits with it",
    "dim_model_base": "MiniCPM divides the hidden state by hidden_size / dim_model_base before its LM head",
}
# a field named like a logit map ("logit" and one of these) ...
_MAP_WORDS = ("cap", "scal", "mult")
# ... that is not one of the final logits (attention scores, MoE router, contrastive init)
_OTHER_LOGITS = ("attn", "attention", "router", "init")


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

    Raises:
        ValueError: a ``scale``, ``softcap`` or ``temperature`` that is not finite, or a
            non-positive ``softcap``/``temperature``.

    Example:
        >>> import torch
        >>> from ntl.rl.logit_transform import LogitTransform
        >>> f = LogitTransform(scale=2.0, softcap=10.0, temperature=0.5)
        >>> f(torch.tensor([0.0, 1.0, 100.0])).round(decimals=3)  # 10 tanh(2 z / 10) / 0.5
        tensor([ 0.0000,  3.9480, 20.0000])
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

    @classmethod
    def for_config(cls, config: Any, temperature: float = 1.0) -> LogitTransform:
        """The map of the model with this config (:func:`logit_map_of`), then ``/ temperature``:
        ``f(z) = c tanh(s z / c) / T``. Raises ``ValueError`` for a logit map it does not know."""
        scale, softcap = logit_map_of(config)
        return cls(scale=scale, softcap=softcap, temperature=temperature)

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


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _config_fields(cfg: Any) -> dict[str, Any]:
    """Every field of ``cfg`` (its attributes and, for a Hugging Face config, ``to_dict()``)."""
    fields: dict[str, Any] = {}
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            fields.update(d)
    fields.update(getattr(cfg, "__dict__", {}))
    return fields


def _refuse_unknown_maps(cfg: Any) -> None:
    """``ValueError`` for a set (not None/False) config field of a final-logit map that
    :func:`logit_map_of` does not implement: one of ``_UNSUPPORTED_KEYS``, or a field whose
    name has "logit" and one of cap / scal / mult and is not about attention, a router or
    an initialisation."""
    for name, value in _config_fields(cfg).items():
        if not isinstance(name, str) or name in _KNOWN_KEYS or value is None or value is False:
            continue
        low = name.lower()
        why = _UNSUPPORTED_KEYS.get(name)
        if why is None and "logit" in low and any(w in low for w in _MAP_WORDS) and not any(
            w in low for w in _OTHER_LOGITS
        ):
            why = "it looks like a map of the final logits"
        if why is not None:
            raise ValueError(
                f"the model config sets {name}={value!r} ({why}); NTL from hidden states knows only "
                f"the logit maps {sorted(_KNOWN_KEYS)} and would score other logits than the model's. "
                "Compute NTL from the model's logits instead (verl: use_fused_kernels=False), or add "
                "the map to ntl.rl.logit_transform"
            )


def logit_map_of(config: Any) -> tuple[float, float | None]:
    """``(s, c)``, the logit scale and soft-cap of a model config (its text config for a
    composite model), read as the Hugging Face models and TRL 1.16's fused LM head read them:

    * ``c`` = ``final_logit_softcapping`` (Gemma 2/3), ``None`` for none;
    * ``s`` = the first set of ``logit_scale`` (Cohere), ``output_multiplier``,
      ``lm_head_multiplier`` (Falcon-H1); else ``1 / logits_scaling`` (Granite; ``logits_scaling``
      itself for ``model_type == "hyperclovax"``, which multiplies); else ``1.0``.

    The model's logits are then ``c tanh(s (h W^T + b) / c)`` (``s (h W^T + b)`` without
    ``c``). ``config=None`` reads as no map.

    Args:
        config: a Hugging Face model config (or any object with those attributes), or ``None``.

    Returns:
        ``(s, c)``: the scale (a float) and the soft-cap (a float or ``None``).

    Raises:
        ValueError: the config sets a final-logit map not listed above (RecurrentGemma's
            ``logits_soft_cap``, xLSTM's ``output_logit_soft_cap``, MiniCPM's
            ``dim_model_base``, or another field named like one): applying only the maps above
            would score NTL on other logits than the model's.

    Example:
        >>> from types import SimpleNamespace
        >>> from ntl.rl.logit_transform import logit_map_of
        >>> logit_map_of(SimpleNamespace(final_logit_softcapping=30.0, logits_scaling=4.0))
        (0.25, 30.0)
        >>> logit_map_of(None)
        (1.0, None)
    """
    if config is None:
        return 1.0, None
    cfg = _text_config(config)
    _refuse_unknown_maps(cfg)
    softcap = getattr(cfg, _SOFTCAP_KEY, None)
    scale = None
    for name in _SCALE_KEYS:
        scale = getattr(cfg, name, None)
        if scale is not None:
            break
    divisor = getattr(cfg, _DIVISOR_KEY, None)
    if scale is None and divisor is not None:
        scale = divisor if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / divisor
    return float(1.0 if scale is None else scale), (None if softcap is None else float(softcap))
