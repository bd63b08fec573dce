#!/usr/bin/env bash
# The core suite (tests/, Triton kernels in the CPU interpreter) at the oldest supported
# combination, pyproject.toml's lower bounds: the floor environment of requirements/floor.in
# (Python 3.10, torch 2.8, triton 3.4, transformers 4.55; .venvs/floor, built as in
# scripts/_env.sh). The offline GPU compile (tests/kernels/test_compile_offline.py) runs with triton
# 3.4's own ptxas and must not skip. The demo's tests are left out: the demo is an application
# of the core environment (its extra needs scipy and TRL >= 1.16, not part of the floor), and so
# are the README's TRL blocks (TRL 1.16 needs Python >= 3.11; the floor is 3.10). Extra
# arguments go to pytest. scripts/test.sh calls the suite function directly.
set -uo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"

ntl_floor() {
    ntl_env floor
    PATH="$(dirname "$NTL_PY"):$PATH" TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        NTL_REQUIRE_OFFLINE_COMPILE=1 "$NTL_PY" -m pytest -q -p no:cacheprovider tests \
        -W "ignore::DeprecationWarning:triton.runtime.interpreter" \
        --ignore tests/test_demo.py --ignore tests/test_demo_rl.py --ignore tests/test_demo_arms.py \
        --deselect tests/test_readme.py::test_trl_block --deselect tests/test_readme.py::test_sft_block "$@"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    ntl_suite floor ntl_floor "$@"
    ntl_suites_report
fi
