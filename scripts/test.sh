#!/usr/bin/env bash
# The README's test command (CI runs it: .ci/run). Builds the project's environments with uv
# from the committed lock files (scripts/_env.sh: .venv, .venvs/*; works with or without an
# active virtual environment, which it leaves alone), then runs these suites, each one even
# when an earlier one failed, and exits non-zero naming every suite that failed:
#   ruff     lint of src, tests, adapters, examples
#   types    the type checker (scripts/typecheck.sh: pyright over src, adapters, tests)
#   core     the core suite (Triton kernels in the CPU interpreter; the wheel, CLI, README tests)
#   floor    the core suite at the oldest supported versions (scripts/test_floor.sh)
#   tritons  the offline GPU compile of the fused kernels on triton 3.5-3.8 (scripts/test_tritons.sh)
#   trl, trl112     the TRL adapter on TRL 1.16 and 1.12 (scripts/test_trl.sh)
#   verl09, verl07  the verl adapter on verl 0.9.1 and 0.7.1 (scripts/test_verl.sh)
# Arguments go to the core pytest run (`bash scripts/test.sh -x -k vocab`). NTL_SUITES picks
# suites by name (default: all, in the order above), e.g. NTL_SUITES="core trl".
set -uo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
# shellcheck source=scripts/test_trl.sh
source scripts/test_trl.sh
# shellcheck source=scripts/test_verl.sh
source scripts/test_verl.sh
# shellcheck source=scripts/test_floor.sh
source scripts/test_floor.sh
# shellcheck source=scripts/test_tritons.sh
source scripts/test_tritons.sh

ntl_ruff() {
    ntl_env core
    "$NTL_PY" -m ruff check src tests adapters examples
}

ntl_core() {
    ntl_env core
    PATH="$(dirname "$NTL_PY"):$PATH" TRITON_INTERPRET=1 "$NTL_PY" -m pytest -q -p no:cacheprovider tests "$@"
}

ntl_types() {  # each part with the environment that has its framework (scripts/typecheck.sh)
    local name
    for name in core verl09 verl07; do ntl_env "$name"; done
    bash scripts/typecheck.sh
}

all=(ruff types core floor tritons trl trl112 verl09 verl07)
read -r -a suites <<< "${NTL_SUITES:-${all[*]}}"
for s in "${suites[@]}"; do
    case $s in
        ruff) ntl_suite ruff ntl_ruff ;;
        types) ntl_suite types ntl_types ;;
        core) ntl_suite core ntl_core "$@" ;;
        floor) ntl_suite floor ntl_floor ;;
        tritons) ntl_suite tritons ntl_tritons ;;
        trl) ntl_suite trl ntl_trl_core ;;
        trl112) ntl_suite trl112 ntl_trl_112 ;;
        verl09) ntl_suite verl09 ntl_verl_09 ;;
        verl07) ntl_suite verl07 ntl_verl_07 ;;
        *) ntl_die "unknown suite '$s' in NTL_SUITES (suites: ${all[*]})" ;;
    esac
done
ntl_suites_report
