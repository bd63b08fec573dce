#!/usr/bin/env bash
# The README's test command: installs what the tests need (pinned CPU torch first), then runs
# ruff, the core suite (Triton kernels in the CPU interpreter), and the adapter suites, each in
# its own virtual environment (verl and TRL pin different library versions).
# Arguments are passed to the core pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
$PY -m ruff check src tests adapters examples
TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider tests "$@"
bash scripts/test_trl.sh
bash scripts/test_verl.sh
