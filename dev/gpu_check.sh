#!/usr/bin/env bash
# The GPU acceptance run, one table (see dev/gpu_check.py for the rows): at most 8 minutes on one H100.
#   bash dev/gpu_check.sh               # on a CUDA GPU
#   bash dev/gpu_check.sh --cpu-smoke   # every row end to end on CPU with tiny configs (CUDA-only rows: n/a)
# PYTHON picks the interpreter (default: python on PATH, e.g. inside `uv run` or an activated .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m dev.gpu_check "$@"
