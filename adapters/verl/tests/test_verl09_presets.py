"""The 7B preset (``train_gsm8k_qwen7b_grpo_ntl_8gpu.sh``) composed with verl's own config, offline.

The launcher runs with a fake ``python3`` (``test_verl09_config.launcher_overrides``); its Hydra
overrides are composed into verl's ``ppo_trainer`` config; the actor config is instantiated
(``NTLActorConfig``) and validated as verl's driver does (``validate_config``: 8 GPUs, one node).
"""

from __future__ import annotations

import pytest
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

from test_verl09_config import actor_of, compose, launcher_overrides  # noqa: E402

SCRIPT = "train_gsm8k_qwen7b_grpo_ntl_8gpu.sh"

# the preset's settings, written out (the launcher's header says the same in words)
PRESET = {
    "algorithm.adv_estimator": "grpo",
    "algorithm.use_kl_in_reward": False,
    "data.train_batch_size": 256,
    "data.max_prompt_length": 1024,
    "data.max_response_length": 1024,
    "actor_rollout_ref.model.path": "Qwen/Qwen2.5-7B-Instruct",
    "actor_rollout_ref.model.use_remove_padding": True,
    "actor_rollout_ref.model.enable_gradient_checkpointing": True,
    "actor_rollout_ref.model.use_fused_kernels": False,
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.ppo_mini_batch_size": 64,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 8,
    "actor_rollout_ref.actor.use_kl_loss": True,
    "actor_rollout_ref.actor.kl_loss_coef": 0.001,
    "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
    "actor_rollout_ref.actor.fsdp_config.param_offload": True,
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": True,
    "actor_rollout_ref.ref.strategy": "fsdp2",
    "actor_rollout_ref.ref.fsdp_config.param_offload": True,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 32,
    "actor_rollout_ref.rollout.n": 5,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 32,
    "trainer.n_gpus_per_node": 8,
    "trainer.nnodes": 1,
}


def select(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def tiny_untied_model_dir(path, tok) -> str:
    """A local model directory shaped like Qwen2.5-7B where it matters here (vocabulary 152,064,
    untied head), tiny otherwise: what verl's driver-side checks read."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                architectures=["Qwen2ForCausalLM"]).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_7b_preset_composes_with_its_settings(tmp_path):
    from ntl_verl.config import NTLActorConfig

    cfg = compose(launcher_overrides(SCRIPT, tmp_path))
    for key, want in PRESET.items():
        assert select(cfg, key) == want, key
    # GRPO: no critic; the mini-batch of 64 prompts x 5 responses over 8 GPUs is 40 per GPU,
    # 5 whole micro-batches of 8; the rollout's tensor parallel size divides the GPUs
    from verl.trainer.ppo.utils import need_critic

    assert not need_critic(cfg)
    per_gpu, rem = divmod(64 * 5, 8)
    assert (per_gpu, rem, per_gpu % 8) == (40, 0, 0)
    assert 8 % select(cfg, "actor_rollout_ref.rollout.tensor_model_parallel_size") == 0
    actor = actor_of(cfg)
    assert type(actor) is NTLActorConfig
    s = actor.ntl_settings
    assert (s.ntl_enabled, s.ntl_method, s.ntl_labels, s.extract_digit_info, s.ntl_bonus_type) == (
        True, "mse", "all", False, "none")
    assert s.ntl_weight == pytest.approx(0.1)
    assert actor.engine._ntl_settings == s  # reaches the engine config
    assert actor.engine.param_offload is True and actor.engine.optimizer_offload is True
    actor.validate(n_gpus=8, train_batch_size=cfg.data.train_batch_size, model_config=cfg.actor_rollout_ref.model)


def test_7b_preset_passes_verls_driver_validation(tmp_path, qwen_tok):
    """verl's driver-side validate_config (batch sizes vs 8 GPUs, micro-batch keys, the actor
    config's validate with NTL's trainer checks) on a model shaped like Qwen2.5-7B."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    model = tiny_untied_model_dir(tmp_path / "model", qwen_tok)
    cfg = compose(launcher_overrides(SCRIPT, tmp_path, {"MODEL": model}))
    assert need_reference_policy(cfg)  # the KL loss needs the reference policy
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    # a mistake of the same kind is caught by the same check (so it ran): 8 GPUs, a batch of 3 x 5
    bad = compose([*launcher_overrides(SCRIPT, tmp_path, {"MODEL": model}), "data.train_batch_size=3"])
    with pytest.raises(AssertionError, match="real_train_batch_size"):
        validate_config(bad, use_reference_policy=True, use_critic=False)


def test_7b_preset_environment_and_appended_overrides(tmp_path):
    env = {"NTL_LABELS": "final_answer", "NTL_METHOD": "wasserstein", "NTL_BONUS_TYPE": "final_answer",
           "N_RESPONSES": "8", "ROLLOUT_TP": "4"}
    base = launcher_overrides(SCRIPT, tmp_path, env)
    cfg = compose([*base, "++actor_rollout_ref.actor.ntl_weight=0.3"])
    assert select(cfg, "actor_rollout_ref.rollout.n") == 8
    assert select(cfg, "actor_rollout_ref.rollout.tensor_model_parallel_size") == 4
    s = actor_of(cfg).ntl_settings
    assert (s.ntl_labels, s.ntl_method, s.extract_digit_info, s.ntl_bonus_type) == (
        "final_answer", "wasserstein", True, "final_answer")
    assert s.ntl_weight == pytest.approx(0.3)  # the documented `++` form appends (last one wins)
    with pytest.raises(Exception, match="Could not append to config"):
        compose([*base, "+actor_rollout_ref.actor.ntl_weight=0.3"])


def test_7b_preset_keeps_fused_kernels_off_and_says_why():
    """Qwen2.5-7B's head is untied; verl 0.9.1's fused path fails with it (verl #7520) and the NTL
    engine refuses it, so the preset must not turn fused kernels on by default."""
    import os

    from test_verl09_config import EXAMPLES

    with open(os.path.join(EXAMPLES, SCRIPT)) as f:
        text = f.read()
    assert 'use_fused_kernels="${FUSED:-False}"' in text
    assert "#7520" in text
