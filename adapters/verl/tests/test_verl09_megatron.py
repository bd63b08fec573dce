"""strategy=megatron with NTL is refused by name at config time, never an opaque TypeError."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)


def compose(config_name: str, overrides: list[str]):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def actor_of(cfg):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


NTL = ["actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig",
       "+actor_rollout_ref.actor.ntl_weight=0.1"]


def test_megatron_with_ntl_is_refused_by_name():
    cfg = compose("ppo_megatron_trainer", NTL)
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"
    with pytest.raises(Exception) as e:
        actor_of(cfg)
    msg = str(e.value)
    assert "unexpected keyword" not in msg
    assert "strategy=megatron" in msg and "NTL is not available on verl's Megatron engine" in msg
    assert "strategy=fsdp2" in msg  # what to use instead


def test_megatron_refused_even_with_ntl_off():
    """The _target_ alone on a Megatron config: the NTL engine is FSDP-only, so refuse too."""
    cfg = compose("ppo_megatron_trainer", ["actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig"])
    with pytest.raises(Exception, match="NTL is not available on verl's Megatron engine"):
        actor_of(cfg)


def test_fsdp_config_still_builds_copies_and_pickles():
    """The __init__ wrapper leaves the FSDP path alone: built, replaced, pickled."""
    cfg = compose("ppo_trainer", [*NTL, "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                                  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    actor = actor_of(cfg)
    assert type(actor).__name__ == "NTLActorConfig" and actor.ntl_weight == 0.1
    again = pickle.loads(pickle.dumps(actor))
    assert again.ntl_weight == 0.1 and again.strategy == actor.strategy
    assert dataclasses.replace(actor, ntl_weight=0.2).ntl_weight == 0.2
