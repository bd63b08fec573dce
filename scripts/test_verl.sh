#!/usr/bin/env bash
# verl adapter CI: two venvs on top of the system python (which already has torch==2.13.0 and
# `pip install -e ".[test]"`), one per verl line, then the adapter tests with each.
#   verl 0.9.1 : the engine adapter (ntl_verl.engine / loss / config) + launchers x Hydra
#   verl 0.7.1 : the legacy DataParallelPPOActor mixin (ntl_verl.legacy)
# Idempotent: a venv that already has the right verl is reused. CPU only, no Ray cluster.
#   NTL_VERL_VENVS  where the venvs live (default ~/.cache/ntl-verl-venvs)
#   extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENVS=${NTL_VERL_VENVS:-$HOME/.cache/ntl-verl-venvs}
mkdir -p "$VENVS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch is pinned on every pip command line so that no resolver step swaps in a CUDA build.
# verl's own requirements are CPU-safe (no vllm/sglang/flash-attn: those are extras we skip);
# its workers also import uvicorn/fastapi/cachetools, and 0.9's v1 trainer TransferQueue.
DEPS_09=("verl==0.9.1" uvicorn fastapi cachetools "TransferQueue>=0.1.10" pyzmq msgspec)
DEPS_07=("verl==0.7.1" uvicorn fastapi cachetools)

make_venv() {  # name verl-version deps...
    local name=$1 want=$2
    shift 2
    local venv="$VENVS/$name"
    if [ ! -x "$venv/bin/python" ]; then
        $PY -m venv --system-site-packages "$venv"
    fi
    if ! "$venv/bin/python" -c "import verl, sys; sys.exit(verl.__version__ != '$want')" 2>/dev/null; then
        "$venv/bin/python" -m pip install -q "torch==2.13.0" "$@"
    fi
    "$venv/bin/python" - <<PYEOF
import torch, verl
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert "$venv" not in torch.__file__, "pip put a second torch into the venv: " + torch.__file__
assert verl.__version__ == "$want", verl.__version__
print("venv $name: verl", verl.__version__, "torch", torch.__version__)
PYEOF
}

make_venv verl09 0.9.1 "${DEPS_09[@]}"
make_venv verl07 0.7.1 "${DEPS_07[@]}"

$PY -m ruff check adapters/verl examples/verl
for name in verl09 verl07; do
    echo "== adapter tests with $name"
    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 "$VENVS/$name/bin/python" -m pytest -q -p no:cacheprovider \
        -W ignore::UserWarning adapters/verl/tests "$@"
done
