#!/usr/bin/env bash
# Tests of the verl adapter (adapters/verl/tests, every file) on two verl lines, each from its
# lock file; CPU only, no Ray cluster:
#   verl09 (.venvs/verl09, verl 0.9.1): the engine adapter (ntl_verl.engine / loss / config) and
#          the launchers x Hydra; also the wheel test with verl present (ntl_verl imports from it);
#   verl07 (.venvs/verl07, verl 0.7.1): the legacy DataParallelPPOActor mixin (ntl_verl.legacy).
# Environments as in scripts/_env.sh (idempotent; a warm run installs nothing). Extra
# arguments go to the adapter pytest runs.
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST=(-m pytest -q -p no:cacheprovider -W ignore::UserWarning)

for name in verl09 verl07; do
    ntl_env "$name"
    echo "== adapter tests with $name"
    [ "$name" = verl07 ] || "$NTL_PY" -m ruff check adapters/verl examples/verl
    PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${PYTEST[@]}" adapters/verl/tests "$@"
    if [ "$name" = verl09 ]; then
        PATH="$(dirname "$NTL_PY"):$PATH" "$NTL_PY" "${PYTEST[@]}" tests/test_wheel.py
    fi
done
