#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job: compare every fused op with its reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m dfine.ops.compare
