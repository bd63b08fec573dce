"""NTL settings shared by the verl 0.9 engine and the legacy 0.7 actor (no verl import here).

The actor config (``ntl_verl.config.NTLActorConfig`` for verl 0.9,
``ntl_verl.legacy`` for 0.7) carries these keys under ``actor_rollout_ref.actor``;
:func:`NTLSettings.validate` checks them at start-up and names the bad key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ntl.checks import check_method
from ntl.rl.normalization import LOSS_AGG_MODES

__all__ = ["BONUS_TYPES", "KEY_PREFIX", "LABELS", "METHODS", "NTLConfigFields", "NTLSettings"]

METHODS = ("mse", "wasserstein")
LABELS = ("final_answer", "all")
BONUS_TYPES = ("none", "final_answer", "all")
KEY_PREFIX = "actor_rollout_ref.actor."
IGNORE_INDEX = -100


@dataclass(frozen=True)
class NTLSettings:
    """What the adapter does in one actor.

    Attributes:
        ntl_enabled: add ``ntl_weight * NTL`` to the actor loss.
        ntl_method: ``"mse"`` or ``"wasserstein"`` (the per-digit loss, see ``ntl.ntl_loss``).
        ntl_weight: ``loss = policy_loss + ntl_weight * NTL`` (>= 0; 0 leaves the stock loss).
        ntl_labels: which response digits get targets (``ntl.rl.targets.build_digit_targets`` mode).
        extract_digit_info: capture digit probabilities in the old-log-prob forward pass
            (needed by the digit-aware reward bonus; no extra forward).
        ntl_bonus_type: ``"none"``, ``"final_answer"`` or ``"all"``: the digit-aware bonus
            added to each response's token-level score before the advantage.
        ntl_bonus_weight: the bonus' weight (``score += ntl_bonus_weight * bonus``).
        loss_agg_mode: verl's ``actor.loss_agg_mode`` (not an NTL key): the NTL term is aggregated
            over the digit targets with the same mode as verl's policy loss
            (:mod:`ntl.rl.normalization`, :mod:`ntl_verl.loss`).
        loss_scale_factor: verl's ``actor.loss_scale_factor`` (the horizon of
            ``seq-mean-token-sum-norm``; ``None``: the micro-batch's padded response length, as verl).
    """

    ntl_enabled: bool = True
    ntl_method: str = "mse"
    ntl_weight: float = 0.1
    ntl_labels: str = "final_answer"
    extract_digit_info: bool = False
    ntl_bonus_type: str = "none"
    ntl_bonus_weight: float = 0.1
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = KEY_PREFIX) -> None:
        """Raise ``ValueError``/``TypeError`` naming ``prefix + key`` for a bad value."""
        for key in ("ntl_enabled", "extract_digit_info"):
            v = getattr(self, key)
            if not isinstance(v, bool):
                raise TypeError(f"{prefix}{key} must be true or false, got {v!r}")
        object.__setattr__(self, "ntl_method", check_method(self.ntl_method, prefix + "ntl_method"))  # frozen
        _choice(prefix + "ntl_labels", self.ntl_labels, LABELS)
        _choice(prefix + "ntl_bonus_type", self.ntl_bonus_type, BONUS_TYPES)
        for key in ("ntl_weight", "ntl_bonus_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{prefix}{key} must be a finite number >= 0, got {v!r}")
        _choice(prefix + "loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        lsf = self.loss_scale_factor
        if lsf is not None and (isinstance(lsf, bool) or not isinstance(lsf, (int, float))
                                or not math.isfinite(lsf) or lsf <= 0):
            raise ValueError(f"{prefix}loss_scale_factor must be null or a finite number > 0, got {lsf!r}")
        if self.ntl_bonus_type != "none" and not self.extract_digit_info:
            raise ValueError(
                f"{prefix}ntl_bonus_type={self.ntl_bonus_type!r} needs the digit probabilities of the "
                f"old-log-prob pass: set {prefix}extract_digit_info=true"
            )

    @property
    def bonus_enabled(self) -> bool:
        """True when the digit-aware reward bonus is on."""
        return self.extract_digit_info and self.ntl_bonus_type != "none"

    @property
    def active(self) -> bool:
        """True when the adapter has anything to do."""
        return self.ntl_enabled or self.extract_digit_info


@dataclass
class NTLConfigFields:
    """The NTL keys of an actor config (mixed into ``NTLActorConfig`` and the legacy
    ``NTLLegacyActorConfig``); defaults and meaning as in :class:`NTLSettings`. ``loss_agg_mode``
    and ``loss_scale_factor`` are verl's own actor keys (the class this is mixed into has them)."""

    ntl_enabled: bool = True
    ntl_method: str = "mse"
    ntl_weight: float = 0.1
    ntl_labels: str = "final_answer"
    extract_digit_info: bool = False
    ntl_bonus_type: str = "none"
    ntl_bonus_weight: float = 0.1

    @property
    def ntl_settings(self) -> NTLSettings:
        """The validated :class:`NTLSettings` (a bad value names ``actor_rollout_ref.actor.<key>``)."""
        return NTLSettings(**{f.name: getattr(self, f.name) for f in fields(NTLSettings)})


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
