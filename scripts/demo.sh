#!/usr/bin/env bash
# The README's main-job command: builds the project's environment .venv with uv from
# requirements/core.txt (scripts/_env.sh; CPU torch, nothing else to install by hand), then
# runs `ntl demo` in it. Arguments go to `ntl demo` (e.g. --quick, --seeds 0 1 2, --rl).
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
ntl_env core
exec "$NTL_PY" -m ntl demo "$@"
