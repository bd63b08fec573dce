# Sourced by the scripts (not run): the project's environments, built by uv from the committed
# lock files requirements/NAME.txt (NAME = core, trl112, verl09, verl07, floor).
#
#   ntl_env NAME   create or update the environment NAME; sets NTL_PY to its python.
#                  core is <repo>/.venv, the others <repo>/.venvs/NAME.
#
# Each environment is its own virtual environment (no --system-site-packages), so an active
# virtual environment, the system python's packages and PEP 668 play no part. torch is pinned
# in requirements/NAME.overrides.txt when that file exists (floor: PyPI's torch 2.8.0), else in
# requirements/overrides.txt (the CPU build torch==2.13.0+cpu); a local build (+cpu) is
# installed first, from uv's cache or pip's find-links when it is on disk, else from
# $NTL_TORCH_INDEX (a PyPI pin comes with the lock). A warm run installs nothing and touches no
# network.
#
# Interpreters: the scripts themselves and every environment without a header run $PYTHON
# (Python >= 3.11). An environment whose requirements/NAME.in starts with a line
# `# python: X.Y` (floor: 3.10) is built on Python X.Y, found as $NTL_PYTHON_X_Y, else
# pythonX.Y on PATH, else pyenv's newest X.Y.* (${PYENV_ROOT:-~/.pyenv}/versions).
#
# Settings (environment variables):
#   PYTHON           the scripts' interpreter and the environments' default (default python3;
#                    Python >= 3.11)
#   NTL_PYTHON_X_Y   interpreter of the environments that ask for Python X.Y (NTL_PYTHON_3_10)
#   NTL_VENV         the core environment (default <repo>/.venv)
#   NTL_VENVS        folder of the other environments (default <repo>/.venvs)
#   NTL_TORCH_INDEX  index serving the pinned torch (default https://download.pytorch.org/whl/cpu)
#   UV               uv binary (default: uv on PATH, else uv $NTL_UV_VERSION installed from PyPI
#                    with pip into ${XDG_CACHE_HOME:-~/.cache}/ntl/uv-VERSION)
#   NTL_LOCKED       1: a lock file that is out of date with pyproject.toml is an error instead
#                    of being re-locked (default 1 when CI is set)

