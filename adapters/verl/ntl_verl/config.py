"""Actor config for verl 0.9: ``actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig``.

verl builds the actor config with ``hydra.utils.instantiate`` (``omega_conf_to_dataclass``)
in the driver's ``validate_config`` (before Ray or any GPU work starts) and again in
each actor worker's ``init_model``, right before it builds the actor's engine. This subclass:

* adds the NTL keys and validates them in ``__post_init__`` (a bad value fails at start-up,
  naming the key) and hands the settings to the actor's engine through its engine config;
* registers the NTL engine (``ntl_verl.engine``) under the key verl's ``EngineRegistry`` will look
  up in this process and checks that the lookup returns it (``VERL_ENGINE_DEVICE`` /
  ``VERL_ENGINE_VENDOR`` included), so the ``_target_`` override alone activates the adapter;
* in the driver's ``validate_config`` (:meth:`NTLActorConfig.validate`, which sees the whole
  trainer config), refuses the digit bonus with ``algorithm.rollout_correction.bypass_mode=true``
  (no old-log-prob pass) or ``trainer.use_v1=false`` (its outputs are dropped);
* after the actor is built, checks at the first loss evaluation that the NTL engine is the one
  computing it (:class:`NTLEngineCheck`), so an actor that silently runs another engine fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._compat import require_verl_09

require_verl_09()

from verl.workers.config import FSDPActorConfig  # noqa: E402

from .settings import KEY_PREFIX, NTLConfigFields, NTLSettings  # noqa: E402

__all__ = ["NTLActorConfig", "NTLEngineCheck", "check_trainer_config"]


class NTLEngineCheck(dict):
    """``NTLActorConfig.global_batch_info``: a dict that checks, at its first write, that the NTL
    engine serves this actor.

    verl's ``ppo_loss`` (and ``distillation_ppo_loss``) write the mini-batch's normalisation into
    ``config.global_batch_info`` at every loss evaluation of the actor. The NTL engine marks the
    actor's engine config when it is built and whenever it runs a batch; a write without that mark
    means another engine computes the actor's loss (plain PPO, no NTL): ``RuntimeError``.
    """

    def __init__(self, engine_config: Any) -> None:
        super().__init__()
        self._engine_config = engine_config

    def __setitem__(self, key: Any, value: Any) -> None:
        if not getattr(self._engine_config, "_ntl_engine_bound", None):
            raise RuntimeError(
                "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig, but the actor's loss is "
                "computed by an engine that is not ntl_verl's NTLFSDPEngineWithLMHead, so NTL would silently "
                "not apply. verl picks the engine with EngineRegistry.get_engine_cls (check "
                "VERL_ENGINE_DEVICE / VERL_ENGINE_VENDOR, another plugin registering an engine for the "
                "same device, or a custom worker)"
            )
        super().__setitem__(key, value)

    def __reduce__(self) -> tuple:
        return (_rebuild_engine_check, (self._engine_config, dict(self)))

    def __deepcopy__(self, memo: dict) -> NTLEngineCheck:
        import copy

        return _rebuild_engine_check(copy.deepcopy(self._engine_config, memo), copy.deepcopy(dict(self), memo))


def _rebuild_engine_check(engine_config: Any, items: dict) -> NTLEngineCheck:
    check = NTLEngineCheck(engine_config)
    dict.update(check, items)  # no __setitem__: copying is not a loss evaluation
    return check


def check_trainer_config(config: Any, settings: NTLSettings) -> None:
    """Refuse trainer settings under which the NTL settings would silently not apply.

    ``config``: verl's whole trainer config (``DictConfig``). ``ValueError`` naming the setting.
    """
    from omegaconf import OmegaConf

    if not settings.bonus_enabled:
        return
    key = f"{KEY_PREFIX}ntl_bonus_type={settings.ntl_bonus_type!r}"
    if OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode", default=False):
        raise ValueError(
            f"{key} needs verl's old-log-prob pass (the digit bonus is computed there), but "
            "algorithm.rollout_correction.bypass_mode=true skips it: turn one of them off"
        )
    if OmegaConf.select(config, "trainer.use_v1", default=True) is False:
        raise ValueError(
            f"{key} needs verl's v1 trainer (trainer.use_v1=true): the legacy trainer drops the "
            "old-log-prob pass' extra outputs, so the bonus would never reach the rewards"
        )


def _config_root(node: Any) -> Any:
    """The root of an OmegaConf node (the whole trainer config), or None."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return None
    root = node._get_root()
    return root if "actor_rollout_ref" in root else None


@dataclass
class NTLActorConfig(FSDPActorConfig, NTLConfigFields):
    """verl's ``FSDPActorConfig`` plus the NTL keys (see :class:`ntl_verl.settings.NTLSettings`).

    ``loss = policy_loss + ntl_weight * NTL(ntl_method)`` over the response digits chosen
    by ``ntl_labels``, aggregated with ``loss_agg_mode`` like the policy loss;
    ``extract_digit_info`` + ``ntl_bonus_type`` turn on the digit-aware reward bonus.
    """

    def __post_init__(self) -> None:
        settings = self.ntl_settings  # validates, naming actor_rollout_ref.actor.<key>
        if settings.active and self.strategy not in ("fsdp", "fsdp2"):
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
        if settings.active:
            object.__setattr__(self, "global_batch_info", NTLEngineCheck(self.engine))

    def validate(self, n_gpus: int, train_batch_size: int, model_config: Any = None) -> None:
        """verl's checks, then :func:`check_trainer_config` on the whole trainer config (verl's
        driver-side ``validate_config`` passes ``actor_rollout_ref.model``, a node of it)."""
        super().validate(n_gpus, train_batch_size, model_config)
        root = _config_root(model_config)
        if root is not None:
            check_trainer_config(root, self.ntl_settings)


MEGATRON_REFUSAL = (
    "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig with strategy=megatron: "
    "NTL is not available on verl's Megatron engine (tensor/pipeline parallel, vocab-parallel "
    "logits); ntl_verl's engine is the FSDP one. Use actor_rollout_ref.actor.strategy=fsdp2 "
    "(with ulysses_sequence_parallel_size for long traces), or drop the NTL keys and the _target_ "
    "override to train with Megatron without NTL (adapters/verl/README.md, 'Megatron': what is "
    "missing)."
)


def _refuse_megatron(init: Any) -> Any:
    """Wrap the dataclass ``__init__``: verl's Megatron actor config carries keys
    (``megatron``, ``profile``) an FSDP config has no field for, which would otherwise surface
    as an opaque ``TypeError: unexpected keyword argument 'megatron'``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("strategy") == "megatron" or "megatron" in kwargs:
            raise ValueError(MEGATRON_REFUSAL)
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    return __init__


NTLActorConfig.__init__ = _refuse_megatron(NTLActorConfig.__init__)  # type: ignore[method-assign]


def _register_on_import() -> None:
    # Also register when this module is merely imported (e.g. a pickled NTLActorConfig arriving
    # in a process that never ran __post_init__); idempotent.
    from . import engine as _engine

    _engine.register_ntl_engine()


_register_on_import()
