#!/usr/bin/env bash
# The README's test command (CI runs it: .ci/run). Builds the project's environments with uv
# from the committed lock files (scripts/_env.sh: .venv, .venvs/*; works with or without an
# active virtual environment, which it leaves alone), then runs ruff, the core suite (Triton
# kernels in the CPU interpreter; the wheel, CLI and README tests) and the adapter suites:
# TRL (scripts/test_trl.sh) and verl (scripts/test_verl.sh). Arguments go to the core pytest run.
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"

ntl_env core
export PATH="$(dirname "$NTL_PY"):$PATH"
"$NTL_PY" -m ruff check src tests adapters examples
TRITON_INTERPRET=1 "$NTL_PY" -m pytest -q -p no:cacheprovider tests "$@"
bash scripts/test_trl.sh
bash scripts/test_verl.sh
