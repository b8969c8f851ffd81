#!/usr/bin/env bash
# Regenerates the committed CPU logs and submission.json on the current code: the demo (logs/demo.txt), a two-rank
# run over gloo (logs/two_rank_cpu.txt) and three seeds checked by tools/submission.py (logs/cpu_demo_s*.txt,
# submission.json). About 10 minutes on a 2-core CPU; console output goes to build/demo_logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/demo_logs
mkdir -p "$out"
rm -f logs/demo.txt logs/demo.txt.* logs/two_rank_cpu.txt logs/two_rank_cpu.txt.* logs/cpu_demo_s*.txt*
echo "demo $(date -u +%T)"
bash scripts/demo.sh > "$out/demo.out" 2>&1
tail -n 1 logs/demo.txt
TINY="DATA_PATH=data/demo TOKENIZER_PATH=data/demo/tokenizer.model VOCAB_SIZE=1024 MODEL_DIM=64 NUM_HEADS=4
  NUM_KV_HEADS=2 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 VAL_BATCH_SIZE=65536 COMPILE=0 TTT_LORA_RANK=8 EVAL_SECONDS=120"
echo "two ranks $(date -u +%T)"
# shellcheck disable=SC2086  # TINY is a list of assignments, split on purpose
env $TINY RUN_ID=two_rank_cpu NUM_LAYERS=4 XSA_LAST_N=4 PARALLEL_START=3 RECUR_LAYERS=1,2 ITERATIONS=40 WARMUP_STEPS=3 \
  WARMDOWN_FRAC=0.375 MUON_MOMENTUM_WARMUP_STEPS=10 OMP_NUM_THREADS=1 \
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt.py > "$out/two_rank.out" 2>&1
tail -n 1 logs/two_rank_cpu.txt
echo "seeds $(date -u +%T)"
# shellcheck disable=SC2086
env $TINY NUM_LAYERS=2 XSA_LAST_N=2 PARALLEL_START=1 RECUR_LAYERS=1 ITERATIONS=60 WARMDOWN_FRAC=0.33 \
  MUON_MOMENTUM_WARMUP_STEPS=20 TRAIN_LOG_EVERY=10 OMP_NUM_THREADS=2 \
  SEEDS="1337 42 2025" RUN_ID_PREFIX=cpu_demo LAUNCH=python3 SUBMIT=1 \
  SUBMIT_ARGS="--against val_loss=4.70 --write submission.json --date $(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  bash scripts/run_seeds.sh > "$out/seeds.out" 2>&1 || { tail -n 30 "$out/seeds.out"; exit 1; }
tail -n 15 "$out/seeds.out"
echo "done $(date -u +%T)"
