#!/usr/bin/env bash
# PPO + NTL on GSM8K (Qwen2.5-0.5B-Instruct, verl>=0.9.1): the baseline run of
# train_gsm8k_qwen_ppo.sh plus the NTL actor, labels "final_answer" (the digits of each
# response's final answer target the ground truth's digits by place value).
#
#   bash examples/verl/train_gsm8k_qwen_ppo_ntl_final_answer.sh [extra hydra overrides...]
#
# NTL_METHOD (mse | wasserstein), NTL_WEIGHT (0.1), NTL_BONUS_TYPE (none | final_answer | all;
# the digit-aware reward bonus, computed from the old-log-prob pass) and NTL_BONUS_WEIGHT
# can be set in the environment. Needs ntl with its verl extra on every node
# (from source: `pip install -e ".[verl]"` in a clone).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NTL_BONUS_TYPE="${NTL_BONUS_TYPE:-none}"
if [ "$NTL_BONUS_TYPE" = none ]; then EXTRACT=False; else EXTRACT=True; fi

EXPERIMENT="${EXPERIMENT:-qwen2.5-0.5b_ppo_ntl_final_answer}" exec bash "$HERE/train_gsm8k_qwen_ppo.sh" \
    actor_rollout_ref.actor._target_=ntl_verl.config.NTLActorConfig \
    ++actor_rollout_ref.actor.ntl_enabled=True \
    ++actor_rollout_ref.actor.ntl_method="${NTL_METHOD:-mse}" \
    ++actor_rollout_ref.actor.ntl_weight="${NTL_WEIGHT:-0.1}" \
    ++actor_rollout_ref.actor.ntl_labels=final_answer \
    ++actor_rollout_ref.actor.extract_digit_info="$EXTRACT" \
    ++actor_rollout_ref.actor.ntl_bonus_type="$NTL_BONUS_TYPE" \
    ++actor_rollout_ref.actor.ntl_bonus_weight="${NTL_BONUS_WEIGHT:-0.1}" \
    "$@"
