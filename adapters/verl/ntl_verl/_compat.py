"""Which verl the adapter runs on: checked when ``ntl_verl.config`` / ``ntl_verl.engine`` (verl 0.9)
or ``ntl_verl.legacy`` (verl 0.7) is imported, so a wrong verl fails at start-up (in the driver's
``validate_config`` and in each worker's ``init_model``), not at the first update after a rollout.
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["MIN_VERL", "require_verl_07", "require_verl_09"]

logger = logging.getLogger("ntl")

#: The oldest verl the engine adapter supports (0.9.0 lacks ``_scale_logits_by_temperature``).
MIN_VERL = "0.9.1"
_TESTED_BELOW = "0.10"

# (module, attribute path) the engine adapter relies on
_VERL_09_API = (
    ("verl.workers.engine.fsdp.transformer_impl", "_scale_logits_by_temperature"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.prepare_model_outputs"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.forward_backward_batch"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.forward_step"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine._gather_and_unpad_packed"),
    ("verl.workers.engine.base", "EngineRegistry.register"),
    ("verl.workers.engine.base", "EngineRegistry.get_engine_cls"),
    ("verl.workers.engine.base", "EngineRegistry._engines"),
    ("verl.workers.utils.padding", "no_padding_2_padding"),
    ("verl.workers.utils.losses", "ppo_loss"),
    ("verl.utils.tensordict_utils", "get_non_tensor_data"),
    ("verl.utils.tensordict_utils", "assign_non_tensor"),
    ("verl.utils.metric", "Metric"),
    ("verl.utils.metric", "AggregationType"),
    ("verl.utils.device", "get_device_name"),
    ("verl.utils.device", "get_vendor"),
    ("verl.workers.config", "FSDPActorConfig"),
)


def _verl_version() -> str:
    try:
        import verl
    except ImportError as e:
        raise ImportError(f"ntl_verl needs verl>={MIN_VERL} (from a clone of ntl: pip install -e '.[verl]'): {e}") from e
    return str(verl.__version__)


def _missing(api: tuple[tuple[str, str], ...]) -> list[str]:
    missing = []
    for module, path in api:
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    return missing


def require_verl_09() -> str:
    """Raise ``ImportError`` naming the installed and the required verl unless it is
    ``>= 0.9.1`` with every API the engine adapter uses. Returns the version."""
    from packaging.version import Version

    version = _verl_version()
    if Version(version) < Version(MIN_VERL):
        hint = " (verl 0.7.x: use ntl_verl.legacy)" if Version(version) < Version("0.8") else ""
        raise ImportError(f"ntl_verl needs verl>={MIN_VERL}, found verl {version}{hint}: "
                          f"pip install 'verl>={MIN_VERL},<{_TESTED_BELOW}'")
    missing = _missing(_VERL_09_API)
    if missing:
        raise ImportError(f"ntl_verl needs verl>={MIN_VERL},<{_TESTED_BELOW}; verl {version} lacks "
                          f"{', '.join(missing)}")
    if Version(version) >= Version(_TESTED_BELOW):
        logger.warning("ntl_verl is tested with verl>=%s,<%s; found verl %s", MIN_VERL, _TESTED_BELOW, version)
    return version


def require_verl_07() -> str:
    """The legacy actor (``ntl_verl.legacy``) needs verl 0.7.x's ``DataParallelPPOActor``."""
    from packaging.version import Version

    version = _verl_version()
    v = Version(version)
    missing = _missing((("verl.workers.actor.dp_actor", "DataParallelPPOActor._forward_micro_batch"),
                        ("verl.workers.actor.dp_actor", "DataParallelPPOActor.update_policy")))
    if missing:
        raise ImportError(f"ntl_verl.legacy is for verl 0.7.x, found verl {version} without "
                          f"{', '.join(missing)}: on verl>={MIN_VERL} use "
                          "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig")
    if v.release[:2] != (0, 7):
        logger.warning("ntl_verl.legacy is tested with verl 0.7.1; found verl %s", version)
    return version
