#!/usr/bin/env bash
# Install the Python packages and build the dfine._C extension in place. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# jemalloc: train.py on the CPU runs faster under it (see dfine/deploy/cpu.py). Best effort:
# without it (no root, no apt) training falls back to tuned glibc malloc.
if ! ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libjemalloc2 >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1; } \
        || echo "warning: could not install libjemalloc2; CPU training uses glibc malloc"
fi
# torch first and alone, so nothing else pulls another build of it.
$PY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q --disable-pip-version-check -r requirements.txt
export MAX_JOBS=${MAX_JOBS:-2}
$PY setup.py -q build_ext --inplace
$PY -c "import dfine.ops as o; print('dfine._C built:', o.extension_available(), '| CUDA kernels compiled:', o.extension_has_cuda())"
