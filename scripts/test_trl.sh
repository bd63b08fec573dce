#!/usr/bin/env bash
# Tests of the TRL adapter (adapters/trl/tests) on two TRL lines, each from its lock file:
#   core   (.venv, TRL 1.16 + peft): NTLTrainerMixin (GRPO/RLOO), NTLCallback (also LoRA), config,
#          example - every test file in adapters/trl/tests;
#   trl112 (.venvs/trl112, TRL 1.12): NTLCallback on trl.experimental.ppo.PPOTrainer (removed in
#          TRL 1.13).
# Environments as in scripts/_env.sh (idempotent; a warm run installs nothing). Both suites run
# even when the first fails; the exit code is non-zero naming each failed suite. Extra arguments
# go to both pytest runs. scripts/test.sh calls the two suite functions directly.
set -uo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NTL_TRL_PYTEST=(-m pytest -q -p no:cacheprovider -W ignore::FutureWarning)

ntl_trl_core() {
    ntl_env core
    "$NTL_PY" -m ruff check adapters/trl examples/trl
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${NTL_TRL_PYTEST[@]}" adapters/trl/tests "$@"
}

ntl_trl_112() {
    ntl_env trl112
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${NTL_TRL_PYTEST[@]}" adapters/trl/tests/test_trl_ppo.py "$@"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    ntl_suite trl ntl_trl_core "$@"
    ntl_suite trl112 ntl_trl_112 "$@"
    ntl_suites_report
fi
