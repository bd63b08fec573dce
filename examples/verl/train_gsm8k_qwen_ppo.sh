#!/usr/bin/env bash
# Baseline: PPO (GAE) on GSM8K with Qwen2.5-0.5B-Instruct, verl>=0.9.1, 4 GPUs on one node.
#
#   bash examples/verl/train_gsm8k_qwen_ppo.sh [extra hydra overrides...]
#
# Settings: train batch 256, PPO mini-batch 64, micro-batch 4 per GPU, actor lr 1e-6,
# critic lr 1e-5, prompt length 1024, response length 512, GAE with gamma = lambda = 1,
# 15 epochs, validation every 10 steps. Reward: answer correctness (ntl.rewards.compute_score).
# The NTL launchers run this script with their extra overrides, so the runs differ only there.
#
# Environment: DATA_DIR (train.parquet / test.parquet in verl's GSM8K format, made by
# `python examples/verl/prepare_gsm8k.py --out DIR`), MODEL (hub id or local path), N_GPUS, NNODES,
# ROLLOUT (vllm | sglang), PROJECT, EXPERIMENT.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="${DATA_DIR:-$HOME/data/gsm8k}"
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
N_GPUS="${N_GPUS:-4}"
NNODES="${NNODES:-1}"
ROLLOUT="${ROLLOUT:-vllm}"
PROJECT="${PROJECT:-ntl_gsm8k}"
EXPERIMENT="${EXPERIMENT:-qwen2.5-0.5b_ppo}"

PYTHONUNBUFFERED=1 python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=gae \
    algorithm.gamma=1.0 \
    algorithm.lam=1.0 \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=1024 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name="$ROLLOUT" \
    actor_rollout_ref.rollout.n=1 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
    critic.optim.lr=1e-5 \
    critic.model.path="$MODEL" \
    critic.model.use_remove_padding=True \
    critic.ppo_micro_batch_size_per_gpu=4 \
    algorithm.use_kl_in_reward=False \
    reward.custom_reward_function.path="$HERE/reward_fn.py" \
    reward.custom_reward_function.name=compute_score \
    trainer.logger='["console"]' \
    trainer.project_name="$PROJECT" \
    trainer.experiment_name="$EXPERIMENT" \
    trainer.n_gpus_per_node="$N_GPUS" \
    trainer.nnodes="$NNODES" \
    trainer.val_before_train=True \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    trainer.total_epochs=15 \
    "$@"
