"""NTL settings shared by the verl 0.9 engine and the legacy 0.7 actor (no verl import here).

The actor config (``ntl_verl.config.NTLActorConfig`` for verl 0.9,
``ntl_verl.legacy`` for 0.7) carries these keys under ``actor_rollout_ref.actor``;
:func:`NTLSettings.validate` checks them at start-up and names the bad key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ntl.checks import check_method
from ntl.methods import REGISTRY, Method
from ntl.rl.normalization import LOSS_AGG_MODES

__all__ = ["BONUS_TYPES", "KEY_PREFIX", "LABELS", "METHODS", "METHOD_PARAMS", "NTLConfigFields",
           "NTLSettings"]

METHODS = tuple(REGISTRY)  # every registered ntl.methods name ("w1" is an alias of "wasserstein")
#: The method parameters an actor config sets as keys: ``key -> (method name, field of its
#: ntl.methods class)``; ``null`` (the default) keeps the method's default.
METHOD_PARAMS = {"ntl_del_place_weights": ("del", "place_weights"), "ntl_dist2_tau": ("dist2", "tau")}
LABELS = ("final_answer", "all")
BONUS_TYPES = ("none", "final_answer", "all")
KEY_PREFIX = "actor_rollout_ref.actor."
IGNORE_INDEX = -100


@dataclass(frozen=True)
class NTLSettings:
    """What the adapter does in one actor.

    Attributes:
        ntl_enabled: add ``ntl_weight * NTL`` to the actor loss.
        ntl_method: any registered :mod:`ntl.methods` name (the per-position loss, see
            ``ntl.ntl_loss``): ``"mse"``, ``"wasserstein"`` (``"w1"``), ``"mae"``, ``"huber"``,
            ``"del"`` (the Digit Entropy Loss, place-weighted), ``"dist2"`` (DIST²).
        ntl_del_place_weights: DEL's ``place_weights`` (``null``: its default, ``true``); only
            with ``ntl_method: del``. DEL's place weights follow the numbers of the response
            (its final answer for ``ntl_labels: final_answer``, the tokenizer's ``'.'`` as the
            decimal point).
        ntl_dist2_tau: DIST²'s ``tau`` (``null``: its default, ``1.0``); only with
            ``ntl_method: dist2``.
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
    ntl_del_place_weights: bool | None = None
    ntl_dist2_tau: float | None = None
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
        self._method(prefix)
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
    def method(self) -> Method:
        """The :class:`ntl.methods.Method` of ``ntl_method`` with its parameter keys
        (``ntl_dist2_tau``, ``ntl_del_place_weights``)."""
        return self._method(KEY_PREFIX)

    def _method(self, prefix: str) -> Method:
        m = self.ntl_method
        given = {key: getattr(self, key) for key in METHOD_PARAMS if getattr(self, key) is not None}
        name = m.name if isinstance(m, Method) else m
        for key in given:
            owner = METHOD_PARAMS[key][0]
            if isinstance(m, Method) or name != owner:
                raise ValueError(f"{prefix}{key} applies to {prefix}ntl_method={owner} only, not "
                                 f"ntl_method={m if isinstance(m, Method) else name!r}")
        if isinstance(m, Method):
            return m
        kwargs = {METHOD_PARAMS[key][1]: v for key, v in given.items()}
        try:
            return REGISTRY[name](**kwargs)
        except (TypeError, ValueError) as e:
            key = next(iter(given))
            raise type(e)(f"{prefix}{key}: {e}") from None

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
    ntl_del_place_weights: bool | None = None
    ntl_dist2_tau: float | None = None

    @property
    def ntl_settings(self) -> NTLSettings:
        """The validated :class:`NTLSettings` (a bad value names ``actor_rollout_ref.actor.<key>``)."""
        return NTLSettings(**{f.name: getattr(self, f.name) for f in fields(NTLSettings)})


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
