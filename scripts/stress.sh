#!/usr/bin/env bash
# Run one pytest node id N times in a row with both cores busy (two `while True: pass`
# processes beside it, killed on exit), stopping at the first failure; prints each run's
# seconds (and its slowest test phases) and, at the end, runs / passes / median / max seconds. For the multi-process tests:
# a race that load provokes (issue 23) shows here, not in a quiet run.
#
#   scripts/stress.sh [-n N] [--load K] NODE_ID [pytest args...]
#   scripts/stress.sh -n 20 adapters/trl/tests/test_trl_sft_ddp.py::test_ddp_update_equals_single_process_window
#
# The python: verl09's for adapters/verl/..., the core venv's otherwise; defaults
# $NTL_ROOT/.venv/bin/python and $NTL_ROOT/.venvs/verl09/bin/python, overridden by
# NTL_CORE_PY / NTL_VERL_PY (environments as scripts/_env.sh builds them; this script installs
# nothing). PYTHONPATH puts this checkout's src/ and adapters first. Logs: $STRESS_LOGS
# (default a temp dir), one file per run.
set -euo pipefail
NTL_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N=5
LOAD=2
while [ $# -gt 0 ]; do
    case "$1" in
        -n) N="$2"; shift 2 ;;
        --load) LOAD="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: $0 [-n N] [--load K] NODE_ID [pytest args...]" >&2; exit 2; }
NODE="$1"; shift
case "$NODE" in
    adapters/verl/*) PY="${NTL_VERL_PY:-$NTL_ROOT/.venvs/verl09/bin/python}" ;;
    *) PY="${NTL_CORE_PY:-$NTL_ROOT/.venv/bin/python}" ;;
esac
[ -x "$PY" ] || { echo "no python at $PY (build the environment, or set NTL_CORE_PY / NTL_VERL_PY)" >&2; exit 2; }
LOGS="${STRESS_LOGS:-$(mktemp -d -t ntl-stress.XXXXXX)}"
mkdir -p "$LOGS"

cd "$NTL_ROOT"
export PYTHONPATH="$NTL_ROOT/src:$NTL_ROOT/adapters/trl:$NTL_ROOT/adapters/verl${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$(dirname "$PY"):$PATH"

BUSY=()
stop_load() {
    for pid in "${BUSY[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BUSY[@]}"; do wait "$pid" 2>/dev/null || true; done
    BUSY=()
}
trap stop_load EXIT
trap 'stop_load; exit 130' INT TERM
for _ in $(seq "$LOAD"); do
    "$PY" -c "while True: pass" &
    BUSY+=("$!")
done

echo "== $NODE: $N run(s) with $LOAD busy loop(s) beside it; python $PY; logs in $LOGS"
TIMES=()
passes=0
status=0
for i in $(seq "$N"); do
    log="$LOGS/run$i.log"
    t0=$(date +%s.%N)
    if "$PY" -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning \
        --durations=3 --durations-min=1 "$NODE" "$@" >"$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    TIMES+=("$dt")
    if [ "$rc" -eq 0 ] && ! grep -qE '(^| )(passed|xpassed)' "$log"; then
        rc=5  # nothing ran (all skipped or deselected): not a pass
    fi
    if [ "$rc" -ne 0 ]; then
        echo "run $i/$N: FAILED (exit $rc) after ${dt} s; last lines of $log:"
        tail -n 60 "$log"
        status=1
        break
    fi
    passes=$((passes + 1))
    # the slowest phases (a multi-process test's ranks run in its setup or call)
    phases=$(grep -E '^[0-9.]+s (setup|call|teardown) ' "$log" | head -n 2 | awk '{ printf "%s%s %s", sep, $2, $1; sep = ", " }' || true)
    echo "run $i/$N: passed in ${dt} s (${phases:-no phase over 1 s}; $(tail -n 1 "$log"))"
done
runs=${#TIMES[@]}
stats=$(printf '%s\n' "${TIMES[@]}" | sort -g | awk '{ t[NR] = $1 } END {
    m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
    printf "median %.1f s, max %.1f s", m, t[NR] }')
echo "== $NODE: $passes/$runs passed ($N asked); per run: $stats; seconds: ${TIMES[*]}"
exit "$status"
