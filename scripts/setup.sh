#!/usr/bin/env bash
# Install what train_gpt.py needs; with `test`, also what the tests and tools need.
# On a machine without an NVIDIA GPU this installs the CPU build of torch, never the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.11"
  else
    # A local wheel (offline machines with a wheel cache) first, then PyTorch's CPU-only index.
    "$PY" -m pip install -q --no-index torch==2.13.0 2>/dev/null ||
      "$PY" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -q -r requirements.txt
if [ "${1:-}" = test ]; then
  "$PY" -m pip install -q -r requirements-dev.txt
fi
