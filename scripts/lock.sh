#!/usr/bin/env bash
# Re-resolves the lock files requirements/NAME.txt from requirements/NAME.in + pyproject.toml
# (uv pip compile, universal: every platform and Python >= 3.11, or >= X.Y where NAME.in starts
# with `# python: X.Y`; torch pinned by requirements/NAME.overrides.txt when it exists, else by
# requirements/overrides.txt). Versions already in a lock are kept unless --upgrade.
#   bash scripts/lock.sh [--upgrade] [NAME...]      (default: every requirements/*.in)
# The scripts re-lock by themselves when pyproject.toml changes (outside CI); commit the result.
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$NTL_ROOT"

upgrade=()
names=()
for arg in "$@"; do
    case $arg in
        --upgrade) upgrade=(--upgrade) ;;
        -*) ntl_die "unknown option $arg (usage: bash scripts/lock.sh [--upgrade] [NAME...])" ;;
        *) names+=("$arg") ;;
    esac
done
if [ ${#names[@]} -eq 0 ]; then
    for f in requirements/*.in; do names+=("$(basename "$f" .in)"); done
fi

ntl_check_python
ntl_find_uv

# torch's metadata comes from where a local build (+cpu) lies: pip's find-links (an offline
# machine's wheel folder), else the torch page of $NTL_TORCH_INDEX; a PyPI release from PyPI.
# Nothing machine-specific is written.
torch_links() {
    local overrides=$1 torch_version fl found=
    torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$overrides")
    links=()
    while IFS= read -r fl; do
        links+=(--find-links "$fl")
        if compgen -G "${fl#file://}/torch-$torch_version-*.whl" >/dev/null; then found=1; fi
    done < <(ntl_pip_find_links)
    [[ -n "$found" || $torch_version != *+* ]] || links+=(--find-links "${NTL_TORCH_INDEX%/}/torch/")
}

for name in "${names[@]}"; do
    [ -f "requirements/$name.in" ] || ntl_die "no requirements/$name.in"
    ntl_log "locking requirements/$name.txt"
    inputs=$(ntl_lock_inputs "$name")
    overrides=$(ntl_overrides "$name")
    pyversion=$(ntl_env_python_version "$name")
    torch_links "$overrides"
    "$UV" pip compile -q "requirements/$name.in" -o "requirements/$name.txt" "${upgrade[@]}" \
        --universal --python-version "${pyversion:-3.11}" --override "$overrides" "${links[@]}" \
        --custom-compile-command "bash scripts/lock.sh $name"
    # the digest the scripts compare against to tell a stale lock (line 3, after uv's header)
    sed -i "3i # inputs: $inputs" "requirements/$name.txt"
done
