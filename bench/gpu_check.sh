#!/usr/bin/env bash
# The first command on any GPU machine (at most ~8 minutes on one GPU, no download): environment and kernels,
# compile time, ms/step, tokens/s, peak memory and a compliant capped run for the default and frontier
# configurations; figures appended to bench/RESULTS.md. On a CPU: `bash bench/gpu_check.sh --tiny --seconds 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
exec python3 bench/gpu_check.py "$@"
