#!/usr/bin/env bash
# Pack the training script once, train one run per seed on the packed copy, in sequence, then print the
# submission check command.
#
#   SEEDS="1337 42 2025" bash scripts/run_seeds.sh [extra args for the launcher]
#
# Each seed runs as SEED=<seed> RUN_ID=${RUN_ID_PREFIX:-run}_s<seed> and writes
# logs/<RUN_ID>.txt (relative to the current directory). Stops at the first
# failing run. Other knobs (environment):
#   LAUNCH      command that runs the script (default: torchrun --standalone --nproc_per_node=${NPROC:-8})
#   TRAIN       the training script (default: train_gpt.py)
#   PACK=0      run TRAIN itself instead of its packed copy (tools/pack_code.py)
#   PACKED      where the packed copy goes (default: build/<name of TRAIN>); it is the file to submit
#   SUBMIT=1    run tools/submission.py on the logs at the end instead of only printing the command
#   SUBMIT_ARGS extra arguments for tools/submission.py, e.g. "--against val_bpb=1.2244 --write submission.json"
set -euo pipefail

SEEDS=${SEEDS:-"1337 42 2025"}
PREFIX=${RUN_ID_PREFIX:-run}
LAUNCH=${LAUNCH:-"torchrun --standalone --nproc_per_node=${NPROC:-8}"}
TRAIN=${TRAIN:-train_gpt.py}
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tools"
TOOL="$TOOLS/submission.py"

# Checked before packing, so that a refused start leaves the copy that earlier logs ran untouched.
for seed in $SEEDS; do
  if [[ -e "logs/${PREFIX}_s${seed}.txt" ]]; then
    echo "run_seeds: logs/${PREFIX}_s${seed}.txt already exists; remove it or set RUN_ID_PREFIX" >&2
    exit 1
  fi
done

# Packed once, before any seed: every run must embed, and be checked against, the very same bytes.
CODE=$TRAIN
if [[ "${PACK:-1}" != 0 ]]; then
  CODE=${PACKED:-build/$(basename "$TRAIN")}
  mkdir -p "$(dirname "$CODE")"
  python3 "$TOOLS/pack_code.py" "$TRAIN" -o "$CODE"
fi

logs=()
for seed in $SEEDS; do
  run_id="${PREFIX}_s${seed}"
  log="logs/${run_id}.txt"
  echo "run_seeds: seed $seed -> RUN_ID=$run_id"
  # shellcheck disable=SC2086  # LAUNCH is a command line, split on purpose
  if ! SEED="$seed" RUN_ID="$run_id" $LAUNCH "$@" "$CODE"; then
    echo "run_seeds: seed $seed failed (see $log); stopping" >&2
    exit 1
  fi
  logs+=("$log")
done

cmd=(python "$TOOL" "${logs[@]}" --code "$CODE")
# shellcheck disable=SC2206  # SUBMIT_ARGS is split into words on purpose
cmd+=(${SUBMIT_ARGS:-})
echo "run_seeds: done; check the runs with:"
echo "  ${cmd[*]}"
if [[ "${SUBMIT:-0}" == 1 ]]; then
  exec "${cmd[@]}"
fi
