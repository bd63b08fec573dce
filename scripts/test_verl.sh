#!/usr/bin/env bash
# Tests of the verl adapter (adapters/verl/tests, every file) on two verl lines, each from its
# lock file; CPU only, no Ray cluster:
#   verl09 (.venvs/verl09, verl 0.9.1): the engine adapter (ntl_verl.engine / loss / config) and
#          the launchers x Hydra; also the wheel test with verl present (ntl_verl imports from it);
#   verl07 (.venvs/verl07, verl 0.7.1): the legacy DataParallelPPOActor mixin (ntl_verl.legacy).
# Environments as in scripts/_env.sh (idempotent; a warm run installs nothing). Both suites run
# even when the first fails; the exit code is non-zero naming each failed suite. Extra arguments
# go to the adapter pytest runs. scripts/test.sh calls the two suite functions directly.
set -uo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NTL_VERL_PYTEST=(-m pytest -q -p no:cacheprovider -W ignore::UserWarning)

ntl_verl_09() {
    ntl_env verl09
    "$NTL_PY" -m ruff check adapters/verl examples/verl
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${NTL_VERL_PYTEST[@]}" adapters/verl/tests "$@"
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${NTL_VERL_PYTEST[@]}" tests/test_wheel.py
}

ntl_verl_07() {
    ntl_env verl07
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${NTL_VERL_PYTEST[@]}" adapters/verl/tests "$@"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    ntl_suite verl09 ntl_verl_09 "$@"
    ntl_suite verl07 ntl_verl_07 "$@"
    ntl_suites_report
fi
