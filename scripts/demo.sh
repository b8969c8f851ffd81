#!/usr/bin/env bash
# Offline demo, end to end on CPU or GPU: build a small dataset from the standard library's docstrings, then
# train, export, reload and score a small model: the default recipe at 4 blocks of 128 (block indices and LoRA rank
# rescaled to that size). Every setting can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 data/prepare.py --out data/demo
export DATA_PATH=data/demo TOKENIZER_PATH=data/demo/tokenizer.model VOCAB_SIZE=1024 RUN_ID="${RUN_ID:-demo}" \
  NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-4}" \
  NUM_KV_HEADS="${NUM_KV_HEADS:-2}" XSA_LAST_N="${XSA_LAST_N:-4}" PARALLEL_START="${PARALLEL_START:-3}" \
  RECUR_LAYERS="${RECUR_LAYERS-1,2}" TTT_LORA_RANK="${TTT_LORA_RANK:-16}" EVAL_SECONDS="${EVAL_SECONDS:-150}" \
  TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-256}" \
  TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-8192}" ITERATIONS="${ITERATIONS:-300}" \
  WARMDOWN_FRAC="${WARMDOWN_FRAC:-0.33}" WARMUP_STEPS="${WARMUP_STEPS:-2}" \
  MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-150}" MUON_MOMENTUM_WARMUP_STEPS="${MUON_MOMENTUM_WARMUP_STEPS:-50}" \
  MATRIX_LR="${MATRIX_LR:-0.04}" TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}" VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-65536}" \
  COMPILE="${COMPILE:-$(command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)}"  # CPU: eager, no minutes of compiling
python3 train_gpt.py
