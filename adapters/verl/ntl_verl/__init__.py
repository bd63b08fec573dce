"""verl adapter for ntl: Number Token Loss inside verl's PPO actor (see adapters/verl/README.md).

verl>=0.9.1: set ``actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig`` and the
``+actor_rollout_ref.actor.ntl_*`` keys; that import registers the NTL engine
(:mod:`ntl_verl.engine`) which captures digit logits in the log-prob forward pass and adds
``ntl_weight * NTL`` to the PPO loss (:mod:`ntl_verl.loss`).
verl 0.7.x: :mod:`ntl_verl.legacy` (a ``DataParallelPPOActor`` mixin).

Importing this package does not import verl; the submodules do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import NTLSettings

if TYPE_CHECKING:  # the lazy names below, for type checkers (imported on first use at run time)
    from .config import NTLActorConfig
    from .engine import register_ntl_engine
    from .loss import ntl_ppo_loss

__all__ = ["NTLActorConfig", "NTLSettings", "ntl_ppo_loss", "register_ntl_engine"]


def __getattr__(name: str) -> Any:
    if name == "NTLActorConfig":
        from .config import NTLActorConfig

        return NTLActorConfig
    if name == "ntl_ppo_loss":
        from .loss import ntl_ppo_loss

        return ntl_ppo_loss
    if name == "register_ntl_engine":
        from .engine import register_ntl_engine

        return register_ntl_engine
    raise AttributeError(f"module 'ntl_verl' has no attribute {name!r}")
