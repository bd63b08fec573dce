#!/usr/bin/env bash
# Tests of the TRL adapter (adapters/trl) in two virtual environments that see the system
# packages (torch 2.13.0+cpu, transformers, ntl's test deps) and add TRL on top:
#   trl 1.16 (+ peft): NTLTrainerMixin (GRPO/RLOO), NTLCallback on GRPO (also LoRA), config, example;
#   trl 1.12: NTLCallback on trl.experimental.ppo.PPOTrainer (removed in trl 1.13).
# Idempotent: existing venvs are reused, pip skips satisfied pins. Prerequisite (as in
# scripts/test.sh): `pip install torch==2.13.0 && pip install -e ".[test]"` in python3.
# Env: NTL_TRL_VENVS (venv folder, default ~/.cache/ntl-trl-venvs), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENVS=${NTL_TRL_VENVS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ntl-trl-venvs}
# The pinned torch goes into every install so that pip never swaps in another (CUDA) build;
# the other pins are what trl pulls beyond the system packages.
COMMON="torch==2.13.0 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 psutil==7.2.2 xxhash==4.1.0"

make_venv() {  # make_venv NAME TRL_VERSION [EXTRA_PINS...]
    local dir="$VENVS/$1" trl_version="$2"
    shift 2
    if [ ! -x "$dir/bin/python" ]; then
        "$PY" -m venv --system-site-packages "$dir"
    fi
    # shellcheck disable=SC2086
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "trl==$trl_version" $COMMON "$@" 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    # torch must be the system's CPU build, not a copy inside the venv
    "$dir/bin/python" - <<'EOF'
import sys, torch, trl
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.__file__.startswith(sys.prefix), f"torch was installed into the venv: {torch.__file__}"
print(f"venv {sys.prefix}: trl {trl.__version__}, torch {torch.__version__}")
EOF
}

mkdir -p "$VENVS"
make_venv trl116 1.16.0 peft==0.21.2
make_venv trl112 1.12.0

"$PY" -m ruff check adapters/trl examples/trl

# This checkout's code first on the path (the system's editable install may point elsewhere).
export PYTHONPATH="$ROOT/src:$ROOT/adapters/trl${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST=(-m pytest -q -p no:cacheprovider -W ignore::FutureWarning)
"$VENVS/trl116/bin/python" "${PYTEST[@]}" adapters/trl/tests "$@"
"$VENVS/trl112/bin/python" "${PYTEST[@]}" adapters/trl/tests/test_trl_ppo.py "$@"
