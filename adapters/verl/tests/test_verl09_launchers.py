"""The documented NTL overrides compose when appended to our own launchers (the `+` trap)."""

from __future__ import annotations

import pytest
from test_verl09_config import actor_of, compose, launcher_overrides


@pytest.mark.parametrize("script", ["train_gsm8k_qwen_ppo_ntl.sh", "train_gsm8k_qwen_ppo_ntl_final_answer.sh"])
def test_documented_overrides_append_to_our_launchers(script, tmp_path):
    """The README's form (`++key=value`) appended to a launcher that already sets the key:
    the last one wins. (With a single `+`, Hydra refuses: 'Could not append to config. An item
    is already at ...' - why the launchers and the docs use `++`.)"""
    base = launcher_overrides(script, tmp_path)
    assert any(o.startswith("++actor_rollout_ref.actor.ntl_weight=") for o in base)
    cfg = compose([*base, "++actor_rollout_ref.actor.ntl_weight=0.3",
                   "++actor_rollout_ref.actor.ntl_method=wasserstein"])
    actor = actor_of(cfg)
    assert actor.ntl_weight == 0.3 and actor.ntl_method == "wasserstein"
    with pytest.raises(Exception, match="Could not append to config"):
        compose([*base, "+actor_rollout_ref.actor.ntl_weight=0.3"])


def test_documented_overrides_on_stock_verl(tmp_path):
    """The same `++` keys on verl's stock ppo_trainer (no launcher of ours) add the keys."""
    base = [o for o in launcher_overrides("train_gsm8k_qwen_ppo.sh", tmp_path)]
    cfg = compose([*base, "actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig",
                   "++actor_rollout_ref.actor.ntl_weight=0.1", "++actor_rollout_ref.actor.ntl_method=mse",
                   "++actor_rollout_ref.actor.ntl_labels=final_answer"])
    actor = actor_of(cfg)
    assert (actor.ntl_weight, actor.ntl_method, actor.ntl_labels) == (0.1, "mse", "final_answer")
