#!/usr/bin/env bash
# One command for a machine with one CUDA GPU, 8 minutes in all: build dfine._C for the GPU present, run the
# op, model and training tests on CUDA, `python -m dfine.ops.compare` and the kernel benchmarks on CUDA, time the
# D-FINE-S training step (reference vs fused ops, fp32 and bf16) and a 100-step fused training run on the
# built-in synthetic data; each step under a timeout. Prints one markdown table and writes it, with every step's
# output, to $OUT/gpu_check.md (default output/gpu_check). Without a GPU it stops at once with exit status 2.
# The Python packages must be installed (scripts/setup.sh). Details: scripts/gpu_check.py, docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
