#!/usr/bin/env bash
# Install the Python packages and build the dfine._C extension in place. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and alone, so nothing else pulls another build of it.
$PY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q --disable-pip-version-check -r requirements.txt
export MAX_JOBS=${MAX_JOBS:-2}
$PY setup.py -q build_ext --inplace
$PY -c "import dfine.ops as o; print('dfine._C built:', o.extension_available(), '| CUDA kernels compiled:', o.extension_has_cuda())"
