#!/usr/bin/env bash
# The README's main-job command: installs ntl with the demo extra (pinned CPU torch first), runs `ntl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[demo]"
exec $PY -m ntl demo "$@"
