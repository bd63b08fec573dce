#!/usr/bin/env bash
# Type checking (pyright, PyPI distribution basedpyright; settings in pyrightconfig.json, why and
# how in docs/development.md). Three checks, each with the interpreter that has the frameworks
# its code imports:
#   1. src/, tests/, adapters/trl/, examples/   with the core environment (torch, transformers, TRL)
#   2. adapters/verl/                           with the verl 0.9 environment (verl)
#   3. the public API of ntl (py.typed): `--verifytypes ntl` must score 100% (every exported
#      symbol has a known type; types from other packages are not counted)
# Runs all three, then exits non-zero naming each that failed. Environments (built by
# scripts/_env.sh, not here):
#   NTL_VENV    the core environment (default <repo>/.venv); basedpyright is taken from it
#   NTL_VENVS   folder of the other environments (default <repo>/.venvs); verl09 is used
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CORE=${NTL_VENV:-$ROOT/.venv}
VERL=${NTL_VENVS:-$ROOT/.venvs}/verl09
BP="$CORE/bin/basedpyright"
for py in "$CORE/bin/python" "$VERL/bin/python"; do
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
run "verl (adapters/verl)" \
    "$BP" -p pyrightconfig.json --pythonpath "$VERL/bin/python" adapters/verl

# --verifytypes resolves the package through the interpreter's sys.path: this checkout's src
# first (the environments may hold another checkout's editable install).
verify() {
    local out score
    out=$(PYTHONPATH="$ROOT/src" "$BP" --pythonpath "$CORE/bin/python" \
        --verifytypes ntl --ignoreexternal 2>&1)
    score=$(sed -n 's/^Type completeness score: \([0-9.]*\)%$/\1/p' <<<"$out")
    if [ "$score" = 100 ]; then
        echo "ntl public API: type completeness $score%"
        return 0
    fi
    grep -E 'error:|^ntl\.' <<<"$out" | head -60
    echo "ntl public API: type completeness ${score:-?}% (needs 100%: annotate the symbols above)"
    return 1
}
run "public API of ntl (--verifytypes)" verify

if [ ${#failed[@]} -gt 0 ]; then
    printf 'typecheck: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "typecheck: all passed"
