#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the one-way layers (import-linter, .importlinter), then run the whole
# test suite; Triton kernels run under its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lint-imports
export TRITON_INTERPRET=1
exec ${PYTHON:-python3} -m pytest -q "$@"
