#!/usr/bin/env bash
# Type checking (pyright, PyPI distribution basedpyright; settings in pyrightconfig.json, why and
# how in docs/development.md). Each part of the code is checked with the interpreter that has
# the frameworks it imports:
#   1. src/, tests/, adapters/trl/, examples/   the core environment (torch, transformers, TRL 1.16)
#   2. adapters/verl/ (but 3.)                  the verl 0.9 environment
#   3. ntl_verl/legacy.py, its test             the verl 0.7 environment (the legacy actor)
#   4. the public API of ntl (py.typed): the share of exported symbols whose type is known
#      (`--verifytypes ntl --ignoreexternal`) must not fall below NTL_TYPE_COMPLETENESS (%,
#      default: the 98.2 reached; the rest is torch's Module/Function bases, which pyright
#      reports as unknown, and the ctx of two autograd Functions in ntl.kernels)
# Runs them all, then exits non-zero naming each that failed. Environments (built by
# scripts/_env.sh, not here):
#   NTL_VENV    the core environment (default <repo>/.venv); basedpyright is taken from it
#   NTL_VENVS   folder of the other environments (default <repo>/.venvs): verl09, verl07
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CORE=${NTL_VENV:-$ROOT/.venv}
VERL09=${NTL_VENVS:-$ROOT/.venvs}/verl09
VERL07=${NTL_VENVS:-$ROOT/.venvs}/verl07
BP="$CORE/bin/basedpyright"
for py in "$CORE/bin/python" "$VERL09/bin/python" "$VERL07/bin/python"; do
    [ -x "$py" ] || { echo "typecheck: no interpreter $py (build the environments: bash scripts/test.sh, or set NTL_VENV / NTL_VENVS)" >&2; exit 2; }
done
[ -x "$BP" ] || { echo "typecheck: no $BP (the core environment lacks the test extra's basedpyright)" >&2; exit 2; }

failed=()
run() {  # run NAME CMD...: runs CMD, records NAME when it fails
    local name=$1 t0=$SECONDS
    shift
    echo "== typecheck: $name"
    if "$@"; then echo "== typecheck: $name passed ($((SECONDS - t0)) s)"; else failed+=("$name"); fi
}

run "core (src tests adapters/trl examples)" \
    "$BP" -p pyrightconfig.json --pythonpath "$CORE/bin/python" src tests adapters/trl examples
LEGACY=(adapters/verl/ntl_verl/legacy.py adapters/verl/tests/test_verl07_legacy.py)
mapfile -t VERL_FILES < <(find adapters/verl -name '*.py' ! -path "${LEGACY[0]}" ! -path "${LEGACY[1]}" | sort)
run "verl 0.9 (adapters/verl)" \
    "$BP" -p pyrightconfig.json --pythonpath "$VERL09/bin/python" "${VERL_FILES[@]}"
run "verl 0.7 (ntl_verl.legacy)" \
    "$BP" -p pyrightconfig.json --pythonpath "$VERL07/bin/python" "${LEGACY[@]}"

# --verifytypes resolves the package through the interpreter's sys.path: this checkout's src
# first (the environments may hold another checkout's editable install).
verify() {
    local out score floor=${NTL_TYPE_COMPLETENESS:-98.2}
    out=$(PYTHONPATH="$ROOT/src" "$BP" --pythonpath "$CORE/bin/python" \
        --verifytypes ntl --ignoreexternal 2>&1)
    score=$(sed -n 's/^Type completeness score: \([0-9.]*\)%$/\1/p' <<<"$out")
    if [ -n "$score" ] && awk -v s="$score" -v f="$floor" 'BEGIN { exit !(s >= f) }'; then
        echo "ntl public API: type completeness $score% (floor $floor%)"
        return 0
    fi
    grep -E 'error:|^ntl\.' <<<"$out" | head -80
    echo "ntl public API: type completeness ${score:-?}%, below the floor $floor%: annotate the symbols above"
    return 1
}
run "public API of ntl (--verifytypes)" verify

if [ ${#failed[@]} -gt 0 ]; then
    printf 'typecheck: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "typecheck: all passed"
