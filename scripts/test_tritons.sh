#!/usr/bin/env bash
# The offline GPU compile (tests/kernels/offline_compile.py: sm_80 + sm_90 with the wheel's own ptxas,
# spills read from the cubin) of the fused CE+NTL kernels on every triton release pyproject
# allows between the floor (3.4, scripts/test_floor.sh) and the core lock (3.9, the core suite):
# 3.5, 3.6, 3.7, 3.8. One small environment each, .venvs/triton-X.Y.Z (torch as the core lock
# pins it, that triton, numpy): throwaway, nothing else installed. Fails on a compile error, a
# register spill (stack or local bytes) or a kernel that was not compiled at all.
#   bash scripts/test_tritons.sh [VERSION...]     (default: the four below)
set -uo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"
NTL_TRITONS=(3.5.1 3.6.0 3.7.1 3.8.0)
NTL_TRITON_KERNELS=(ce_ntl._ce_ntl_fwd ce_ntl._scale_rows)

ntl_triton_compile() {  # ntl_triton_compile VERSION
    local version=$1 venv py out numpy deps
    venv="$(ntl_venv_path "triton-$version")"
    py="$venv/bin/python"
    ntl_check_python
    ntl_find_uv
    # numpy as the floor pins it (triton < 3.7), torch's own dependencies as the core lock does
    numpy=$(sed -n 's/^\(numpy==[^ ;]*\).*/\1/p' requirements/floor.txt | head -1)
    mapfile -t deps < <(sed -n -E 's/^((filelock|fsspec|jinja2|markupsafe|mpmath|networkx|sympy|typing-extensions|setuptools)==[^ ;]*).*/\1/p' requirements/core.txt)
    [ -e "$venv/pyvenv.cfg" ] || "$UV" venv -q --python "$NTL_PYBASE" "$venv"
    ntl_install_torch "$py" requirements/core.txt
    "$UV" pip install -q --python "$py" "triton==$version" "$numpy" "${deps[@]}" \
        || ntl_die "could not install triton==$version into $venv"
    out=$(mktemp)
    TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$NTL_ROOT/src" \
        "$py" tests/kernels/offline_compile.py --arch 80 90 --only "${NTL_TRITON_KERNELS[@]}" > "$out" \
        || ntl_die "offline compile with triton $version failed"
    "$py" - "$out" "$version" "${NTL_TRITON_KERNELS[@]}" <<'PYEOF'
import json, sys

doc = json.load(open(sys.argv[1]))
version, kernels = sys.argv[2], set(sys.argv[3:])
if "skip" in doc:
    sys.exit(f"triton {version}: offline compile impossible: {doc['skip']}")
recs = doc["records"]
bad = [r for r in recs if "error" in r or r["stack"] or r["local"]]
for r in bad:
    print(f"triton {version}: {r['kernel']} sm_{r['arch']} {r['signature']} {r['constexprs']} "
          f"{r['options']}: " + (r.get("error", "")[-800:] or
          f"{r['regs']} regs, stack {r['stack']} B, local {r['local']} B"), file=sys.stderr)
missing = kernels - {r["kernel"] for r in recs}
if missing:
    sys.exit(f"triton {version}: never compiled: {sorted(missing)}")
regs = max(r["regs"] for r in recs if "error" not in r)
print(f"triton {version}: {len(recs)} compiles, {len(bad)} with errors or spills, max {regs} registers")
sys.exit(1 if bad else 0)
PYEOF
}

ntl_tritons() {
    local v failed=()
    for v in "${@:-${NTL_TRITONS[@]}}"; do
        ( ntl_triton_compile "$v" ) || failed+=("$v")
    done
    [ ${#failed[@]} -eq 0 ] || ntl_die "offline compile failed on triton ${failed[*]}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    ntl_suite tritons ntl_tritons "$@"
    ntl_suites_report
fi
