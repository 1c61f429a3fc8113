#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the one-way layers (import-linter, .importlinter), then run the whole
# test suite; Triton kernels run under its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# lint-imports is installed next to the interpreter by requirements.txt (import-linter)
"$($PY -c 'import os, sys; print(os.path.dirname(sys.executable))')/lint-imports"
export TRITON_INTERPRET=1
exec $PY -m pytest -q "$@"
