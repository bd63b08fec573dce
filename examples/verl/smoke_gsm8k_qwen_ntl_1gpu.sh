#!/usr/bin/env bash
# Smoke test on ONE GPU: 2 PPO steps of the NTL final-answer launcher (Qwen2.5-0.5B-Instruct,
# GSM8K), small batches, no validation, console logger. Each step prints verl's metrics,
# among them actor/ntl/loss, actor/ntl/digit_accuracy, actor/ntl/total_digits,
# actor/ntl/confidence, actor/ntl/target_prob and actor/ntl/reward (the digit bonus is on).
#
#   python examples/verl/prepare_gsm8k.py --out "$HOME/data/gsm8k"    # once (hub or --input parquet)
#   bash examples/verl/smoke_gsm8k_qwen_ntl_1gpu.sh [extra hydra overrides...]
#
# Environment as for train_gsm8k_qwen_ppo.sh (DATA_DIR, MODEL, ROLLOUT, ...); NTL_* as for the
# NTL launchers (here NTL_BONUS_TYPE defaults to final_answer). What to expect: README, "verl".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export N_GPUS=1 NNODES=1
export NTL_BONUS_TYPE="${NTL_BONUS_TYPE:-final_answer}"
export EXPERIMENT="${EXPERIMENT:-smoke_ntl_1gpu}"

exec bash "$HERE/train_gsm8k_qwen_ppo_ntl_final_answer.sh" \
    data.train_batch_size=16 \
    data.max_prompt_length=512 \
    data.max_response_length=256 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    critic.ppo_micro_batch_size_per_gpu=4 \
    trainer.total_training_steps=2 \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq=-1 \
    trainer.logger='["console"]' \
    "$@"