NTL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NTL_UV_VERSION=${NTL_UV_VERSION:-0.13.9}
NTL_TORCH_INDEX=${NTL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
NTL_PYBASE=${PYTHON:-python3}
# uv must never fetch a Python build (GitHub may be unreachable) or be steered by an active venv.
export UV_PYTHON_DOWNLOADS=${UV_PYTHON_DOWNLOADS:-never}
unset VIRTUAL_ENV CONDA_PREFIX 2>/dev/null || true
# Byte-compile at install time: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every
# import of torch/transformers would otherwise compile from source again (2-3x slower tests).
export UV_COMPILE_BYTECODE=${UV_COMPILE_BYTECODE:-1}

ntl_die() {
    echo "ntl: error: $*" >&2
    exit 1
}

ntl_log() {
    echo "ntl: $*" >&2
}

# The base interpreter: an executable with Python >= 3.11 (TRL 1.16 needs 3.11; the lock digest
# reads pyproject.toml with tomllib).
ntl_check_python() {
    command -v "$NTL_PYBASE" >/dev/null 2>&1 \
        || ntl_die "no interpreter '$NTL_PYBASE' (set PYTHON to a Python >= 3.11)"
    "$NTL_PYBASE" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || ntl_die "$("$NTL_PYBASE" -V 2>&1) at '$NTL_PYBASE' is too old: the environments need Python >= 3.11 (set PYTHON=python3.11 or newer)"
}

# The Python version requirements/NAME.in asks for (`# python: X.Y` in its first lines), or
# nothing (the base interpreter's).
ntl_env_python_version() {
    sed -n '1,5s/^# python: *\([0-9]*\.[0-9]*\) *$/\1/p' "$NTL_ROOT/requirements/$1.in" | head -1
}

# The interpreter of environment NAME (sets NTL_ENVPY): $PYTHON unless NAME.in names a version,
# then $NTL_PYTHON_X_Y, pythonX.Y on PATH, or pyenv's newest X.Y.*; it must really be X.Y.
ntl_env_python() {
    local name=$1 want var cand
    want=$(ntl_env_python_version "$name")
    if [ -z "$want" ]; then
        ntl_check_python
        NTL_ENVPY=$NTL_PYBASE
        return
    fi
    var=NTL_PYTHON_${want//./_}
    local -a cands=()
    if [ -n "${!var:-}" ]; then
        cands=("${!var}")
    else
        cands=("python$want")
        for cand in "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/"$want".*/bin/python; do
            [ -x "$cand" ] && cands+=("$cand")
        done
        # newest patch release first (after PATH's)
        if [ ${#cands[@]} -gt 2 ]; then
            mapfile -t cands < <(printf '%s\n' "${cands[0]}"; printf '%s\n' "${cands[@]:1}" | sort -rV)
        fi
    fi
    for cand in "${cands[@]}"; do
        # a pyenv shim exists for versions that are not selected: run it to know
        if "$cand" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" \
                >/dev/null 2>&1; then
            NTL_ENVPY=$(command -v "$cand")
            return
        fi
    done
    if [ -n "${!var:-}" ]; then
        ntl_die "$var=${!var} is not a working Python $want (environment '$name' needs Python $want)"
    fi
    ntl_die "environment '$name' needs Python $want: none found (python$want on PATH, ${PYENV_ROOT:-~/.pyenv}/versions/$want.*); install one (e.g. pyenv install $want or apt-get install python$want-venv) or set $var=/path/to/python$want"
}

# The overrides file of environment NAME: requirements/NAME.overrides.txt, else the shared one.
ntl_overrides() {
    if [ -f "$NTL_ROOT/requirements/$1.overrides.txt" ]; then
        echo "requirements/$1.overrides.txt"
    else
        echo "requirements/overrides.txt"
    fi
}

# UV: $UV, else uv on PATH, else uv $NTL_UV_VERSION from PyPI (pip install --target: works
# with Debian's externally managed python too).
ntl_find_uv() {
    if [ -n "${UV:-}" ]; then
        "$UV" --version >/dev/null 2>&1 || ntl_die "UV=$UV is not a working uv"
        return
    fi
    if command -v uv >/dev/null 2>&1; then
        UV=$(command -v uv)
        return
    fi
    local dir="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ntl/uv-$NTL_UV_VERSION"
    if [ ! -x "$dir/bin/uv" ]; then
        ntl_log "installing uv $NTL_UV_VERSION from PyPI into $dir"
        rm -rf "$dir.tmp"
        PIP_ROOT_USER_ACTION=ignore "$NTL_PYBASE" -m pip install -q --disable-pip-version-check \
            --no-warn-script-location --target "$dir.tmp" "uv==$NTL_UV_VERSION" 2>&1 \
            | { grep -v "^WARNING: Location" >&2 || true; }
        [ -x "$dir.tmp/bin/uv" ] || ntl_die "could not install uv with '$NTL_PYBASE -m pip'; install uv (https://docs.astral.sh/uv/, e.g. pipx install uv) or set UV=/path/to/uv"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    UV="$dir/bin/uv"
}

# Digest of what requirements/NAME.txt is resolved from: requirements/NAME.in, its overrides
# and pyproject.toml's requires-python, dependencies and extras (not its tool settings).
ntl_lock_inputs() {
    "$NTL_PYBASE" - "$NTL_ROOT" "$1" "$(ntl_overrides "$1")" <<'PYEOF'
import hashlib, json, pathlib, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tests/test_locks.py in the floor environment)
    import tomli as tomllib

root, name, overrides = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
h = hashlib.sha256(json.dumps([project.get(k) for k in (
    "requires-python", "dependencies", "optional-dependencies")], sort_keys=True).encode())
for f in (f"requirements/{name}.in", overrides):
    h.update((root / f).read_bytes())
print(h.hexdigest()[:16])
PYEOF
}

# Local places pip is configured to find wheels in (this is where an offline machine keeps
# its torch build): PIP_FIND_LINKS and `pip config`.
ntl_pip_find_links() {
    {
        printf '%s\n' "${PIP_FIND_LINKS:-}" | tr ' ' '\n'
        "$NTL_PYBASE" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n'
    } | grep -v '^$' | sort -u || true
}

# A stale lock is re-locked (locally) or an error (CI / NTL_LOCKED=1).
ntl_check_lock() {
    local name=$1 lock="$NTL_ROOT/requirements/$1.txt" want have
    [ -f "$NTL_ROOT/requirements/$name.in" ] || ntl_die "no environment '$name' (requirements/$name.in)"
    want=$(ntl_lock_inputs "$name")
    have=$(sed -n 's/^# inputs: //p' "$lock" 2>/dev/null)
    [ "$want" = "$have" ] && return 0
    if [ "${NTL_LOCKED:-${CI:+1}}" = 1 ]; then
        ntl_die "requirements/$name.txt is out of date with pyproject.toml / requirements/$name.in: run 'bash scripts/lock.sh $name' and commit the result"
    fi
    ntl_log "requirements/$name.txt is out of date: re-locking it (commit the result)"
    bash "$NTL_ROOT/scripts/lock.sh" "$name"
}

ntl_venv_path() {
    if [ "$1" = core ]; then
        echo "${NTL_VENV:-$NTL_ROOT/.venv}"
    else
        echo "${NTL_VENVS:-$NTL_ROOT/.venvs}/$1"
    fi
}

# Installs the lock's torch pin into the environment unless it is there: from uv's cache or
# pip's find-links without network first, else from $NTL_TORCH_INDEX. A PyPI release (no local
# version such as +cpu) is left to the lock's sync.
ntl_install_torch() {
    local py=$1 lock=$2 pin version have links=()
    pin=$(sed -n 's/^\(torch==[^ ;]*\).*/\1/p' "$lock" | head -1)
    [ -n "$pin" ] || ntl_die "$lock pins no torch"
    version=${pin#torch==}
    [[ $version == *+* ]] || return 0
    have=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
    [ "$have" = "$version" ] && return 0
    local fl
    while IFS= read -r fl; do links+=(--find-links "$fl"); done < <(ntl_pip_find_links)
    if "$UV" pip install -q --python "$py" --no-deps --offline "${links[@]}" "$pin" 2>/dev/null; then
        return 0
    fi
    ntl_log "installing $pin from $NTL_TORCH_INDEX"
    "$UV" pip install -q --python "$py" --no-deps --index-url "$NTL_TORCH_INDEX" "${links[@]}" "$pin" \
        || ntl_die "could not install $pin (looked in uv's cache, pip's find-links [${links[*]}] and $NTL_TORCH_INDEX); set NTL_TORCH_INDEX to an index that serves it"
}

# ntl_env NAME: the environment NAME, exactly as requirements/NAME.txt says; NTL_PY its python.
ntl_env() {
    local name=$1 venv lock="$NTL_ROOT/requirements/$1.txt" want check
    ntl_check_python
    ntl_find_uv
    ntl_check_lock "$name"
    ntl_env_python "$name"
    venv=$(ntl_venv_path "$name")
    want=$(ntl_env_python_version "$name")
    if [ -n "$want" ]; then
        check="import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))"
    else
        want=">= 3.11"
        check='import sys; sys.exit(sys.version_info < (3, 11))'
    fi
    if [ -e "$venv" ] && ! "$venv/bin/python" -c "$check" 2>/dev/null; then
        ntl_die "$venv exists but has no working Python $want: remove it, or set NTL_VENV / NTL_VENVS elsewhere"
    fi
    if [ ! -e "$venv/pyvenv.cfg" ]; then
        ntl_log "creating $venv ($("$NTL_ENVPY" -V 2>&1), uv $("$UV" --version | cut -d' ' -f2))"
        "$UV" venv -q --python "$NTL_ENVPY" "$venv"
    fi
    ntl_install_torch "$venv/bin/python" "$lock"
    # Exact sync (removes what the lock does not list); offline first, so a warm run is quiet.
    (cd "$NTL_ROOT" && { "$UV" pip sync -q --offline --python "$venv/bin/python" "$lock" 2>/dev/null \
        || "$UV" pip sync -q --python "$venv/bin/python" "$lock"; }) \
        || ntl_die "could not install requirements/$name.txt into $venv"
    NTL_PY="$venv/bin/python"
}

# Suites that keep going: `ntl_suite NAME CMD...` runs CMD in a subshell (an `ntl_die` or a
# failing command ends that suite only), logs how it ended and how long it took, and records a
# failure; `ntl_suites_report` prints one line per suite and returns non-zero naming every
# suite that failed. So one failing suite never hides the others.
NTL_SUITES_FAILED=()
NTL_SUITES_LOG=()

ntl_suite() {
    local name=$1 start rc
    shift
    start=$SECONDS
    echo "ntl: == suite $name: $*" >&2
    ( set -euo pipefail; "$@" )
    rc=$?
    if [ "$rc" -eq 0 ]; then
        NTL_SUITES_LOG+=("passed  $name ($((SECONDS - start)) s)")
    else
        NTL_SUITES_LOG+=("FAILED  $name (exit $rc, $((SECONDS - start)) s)")
        NTL_SUITES_FAILED+=("$name")
    fi
    echo "ntl: == suite $name: ${NTL_SUITES_LOG[-1]%% *} (exit $rc)" >&2
    return 0
}

ntl_suites_report() {
    local line
    echo "ntl: == summary" >&2
    for line in "${NTL_SUITES_LOG[@]}"; do echo "ntl:    $line" >&2; done
    if [ ${#NTL_SUITES_FAILED[@]} -gt 0 ]; then
        echo "ntl: error: ${#NTL_SUITES_FAILED[@]} suite(s) failed: ${NTL_SUITES_FAILED[*]}" >&2
        return 1
    fi
}
