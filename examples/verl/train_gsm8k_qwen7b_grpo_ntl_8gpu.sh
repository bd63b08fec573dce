#!/usr/bin/env bash
# GRPO + NTL on GSM8K with Qwen2.5-7B-Instruct, verl>=0.9.1, 8 GPUs (80 GB) on one node.
#
#   bash examples/verl/train_gsm8k_qwen7b_grpo_ntl_8gpu.sh [extra hydra overrides...]
#
# The 7B preset beside the 0.5B PPO launchers: GRPO (no critic; 5 responses per prompt, the
# advantage normalised within each prompt's group), KL to the reference policy as a loss
# (low_var_kl, 0.001), rollout with tensor parallel 2 (4 vLLM engines over 8 GPUs), actor and
# reference FSDP2 with parameter (and actor optimizer) offload to CPU, gradient checkpointing,
# remove-padding. Batch: 256 prompts x 5 = 1,280 responses per step, PPO mini-batch 64 prompts
# (320 responses: 40 per GPU, 5 micro-batches of 8 accumulated), log-prob passes in
# micro-batches of 32 per GPU. Reward: answer correctness (ntl.rewards.compute_score), plus NTL
# on the actor (labels from NTL_LABELS).
#
# Fused log-prob kernels stay off: Qwen2.5-7B's LM head is untied (tie_word_embeddings=false),
# verl 0.9.1 wraps it as its own FSDP2 unit, and verl's fused forward then reads a sharded
# weight and fails at the first forward (verl issue #7520); the NTL engine refuses that
# combination at worker init. FUSED=True only with a verl whose fused path handles an untied head.
#
# Environment: DATA_DIR (train.parquet / test.parquet, `python examples/verl/prepare_gsm8k.py
# --out DIR`), MODEL (hub id or local path), ROLLOUT (vllm | sglang), N_RESPONSES (5), ROLLOUT_TP
# (2), FUSED (False), PROJECT, EXPERIMENT; NTL_METHOD (mse | wasserstein), NTL_WEIGHT (0.1),
# NTL_LABELS (all | final_answer), NTL_BONUS_TYPE (none | final_answer | all), NTL_BONUS_WEIGHT.
# Documented overrides append with `++` (e.g. `++actor_rollout_ref.actor.ntl_weight=0.3`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="${DATA_DIR:-$HOME/data/gsm8k}"
MODEL="${MODEL:-Qwen/Qwen2.5-7B-Instruct}"
ROLLOUT="${ROLLOUT:-vllm}"
PROJECT="${PROJECT:-ntl_gsm8k}"
EXPERIMENT="${EXPERIMENT:-qwen2.5-7b_grpo_ntl}"
NTL_BONUS_TYPE="${NTL_BONUS_TYPE:-none}"
if [ "$NTL_BONUS_TYPE" = none ]; then EXTRACT=False; else EXTRACT=True; fi

PYTHONUNBUFFERED=1 python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=1024 \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.model.use_fused_kernels="${FUSED:-False}" \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config.param_offload=True \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32 \
    actor_rollout_ref.rollout.name="$ROLLOUT" \
    actor_rollout_ref.rollout.n="${N_RESPONSES:-5}" \
    actor_rollout_ref.rollout.tensor_model_parallel_size="${ROLLOUT_TP:-2}" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32 \
    actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig \
    ++actor_rollout_ref.actor.ntl_enabled=True \
    ++actor_rollout_ref.actor.ntl_method="${NTL_METHOD:-mse}" \
    ++actor_rollout_ref.actor.ntl_weight="${NTL_WEIGHT:-0.1}" \
    ++actor_rollout_ref.actor.ntl_labels="${NTL_LABELS:-all}" \
    ++actor_rollout_ref.actor.extract_digit_info="$EXTRACT" \
    ++actor_rollout_ref.actor.ntl_bonus_type="$NTL_BONUS_TYPE" \
    ++actor_rollout_ref.actor.ntl_bonus_weight="${NTL_BONUS_WEIGHT:-0.1}" \
    reward.custom_reward_function.path="$HERE/reward_fn.py" \
    reward.custom_reward_function.name=compute_score \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name="$PROJECT" \
    trainer.experiment_name="$EXPERIMENT" \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.val_before_train=True \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    trainer.total_epochs=15 \
    "$@"
