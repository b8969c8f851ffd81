#!/usr/bin/env bash
# Cumulative ablation on one GPU: the official baseline, then ours with each technique added in turn.
# Every row trains for the same wall clock on the same proxy data; two seeds give the noise. Logs go to
# $OUT_DIR (default results/ablation_logs), the table to results/ABLATION.md (bench/ablation_table.py).
#
#   DATA_1024=... DATA_8192=... TOK_DIR=... BASELINE=.../official_baseline_train_gpt.py \
#     TRAIN_SECONDS=300 SEEDS="1337 42" bash bench/ablation.sh [ROW ...]
#
# DATA_1024 / DATA_8192: proxy shard directories (sp1024 / sp8192); TOK_DIR: the tokenizers directory.
# ROWs: names from the list below or `baseline` (default: all); the baseline runs only if BASELINE is set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-results/ablation_logs}
SEEDS=${SEEDS:-"1337 42"}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
mkdir -p "$OUT_DIR"

SP1024="DATA_PATH=$DATA_1024 TOKENIZER_PATH=$TOK_DIR/fineweb_1024_bpe.model VOCAB_SIZE=1024"
OPT="MUON_NS=polar MUON_ROW_NORM=1 MUON_WD=0.085 MIN_LR_FRAC=0.05"
SHAPE="ROPE_DIMS=16 LN_SCALE=1 QK_GAIN_INIT=5"
ARCH="XSA_LAST_N=4 PARALLEL_START=7 RECUR_LAYERS=4,5 SMEAR=1"
EXPORT="GPTQ=1 CLIP_MODE=std BYTE_SHUFFLE=1 COMPRESSOR=best"
# name|environment. Cumulative: each row keeps the previous row's settings and adds one technique.
ROWS=(
  "ours_default|$SP1024"
  "opt_polar_rownorm_wd|$SP1024 $OPT"
  "partial_rope_lnscale_qk5|$SP1024 $OPT $SHAPE"
  "xsa_last4|$SP1024 $OPT $SHAPE XSA_LAST_N=4"
  "parallel_from7|$SP1024 $OPT $SHAPE XSA_LAST_N=4 PARALLEL_START=7"
  "recur_4_5|$SP1024 $OPT $SHAPE XSA_LAST_N=4 PARALLEL_START=7 RECUR_LAYERS=4,5"
  "smeargate|$SP1024 $OPT $SHAPE $ARCH"
  "bigramhash|$SP1024 $OPT $SHAPE $ARCH BIGRAM_BUCKETS=2048"
  "gptq_std_clip|$SP1024 $OPT $SHAPE $ARCH BIGRAM_BUCKETS=2048 $EXPORT"
  "ttt_score_first|$SP1024 $OPT $SHAPE $ARCH BIGRAM_BUCKETS=2048 $EXPORT TTT=1"
  "sp8192_mlp4_embed7|DATA_PATH=${DATA_8192:-} TOKENIZER_PATH=$TOK_DIR/fineweb_8192_bpe.model VOCAB_SIZE=8192 MLP_MULT=4 EMBED_BITS=7 $OPT $SHAPE $ARCH $EXPORT TTT=1"
)

wanted=" ${*:-} "
selected() { [[ "$wanted" == "  " || "$wanted" == *" $1 "* ]]; }
for seed in $SEEDS; do
  if [[ -n "${BASELINE:-}" ]] && selected baseline; then
    env DATA_PATH="$DATA_1024" TOKENIZER_PATH="$TOK_DIR/fineweb_1024_bpe.model" SEED="$seed" RUN_ID="baseline_s$seed" \
      MAX_WALLCLOCK_SECONDS="$TRAIN_SECONDS" VAL_LOSS_EVERY=0 python "$BASELINE" \
      > "$OUT_DIR/baseline_s$seed.txt" 2>&1 || echo "baseline seed $seed failed"
  fi
  for row in "${ROWS[@]}"; do
    name=${row%%|*}
    selected "$name" || continue
    # shellcheck disable=SC2086
    env ${row#*|} SEED="$seed" RUN_ID="${name}_s$seed" MAX_WALLCLOCK_SECONDS="$TRAIN_SECONDS" ARTIFACT_DIR=/tmp/ablation \
      python train_gpt.py > "$OUT_DIR/${name}_s$seed.txt" 2>&1 || echo "$name seed $seed failed (see its log)"
  done
done
python bench/ablation_table.py "$OUT_DIR" > results/ABLATION.md
cat results/ABLATION.md
