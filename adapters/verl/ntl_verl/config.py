"""Actor config for verl 0.9: ``actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig``.

verl builds the actor config with ``hydra.utils.instantiate`` (``omega_conf_to_dataclass``)
in the driver's ``validate_config`` (before Ray or any GPU work starts) and again in
each actor worker. This subclass adds the NTL keys, validates them in
``__post_init__`` (a bad value fails at start-up, naming the key), and hands the
settings to the actor's engine through its engine config. Importing this module
also registers the NTL engine (``ntl_verl.engine``), so the ``_target_`` override
alone activates the adapter in every process that builds the actor.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import FSDPActorConfig

from .settings import NTLConfigFields

__all__ = ["NTLActorConfig"]


@dataclass
class NTLActorConfig(FSDPActorConfig, NTLConfigFields):
    """verl's ``FSDPActorConfig`` plus the NTL keys (see :class:`ntl_verl.settings.NTLSettings`).

    ``loss = policy_loss + ntl_weight * NTL(ntl_method)`` over the response digits chosen
    by ``ntl_labels``; ``extract_digit_info`` + ``ntl_bonus_type`` turn on the
    digit-aware reward bonus.
    """

    def __post_init__(self) -> None:
        settings = self.ntl_settings  # validates, naming actor_rollout_ref.actor.<key>
        if (self.ntl_enabled or self.extract_digit_info) and self.strategy not in ("fsdp", "fsdp2"):
            raise ValueError(
                    f"actor_rollout_ref.actor.strategy={self.strategy!r}: the NTL engine supports "
                    "fsdp and fsdp2 only"
                )
        super().__post_init__()
        from . import engine as _engine

        _engine.register_ntl_engine()
        # The engine reads the settings from its engine config (the object verl passes
        # as ``engine_config`` to EngineRegistry.new for this actor, and only this actor).
        object.__setattr__(self.engine, "_ntl_settings", settings)


def _register_on_import() -> None:
    # Also register when this module is merely imported (e.g. a pickled NTLActorConfig arriving
    # in a process that never ran __post_init__); idempotent.
    from . import engine as _engine

    _engine.register_ntl_engine()


_register_on_import()
