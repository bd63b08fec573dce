#!/usr/bin/env bash
# The README's test command: installs what the tests need (pinned CPU torch first), then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
$PY -m ruff check src tests adapters benchmarks examples
TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider tests "$@"
