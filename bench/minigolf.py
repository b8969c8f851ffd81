#!/usr/bin/env python3
"""Mini-golf: the Parameter Golf challenge scaled down to a 2-core CPU, ours side by side with the official baseline.

    python3 bench/minigolf.py prepare                          # data in bench/.minigolf/ (sp8192 train: ~40 s, once)
    python3 bench/minigolf.py rows                             # the registry of named rows
    python3 bench/minigolf.py run baseline ours --seeds 1337 42 2025
    python3 bench/minigolf.py run ours_time --seeds 1337 --wallclock auto
    python3 bench/minigolf.py table                            # updates results/MINIGOLF.md and its PNG
    python3 bench/minigolf.py sizes ours shape_8x96             # Gaussian-weight size estimate, no training
    python3 bench/minigolf.py run baseline ours --seeds 1 --smoke  # minutes, not hours: checks the harness

The rules, the val cut, the cap and why each setting is what it is: bench/README.md (Mini-golf).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_WORK = REPO / "bench" / ".minigolf"
DEFAULT_RESULTS = REPO / "results" / "minigolf" / "runs.jsonl"
LOG_COPIES = REPO / "results" / "minigolf" / "logs"
TABLE_DOC = REPO / "results" / "MINIGOLF.md"
TABLE_BEGIN, TABLE_END = "<!-- minigolf-table:begin -->", "<!-- minigolf-table:end -->"
PAIRED_BEGIN, PAIRED_END = "<!-- minigolf-paired:begin -->", "<!-- minigolf-paired:end -->"
PARITY_BEGIN, PARITY_END = "<!-- minigolf-parity:begin -->", "<!-- minigolf-parity:end -->"
REGIME_BEGIN, REGIME_END = "<!-- minigolf-regime:begin -->", "<!-- minigolf-regime:end -->"
STANDINGS_BEGIN, STANDINGS_END = "<!-- minigolf-standings:begin -->", "<!-- minigolf-standings:end -->"
FIGURE = REPO / "results" / "minigolf" / "standings.png"

CAP = 1_000_000
LIMIT_LINE = "SIZE_LIMIT = 16_000_000"
# The largest number of whole sp1024 val documents holding at most 500,000 tokens (499,476); the sp8192 cut
# keeps the same documents, so both vocabularies score the same text. Their byte counts still differ: by the
# official metric (train_gpt.build_byte_tables) the 713 documents are 1,267,741 bytes under sp1024 and 1,269,848
# under sp8192 (+0.17%), because sp1024 maps some characters to <unk>, which counts 0 bytes. The same total loss
# thus scores 0.17% higher in bits per byte under sp1024 (~0.0035 at 2.1): a comparison across vocabularies
# carries that much in sp8192's favour.
VAL_DOCS, VAL_TOKEN_BUDGET = 713, 500_000
SMOKE_VAL_DOCS = 40
SMOKE_ITERATIONS = 8
BOS = 1
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
LOG_COPY_MAX_BYTES = 64_000  # stdout without the embedded source; anything bigger stays in the work folder
# The caseops pair: a plain and a CaseOps sp8192 BPE trained the same way (data/prepare.py: byte fallback, identity
# normalisation) on the proxy's training documents, so the transform is the only difference (the official sp8192
# was trained on FineWeb, not like for like). Both val cuts are the same documents: the same UTF-8 bytes, which the
# plain run counts from its pieces and the CaseOps run from its byte sidecar (each run's val_data line says so).
PROXY_TRAINED = {"proxy8192": [], "proxy8192_caseops": ["--caseops"]}
VOCABS = {"sp1024": 1024, "sp8192": 8192, "proxy8192": 8192, "proxy8192_caseops": 8192}

# The starting shape, applied to both scripts (same variable names in both).
SHAPE = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=512, TRAIN_BATCH_TOKENS=8192,
             ITERATIONS=600, WARMDOWN_FRAC=1 / 3, MUON_MOMENTUM_WARMUP_STEPS=100, VAL_LOSS_EVERY=0,
             MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=50)
# `regime`: the records' training regime, ~100 tokens per weight (the #2135 run: 5,001 steps of 786,432 tokens on
# 35,945,673 weights, 109 per weight; `mini` trains ~4-7). Width 64 (head 16) on sp1024, where the embedding is a
# quarter of the weights instead of most of them: ours' form has 247,525 weights, and 3,000 steps of 8,192 tokens
# are 99 tokens per weight. A run costs its tokens (~18-23 k a second here at any width from 48 to 64, so fewer,
# larger steps do not help): sequences of 256 tokens, the records' 4 tokens of context per unit of width (2,048 at
# 512), score 22.5 k a second against 18 k at 512, which brings 3,000 steps to ~18 minutes (bench/README.md).
# Scoring keeps mini's proportions (context = training context, stride half of it). The warm-down and momentum
# warm-up keep mini's shares of the run (1/3, 1/6). Its cap binds like 16 MB does: the #2135 artifact's 15,947,490
# bytes over its weights is 0.4437 bytes a weight, 109,816 bytes for ours' form, plus 40,000 for the code (ours
# packs to ~35.6 KB; at full scale code is 0.2% of the cap).
REGIME_CHANGES = dict(MODEL_DIM=64, TRAIN_SEQ_LEN=256, ITERATIONS=3000, MUON_MOMENTUM_WARMUP_STEPS=500,
                      TRAIN_LOG_EVERY=250)
REGIME_EVAL = dict(EVAL_SEQ_LEN=256, EVAL_STRIDE=128)
REGIME_CAP = 109_816 + 40_000


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    env: dict  # both scripts' settings of the shape; they win over a row's own (rows that change them are refused)
    cap: int  # code + model bytes
    data: str | None  # every row's data at this shape (None: each row's own)
    record_env: dict  # the record runner's settings beyond its mini defaults
    eval_env: dict  # our rows' scoring at this shape; a row's own scoring settings win over it


SHAPES = {"mini": Shape("mini", SHAPE, CAP, None, {}, {}),
          # The record at head 16: RoPE on a quarter of the head as at mini (6 of 24), its own EMA 0.9965 (an
          # average over ~285 steps, 9.5% of 3,000, near its 6% at full scale; mini needed 0.985).
          "regime": Shape("regime", {**SHAPE, **REGIME_CHANGES}, REGIME_CAP, "sp1024",
                          dict(REGIME_CHANGES, **REGIME_EVAL, ROPE_TRAIN_SEQ_LEN=256, VOCAB_SIZE=1024, ROPE_DIMS=4,
                               EMA_DECAY=0.9965), REGIME_EVAL)}


def capped_line(cap: int) -> str:
    return f"SIZE_LIMIT = {cap:_}"


# Ours only; the measured eval costs behind both numbers are in bench/README.md. VAL_BATCH_SIZE changes no score
# (every window is scored exactly once), only speed: 8 windows a batch keep a CPU's caches warm and score the val
# cut in about half the time of 128. EVAL_STRIDE 256 costs two passes more than no sliding; 128 would cost four.
# The default recipe's block indices scaled to 4 blocks (the frontier: XSA in all 11, recurrence of 3 middle
# blocks, parallel lanes in the top 3), and its evaluation scaled like the training: TTT over 713 documents
# instead of 50,000 (prefix ~5% in the records, 200 documents here so the phases see enough) and LoRA rank scaled
# with the width (80 at 512 -> 16 at 128; the update scale is alpha/rank, so its size does not depend on the rank);
# a global TTT step takes 8 rows of 512 tokens (the records' 32,768 tokens are 16 rows of 2,048).
# The evaluation budget stays the script's 570 s: with 300 s a CPU spent half of it compiling and had no time left
# to adapt a single document (ttt_phases, first run).
# The `ours` rows leave TTT off (TTT=0, document-aware scoring instead): on this CPU it adds ~8 minutes of evaluation
# (ttt_phases 503 s, ttt 558 s, against ~35 s) to each row; its gain is measured by the ttt and ttt_phases rows.
# Since the defaults follow the record's full-scale recipe (results/MINIGOLF.md, decision table), the ours rows pin
# what this shape needs: partial RoPE, LN scale and QK gain 5 lost here in both scripts, and the optimizer values
# of before that rule, which the parity rows (ours_fp32_*) measure one at a time against the record's. Momentum is
# the record's 0.97: 0.99 cost both scripts about 0.02 here (parity); the rows run at 0.99 carry the suffix _m099.
MINI_RECIPE = dict(ROPE_DIMS=0, LN_SCALE=0, QK_GAIN_INIT=1.5, MUON_MOMENTUM=0.97, BETA2=0.95, ADAM_WD=0.04,
                   MATRIX_LR=0.025, SCALAR_LR=0.025, TIED_EMBED_LR=0.035)
# The parity rows were measured against ours at momentum 0.99 (the recipe before the momentum pair moved it), so
# that base stays a row of its own and every ours_fp32_X still changes one thing against it.
PARITY_OURS_BASE = dict(MUON_MOMENTUM=0.99)
OURS_BASE = dict(EVAL_SEQ_LEN=512, EVAL_STRIDE=256, VAL_BATCH_SIZE=4096, XSA_LAST_N=4, PARALLEL_START=3,
                 RECUR_LAYERS="1,2", TTT_LORA_RANK=16, TTT_PREFIX_DOCS=200, TTT_GLOBAL_CHUNK_TOKENS=4096,
                 **MINI_RECIPE)
OURS_NO_TTT = dict(TTT=0)
# `plain`: ours before the decision table (the defaults of commit 2ece065), the base of every technique row, so
# each row still measures one change against the same thing after the defaults moved.
PLAIN = dict(MLP_MULT=3, XSA_LAST_N=0, PARALLEL_START=-1, RECUR_LAYERS="", RECUR_START_FRAC=0.5, SMEAR=0,
             SKIP_GATES=0, ATTN_GATE=0, MUON_NS="classic", MUON_ROW_NORM=0, MUON_WD=0.04, MIN_LR_FRAC=0,
             EMA_DECAY=0.997, QAT_BITS_MLP=5, EMBED_BITS=8, QAT_START_FRAC=0.85, LOGIT_SOFTCAP_NEG=0, ROPE_DIMS=0,
             LN_SCALE=0, QK_GAIN_INIT=1.5, GPTQ=0, CLIP_MODE="max", BYTE_SHUFFLE=0, AWQ_GROUP=0, LQER_RANK=0,
             DOC_EVAL=0, TTT=0, ORTHO_INIT=0, SCALAR_WD=0, ASYM_LOGIT=0, DOC_ATTENTION=0, GPTQ_EMBED=0)
TIME_ITERATIONS = 1_000_000  # equal-wall-clock rows stop on the clock, never on the step count
# The #1855 record's own code, run by ../shared/anchors/record_mini.sh (which sets the same shape as SHAPE with
# SP8192 and scales its block indices to 4 blocks), in fp32: on a CPU without native bf16 its bf16 weights make a
# run take hours, and both sides of the comparison then run the same precision (`ours_fp32`: COMPILE=0 is eager
# fp32 on a CPU). Its EMA has no warm-up: at 0.9965 it would export weights ~285 steps old, half of this run (the
# record's 0.9965 spans ~6% of its full-scale run), so it takes 0.985, the decay ours reaches at step 600. The
# runner sets only the shape; the switches below are the record's own run command (its README), less its
# CaseOps tokenizer (the proxy is plain sp8192), its `pergroup` compressor (needs lrzip; bytes only) and its TTT.
# Its scorer leaves out the val sequences past the last whole batch (61 of 701 sequences at its default batch, 9% of
# this cut): with a batch of one sequence only the last partial one is left out, as its loader already cuts it.
RECORD_RUNNER = Path("anchors") / "record_mini.sh"
RECORD_BASE = dict(RECORD_FP32=1, EMA_DECAY=0.985, VAL_BATCH_TOKENS=4096, SMEAR_GATE_ENABLED=1,
                   SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATED_ATTN_QUANT_GATE=1, MIN_LR=0.1,
                   BETA2=0.99, EMBED_BITS=7, MLP_CLIP_SIGMAS=11.5, EMBED_CLIP_SIGMAS=14.0)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    about: str
    script: str = "ours"  # "ours", "baseline" or "record"
    budget: str = "steps"  # "steps": ITERATIONS, no wall clock; "time": the baseline's measured train seconds
    data: str = "sp1024"
    env: dict = dataclasses.field(default_factory=dict)
    base: str | None = "plain"  # the row its delta is measured against (and, for "plain", the settings it adds)


def row(name: str, about: str, script: str = "ours", budget: str = "steps", data: str = "sp1024",
        base: str | None = "plain", **env) -> Row:
    return Row(name, about, script, budget, data, {k: str(v) for k, v in env.items()}, base)


_L = SHAPE["NUM_LAYERS"]
GPTQ = dict(GPTQ=1, CLIP_MODE="std", BYTE_SHUFFLE=1, GPTQ_RESERVE_SECONDS=6)
# At dim 128 the 8192-row embedding alone (1.05 M weights) would overrun the cap: every sp8192 row (the default
# vocabulary, so `ours` too) takes dim 96 and a 6-bit embedding.
SP8192 = dict(data="sp8192", MODEL_DIM=96, EMBED_BITS=6)
SP8192_FIT = ("MODEL_DIM", "EMBED_BITS")
# Each difference between the record's run and ours that both scripts can express, measured in both: `record_X` is
# the record with our value (base `record`), `ours_fp32_X` ours with the record's (base `ours_fp32_m099`), largest
# expected effect first: (name, what ours has, the record's settings for it, ours' settings for the record's value).
PARITY = (
    ("rope_ln_qk", "whole-head RoPE, no LN scale, QK gain 1.5", dict(ROPE_DIMS=0, LN_SCALE=0, QK_GAIN_INIT=1.5),
     dict(ROPE_DIMS=6, LN_SCALE=1, QK_GAIN_INIT=5)),
    ("momentum", "Muon momentum 0.99 (record 0.97)", dict(MUON_MOMENTUM=0.99), dict(MUON_MOMENTUM=0.97)),
    ("lr_floor", "LR floor 0 (record 0.1, clipped; ours 0.1, linear to it)", dict(MIN_LR=0), dict(MIN_LR_FRAC=0)),
    ("beta2", "Adam beta2 0.95 (record 0.99)", dict(BETA2=0.95), dict(BETA2=0.99)),
    ("lrs", "LRs matrix 0.025, scalar 0.025, tied embedding 0.035 (record 0.026, 0.02, 0.03)",
     dict(MATRIX_LR=0.025, SCALAR_LR=0.025, TIED_EMBED_LR=0.035),
     dict(MATRIX_LR=0.026, SCALAR_LR=0.02, TIED_EMBED_LR=0.03)),
    ("embed_wd", "embedding weight decay 0.04 (record 0.085)", dict(EMBED_WD=0.04), dict(ADAM_WD=0.085)),
    ("gptq_calib", "GPTQ calibration 32 batches (record 16)", dict(GPTQ_CALIBRATION_BATCHES=32),
     dict(GPTQ_CALIB_BATCHES=16)),
)


def parity_rows() -> list[Row]:
    rows = []
    for name, ours_has, record_env, ours_env in PARITY:
        rows.append(row(f"record_{name}", f"record, {name} as ours: {ours_has}", script="record", data="sp8192",
                        base="record", **record_env))
        rows.append(row(f"ours_fp32_{name}", f"ours_fp32_m099, {name} as the record's (ours: {ours_has})",
                        base="ours_fp32_m099", **SP8192, COMPILE=0, WARMUP_STEPS=0, **{**PARITY_OURS_BASE, **ours_env}))
    return rows


# One line per row; technique rows are `plain` plus one change (export rows: plus GPTQ, which they need).
ROWS = {r.name: r for r in (
    row("baseline", "official baseline (CPU copy): MLP 2x, int8+zlib, equal steps", script="baseline", base=None),
    row("ours", "our recipe at the mini shape (defaults + MINI_RECIPE), sp8192, dim 96, int6 embedding",
        base=None, **SP8192),
    row("ours_fp32", "ours in eager fp32 (COMPILE=0), the precision of the record rows", base="record", **SP8192,
        COMPILE=0, WARMUP_STEPS=0),
    row("ours_fp32_m099", "ours_fp32 at Muon momentum 0.99: the base of the parity rows", base="record", **SP8192,
        COMPILE=0, WARMUP_STEPS=0, **PARITY_OURS_BASE),
    row("record", "the #1855 record's own code at the mini shape, fp32, TTT off", script="record", data="sp8192",
        base=None),
    *parity_rows(),
    row("ours_time", "ours, training wall clock = the baseline's measured train seconds", budget="time", base="ours",
        **SP8192),
    row("plain", "ours before the decision table: every technique below off, MLP 3x", base=None),
    row("optim", "+ Polar Express NS, MuonEq-R, Muon WD 0.095, LR floor 0.1",
        MUON_NS="polar", MUON_ROW_NORM=1, MIN_LR_FRAC=0.1, MUON_WD=0.095),
    row("rope_ln_qk", "+ partial RoPE (8 of 32 dims), LN scale, QK gain 5", ROPE_DIMS=8, LN_SCALE=1, QK_GAIN_INIT=5),
    row("rope_ln", "+ partial RoPE (8 of 32 dims), LN scale (the pair measured together in the records)",
        ROPE_DIMS=8, LN_SCALE=1),
    row("rope", "+ partial RoPE (8 of 32 dims)", ROPE_DIMS=8),
    row("ln_scale", "+ LN scale 1/sqrt(layer+1)", LN_SCALE=1),
    row("qk_gain5", "+ QK gain 5", QK_GAIN_INIT=5),
    row("xsa", f"+ XSA in all {_L} blocks", XSA_LAST_N=_L),
    row("parallel", f"+ parallel attention/MLP from block {_L // 2}", PARALLEL_START=_L // 2),
    # One repeat of the span (2 passes), as the records' first recurrence (#1204); the default is #1855's 3 passes.
    row("recur", "+ depth recurrence of blocks 1,2 from 35% of training", RECUR_LAYERS="1,2", RECUR_START_FRAC=0.35,
        RECUR_PASSES=2),
    row("smear", "+ SmearGate (BOS-masked)", SMEAR=1),
    row("bigram", "+ BigramHash, 2048 buckets x 64", BIGRAM_BUCKETS=2048, BIGRAM_DIM=64),
    row("skip_gates", "+ sigmoid-gated U-Net skips", SKIP_GATES=1),
    row("attn_gate", "+ per-head attention output gate", ATTN_GATE=1),
    row("softcap_neg", "+ asymmetric soft-cap: negative logits capped at 20", LOGIT_SOFTCAP_NEG=20),
    row("seq_growth", "+ training context 256 -> 512 at 40% of training", TRAIN_SEQ_SCHEDULE="256@0,512@0.4"),
    row("no_qat", "- QAT (the frontier trains without it)", QAT_START_FRAC=1.0),
    row("qat_bits", "+ int6 MLP (QAT and export) instead of int5", QAT_BITS_MLP=6),
    row("embed7", "+ int7 embedding instead of int8", EMBED_BITS=7),
    # 6 s is the official 12 s reserve scaled by 300/600 (mini train seconds / official); only a wall clock uses it.
    row("gptq", "+ full-Hessian GPTQ (32 batches), std clip, byte-shuffle", **GPTQ),
    row("awq", "+ GPTQ + AWQ salient 64-column group at 8 bits", **GPTQ, AWQ_GROUP=1),
    row("lqer", "+ GPTQ + LQER rank 4 on the 3 worst matrices", **GPTQ, LQER_RANK=4, LQER_TENSORS=3),
    row("doc_eval", "+ document-aware scoring (stride 256 inside long documents)", DOC_EVAL=1),
    row("eval_ctx", "+ evaluation context 1024 (trained at 512)", EVAL_SEQ_LEN=1024, EVAL_STRIDE=512),
    row("ttt", "+ score-first LoRA TTT per document (rank 16, chunks of 48), no phases", TTT=1, TTT_PHASES=0),
    row("ttt_phases", "+ LoRA TTT with 3 global SGD phases over the first 200 documents", TTT=1, TTT_PHASES=3),
    row("ttt_short_chunks", "ttt_phases + the #2014 chunks for short documents (8 up to 256 tokens, 24 up to 2,000)",
        base="ttt_phases", TTT=1, TTT_PHASES=3, TTT_SHORT_CHUNKS="256:8,2000:24"),
    # The other side of changes the records measured at full scale (bench/calibration.py, results/calibration.json).
    row("qk_gain4", "+ QK gain 4 (the base of the records' 4 -> 5)", QK_GAIN_INIT=4),
    row("recur_always", "+ depth recurrence of blocks 1,2 from the start", RECUR_LAYERS="1,2", RECUR_START_FRAC=0,
        RECUR_PASSES=2),
    row("row_norm", "+ MuonEq-R (row-normalised Muon updates)", MUON_ROW_NORM=1),
    row("momentum099", "- Muon momentum 0.97, 0.99 instead", MUON_MOMENTUM=0.99),
    row("no_ema", "- EMA of the weights (EMA_DECAY=0)", EMA_DECAY=0),
    row("matrix_lr04", "matrix LR 0.04 instead of 0.025", MATRIX_LR=0.04),
    row("no_clip_search", "- the per-row clip search (round at the row maximum)", CLIP_SEARCH=0),
    row("no_sliding", "- sliding-window scoring (non-overlapping windows)", EVAL_STRIDE=0),
    row("sp8192", "sp8192 data, dim 96, int6 embedding", **SP8192),
    row("proxy8192", "ours on an sp8192 BPE trained on the proxy's training documents (caseops' base)", base="ours",
        **{**SP8192, "data": "proxy8192"}),
    row("caseops", "ours on the same BPE trained on CaseOps text (BPB from the byte sidecar)", base="proxy8192",
        **{**SP8192, "data": "proxy8192_caseops"}),
    # The best shape under the cap, on top of the recipe (`sizes` estimates the bytes; block indices rescaled).
    row("shape_6x96", "ours with 6 layers", base="ours", **SP8192, NUM_LAYERS=6,
        XSA_LAST_N=6, PARALLEL_START=4, RECUR_LAYERS="2,3"),
    row("shape_8x96", "ours with 8 layers", base="ours", **SP8192, NUM_LAYERS=8,
        XSA_LAST_N=8, PARALLEL_START=5, RECUR_LAYERS="3,4"),
    # seq_growth was at the edge of the noise against `plain`; this measures it where the default would change.
    row("ours_seq_growth", "ours + training context 256 -> 512 at 40% of training", base="ours", **SP8192,
        TRAIN_SEQ_SCHEDULE="256@0,512@0.4"),
)}


class HarnessError(Exception):
    """Reported as one `error: ...` line, exit status 2."""


# Where ours stands: the rows that open results/MINIGOLF.md. `ours_fp32` is ours in the record's precision (eager
# fp32), so it is the row to read against `record`; `ours` is the default as a user runs it (compiled).
STANDINGS = ("ours", "ours_fp32", "record", "baseline")


# ------------------------------------------------------------------------------------------ shards and the val cut


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, "<i4", HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise HarnessError(f"{path} is not a shard (bad header)")
    if path.stat().st_size != 4 * HEADER_INTS + 2 * int(header[2]):
        raise HarnessError(f"{path}: size does not match its header's token count {header[2]}")
    return np.fromfile(path, "<u2", offset=4 * HEADER_INTS)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # runs started side by side each write their own
    tmp.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    tmp.replace(path)


def doc_ends(tokens: np.ndarray) -> np.ndarray:
    """End offset (exclusive) of each document; every document starts with BOS."""
    if tokens.size == 0 or tokens[0] != BOS:
        raise HarnessError("the val shard does not start with BOS, so it cannot be cut at documents")
    starts = np.flatnonzero(tokens == BOS)
    return np.append(starts[1:], tokens.size)


def whole_docs_within(tokens: np.ndarray, max_tokens: int) -> int:
    """How many leading whole documents fit in max_tokens."""
    return int(np.searchsorted(doc_ends(tokens), max_tokens, side="right"))


def cut_docs(tokens: np.ndarray, n_docs: int) -> np.ndarray:
    """The first n_docs whole documents."""
    ends = doc_ends(tokens)
    if not 0 < n_docs <= ends.size:
        raise HarnessError(f"cannot keep {n_docs} documents of a split that has {ends.size}")
    return tokens[:ends[n_docs - 1]]


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ data in the work folder


def need_shared(shared: Path) -> Path:
    if not (shared / "data" / "proxy" / "sp1024").is_dir() or not (shared / "anchors").is_dir():
        raise HarnessError(f"{shared} (the shared proxy data and anchors) not found; pass --shared DIR")
    return shared


def data_dir(work: Path, variant: str, smoke: bool) -> Path:
    return work / (f"{variant}_smoke" if smoke else variant)


def tokenizer(shared: Path, variant: str) -> Path:
    return shared / "tokenizers" / f"fineweb_{VOCABS[variant]}_bpe.model"


def run_prepare(shared: Path, out: Path, threads: int, *options: str) -> None:
    """data/prepare.py on the proxy's documents, its 2,500 val documents first, into `out`."""
    proxy = shared / "data" / "proxy"
    cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(proxy / "docs_val.jsonl.gz"),
           str(proxy / "docs_train.jsonl.gz"), "--val-docs", "2500", *options, "--out", str(out),
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"data/prepare.py failed: {last_line(done.stderr + done.stdout)}")


def build_sp8192_train(shared: Path, work: Path, threads: int) -> list[Path]:
    """The sp8192 train shard is not shipped; data/prepare.py rebuilds it once from the documents. Its val shard must
    come out byte-identical to the shipped one, or the two would not be the same split."""
    out, shipped = work / "sp8192_build", shared / "data" / "proxy" / "sp8192" / "fineweb_val_000000.bin"
    if not sorted(out.glob("fineweb_train_*.bin")) or not (out / "manifest.json").exists():
        print(f"building the sp8192 train shard in {out} (about 40 s, once)", flush=True)
        run_prepare(shared, out, threads, "--tokenizer", str(tokenizer(shared, "sp8192")))
    if (out / "fineweb_val_000000.bin").read_bytes() != shipped.read_bytes():
        raise HarnessError(f"{out}/fineweb_val_000000.bin differs from {shipped}: delete {out} and rerun prepare")
    return sorted(out.glob("fineweb_train_*.bin"))


def build_proxy_trained(shared: Path, work: Path, variant: str, threads: int) -> Path:
    """The proxy with a tokenizer trained on its training documents (plain or CaseOps), built once by
    data/prepare.py; its val split is the proxy's 2,500 val documents, as the shipped shards'."""
    out = work / f"{variant}_build"
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        print(f"building {variant} in {out} (a tokenizer trained on the proxy's training documents; minutes, once)",
              flush=True)
        run_prepare(shared, out, threads, "--vocab-size", str(VOCABS[variant]), *PROXY_TRAINED[variant])
    return out


def ensure_data(shared: Path, work: Path, variant: str, smoke: bool, threads: int) -> dict:
    """Cut val shard + links to the train shards, rewritten each time (cheap) so the folder always matches the rules."""
    folder = data_dir(work, variant, smoke)
    folder.mkdir(parents=True, exist_ok=True)
    proxy = shared / "data" / "proxy"
    built = build_proxy_trained(shared, work, variant, threads) if variant in PROXY_TRAINED else None
    if built:
        train = sorted(built.glob("fineweb_train_[0-9]*.bin"))
    else:
        train = (sorted((proxy / "sp1024").glob("fineweb_train_*.bin")) if variant == "sp1024"
                 else build_sp8192_train(shared, work, threads))
    if not train:
        raise HarnessError(f"no {variant} train shard found")
    names = {shard.name for shard in train}
    for old in folder.glob("fineweb_train_*.bin"):
        if old.name not in names:
            old.unlink()
    for shard in train:  # swapped in whole, so a run started beside this one never sees a shard missing
        link = folder / f"{shard.name}.{os.getpid()}.tmp"
        link.symlink_to(shard.resolve())
        link.replace(folder / shard.name)
    full = read_shard((built or proxy / variant) / "fineweb_val_000000.bin")
    if variant == "sp1024" and whole_docs_within(full, VAL_TOKEN_BUDGET) != VAL_DOCS:
        raise HarnessError(f"the proxy val split changed: {whole_docs_within(full, VAL_TOKEN_BUDGET)} whole documents "
                           f"fit in {VAL_TOKEN_BUDGET:,} sp1024 tokens, VAL_DOCS says {VAL_DOCS}")
    val = cut_docs(full, SMOKE_VAL_DOCS if smoke else VAL_DOCS)
    write_shard(folder / "fineweb_val_000000.bin", val)
    if built:  # the tokenizer travels with the data; a sidecar is cut with the val shard it parallels
        tok = folder / f"tokenizer.model.{os.getpid()}.tmp"
        shutil.copyfile(built / "tokenizer.model", tok)
        tok.replace(folder / "tokenizer.model")
        if (built / "fineweb_val_bytes_000000.bin").exists():
            write_shard(folder / "fineweb_val_bytes_000000.bin",
                        read_shard(built / "fineweb_val_bytes_000000.bin")[:val.size])
    return dict(variant=variant, smoke=smoke, path=str(folder), val_docs=SMOKE_VAL_DOCS if smoke else VAL_DOCS,
                val_tokens=int(val.size), val_sha16=sha16(folder / "fineweb_val_000000.bin"),
                train_tokens=int(sum((s.stat().st_size - 4 * HEADER_INTS) // 2 for s in train)))


# ------------------------------------------------------------------------------------------ the two scripts


def cap_source(source: str, cap: int = CAP) -> str:
    """train_gpt.py with a shape's size limit: its prune-to-fit and oversize check then work against `cap`."""
    pattern = re.compile(rf"^{re.escape(LIMIT_LINE)}$", re.M)
    capped, count = pattern.subn(capped_line(cap), source)
    if count != 1:
        raise HarnessError(f"expected exactly one line '{LIMIT_LINE}' in train_gpt.py, found {count}")
    return capped


def results_file(shape: Shape, base: Path = DEFAULT_RESULTS) -> Path:
    """A shape's results beside mini's (`base`), its name prefixed by the shape's: regime_runs.jsonl."""
    return base if shape.name == "mini" else base.with_name(f"{shape.name}_{base.name}")


def capped_copy(work: Path, shape: Shape, packed: bool = False) -> Path:
    suffix = "" if shape.name == "mini" else f"_{shape.name}"
    return work / "code" / f"train_gpt_{'packed' if packed else 'capped'}{suffix}.py"


def prepare_ours(work: Path, pack: bool, shape: Shape = SHAPES["mini"]) -> Path:
    capped = capped_copy(work, shape)
    capped.parent.mkdir(parents=True, exist_ok=True)
    capped.write_text(cap_source((REPO / "train_gpt.py").read_text(encoding="utf-8"), shape.cap), encoding="utf-8")
    if not pack:
        return capped
    packer = REPO / "tools" / "pack_code.py"
    if not packer.exists():
        raise HarnessError("tools/pack_code.py not found: pass --no-pack to run the unpacked copy")
    packed = capped_copy(work, shape, packed=True)
    done = subprocess.run([sys.executable, str(packer), str(capped), "-o", str(packed)], capture_output=True, text=True)
    if done.returncode != 0 or not packed.exists():
        raise HarnessError(f"tools/pack_code.py failed: {last_line(done.stderr + done.stdout)}")
    return packed


def prepare_baseline(shared: Path, work: Path) -> Path:
    code = work / "code"
    code.mkdir(parents=True, exist_ok=True)
    out = code / "baseline_cpu.py"
    done = subprocess.run([sys.executable, str(shared / "anchors" / "cpu_baseline.py"),
                           str(shared / "anchors" / "official_baseline_train_gpt.py"), str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"cpu_baseline.py failed: {last_line(done.stderr + done.stdout)}")
    return out


def prepare_record(shared: Path) -> Path:
    """The record runner; it writes the record's CPU copy into each run's folder itself."""
    runner = shared / RECORD_RUNNER
    if not runner.is_file():
        raise HarnessError(f"{runner} not found: the record rows need ../shared/anchors (pass --shared DIR)")
    try:
        import brotli  # noqa: F401  (the record compresses its artifact with it)
    except ImportError:
        raise HarnessError("the record rows need brotli: pip install brotli (requirements-dev.txt)") from None
    return runner


def setting_names(shared: Path | None) -> set[str]:
    """Every environment variable any of the scripts reads as a setting, so none leaks in from the caller's shell."""
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    block = source[source.index("class Hyperparameters"):source.index("def from_env")]
    names = {m.upper() for m in re.findall(r"^    (\w+): \w+ = ", block, re.M)}
    for anchor in ("official_baseline_train_gpt.py", "record_1855_train_gpt.py"):
        path = shared / "anchors" / anchor if shared else None
        if path and path.exists():
            names |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', path.read_text(encoding="utf-8")))
    return names - {"RANK", "WORLD_SIZE", "LOCAL_RANK"}


# ------------------------------------------------------------------------------------------ plan


def schedule(rows: list[Row], seeds: list[int]) -> list[tuple[Row, int]]:
    """Seed by seed, baseline rows first: machine noise then hits every row of a seed alike, and an equal-wall-clock
    row of a seed can use the baseline time measured just before it."""
    ordered = [r for r in rows if r.script == "baseline"] + [r for r in rows if r.script != "baseline"]
    return [(r, seed) for seed in seeds for r in ordered]


def ours_settings(r: Row) -> dict:
    base = PLAIN if r.name == "plain" or r.base == "plain" else OURS_NO_TTT
    return {k: str(v) for k, v in {**OURS_BASE, **base}.items()}


def shape_refusal(r: Row, shape: Shape) -> str | None:
    """Why a row cannot run at a shape with data of its own: a row whose point is its data (it differs from its
    base's) or its size (it sets a shape setting other than the width its vocabulary needs) means nothing there."""
    if shape.data is None:
        return None
    base = ROWS.get(r.base) if r.base else None
    if base and base.data != r.data:
        return f"{r.name} changes the data ({base.data} -> {r.data}), and every row at {shape.name} runs on {shape.data}"
    sized = sorted(set(r.env) & set(SHAPE) - {"MODEL_DIM"})
    if sized:
        return f"{r.name} sets {', '.join(sized)}, which {shape.name} fixes"
    return None


def row_env(r: Row, seed: int, run_id: str, data: Path, shared: Path, threads: int, compile_: int,
            warmup: int, smoke: bool, iterations: int | None, wallclock: float | None,
            shape: Shape = SHAPES["mini"]) -> dict:
    variant = shape.data or r.data
    if r.script == "record":  # the runner sets the shape, data, seed and run id itself; the rest overrides it
        env = {k: str(v) for k, v in {**RECORD_BASE, **shape.record_env}.items()}
        if shape.data:
            env.update(TOKENIZER_PATH=str(tokenizer(shared, variant)))
    else:
        env = {k: str(v) for k, v in SHAPE.items()}
        if r.script == "ours":
            env.update(ours_settings(r), COMPILE=str(compile_))
        tok = data / "tokenizer.model" if variant in PROXY_TRAINED else tokenizer(shared, variant)
        env.update(WARMUP_STEPS=str(warmup), DATA_PATH=str(data), TOKENIZER_PATH=str(tok),
                   VOCAB_SIZE=str(VOCABS[variant]), RUN_ID=run_id, SEED=str(seed))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if r.script != "record":
        env.update({k: str(v) for k, v in shape.eval_env.items()})
    env.update(r.env)
    if shape.data and r.script != "record":  # the shape's size wins over what a row's own vocabulary needed
        if r.data != shape.data:
            for k in SP8192_FIT:
                env.pop(k, None)
        env.update({k: str(v) for k, v in shape.env.items()})
        if "ROPE_DIMS" in r.env:  # a row's partial RoPE is a share of the head (8 of 32 at mini: 4 of 16 at regime)
            env["ROPE_DIMS"] = str(int(r.env["ROPE_DIMS"]) * shape.env["MODEL_DIM"] // SHAPE["MODEL_DIM"])
    if smoke:
        n = iterations or SMOKE_ITERATIONS
        env.update(ITERATIONS=str(n),
                   MUON_MOMENTUM_WARMUP_STEPS=str(max(1, n // 6)), TRAIN_LOG_EVERY="1")  # every step: the last too
    if r.budget == "time":
        env.update(ITERATIONS=str(TIME_ITERATIONS), MAX_WALLCLOCK_SECONDS=f"{wallclock:.1f}")
    return env


# ------------------------------------------------------------------------------------------ log parsers


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _pairs(line: str) -> dict:
    return dict(tok.split(":", 1) for tok in line.split() if ":" in tok)


def _last(text: str, prefix: str) -> dict | None:
    found = [line for line in text.splitlines() if line.startswith(prefix + " ")]
    return _pairs(found[-1]) if found else None


PARSED = ("val_bpb", "val_loss", "bytes_code", "bytes_model", "bytes_total", "steps", "train_s", "eval_s", "val_tokens",
          "val_sha256")


def last_ints(text: str, **patterns: str) -> dict:
    """For each key, the integer its pattern's group captures on the last matching line (absent if none)."""
    return {key: int(found[-1]) for key, pattern in patterns.items() if (found := re.findall(pattern, text, re.M))}


def _ms(value: str | None) -> float | None:
    return None if value is None else float(value.removesuffix("ms")) / 1000


def parse_ours(text: str) -> dict:
    """Score and bytes from `final_submission` (the reloaded artifact's score); bytes also from `artifact`, which an
    oversize run still logs before it stops."""
    out = dict.fromkeys(PARSED)
    if art := _last(text, "artifact"):
        out.update({k: int(art[k]) for k in ("bytes_code", "bytes_model", "bytes_total")})
    if done := _last(text, "train_done"):
        out.update(steps=int(done["step"]), train_s=_ms(done["train_time"]))
    if comp := _last(text, "compliance"):
        out.update(val_tokens=int(comp["val_tokens"]), val_sha256=comp["val_sha256"])
    if final := _last(text, "final_submission"):
        out.update(val_bpb=float(final["val_bpb"]), val_loss=float(final["val_loss"]),
                   train_s=_ms(final["train_time_ms"]), eval_s=_ms(final["eval_time_ms"]),
                   **{k: int(final[k]) for k in ("bytes_code", "bytes_model", "bytes_total")})
    return out


def parse_baseline(text: str) -> dict:
    """The baseline's score is `final_int8_zlib_roundtrip_exact` (its reloaded int8+zlib artifact); its last
    `step:N/M ...` line carries the training time (the final pre-export validation excluded)."""
    out = dict.fromkeys(PARSED)
    steps = re.findall(r"^step:(\d+)/\d+ .*?train_time:(\d+)ms", text, re.M)
    if steps:
        out.update(steps=int(steps[-1][0]), train_s=int(steps[-1][1]) / 1000)
    out.update(last_ints(text, bytes_model=r"^Serialized model int8\+zlib: (\d+) bytes",
                         bytes_code=r"^Code size: (\d+) bytes",
                         bytes_total=r"^Total submission size int8\+zlib: (\d+) bytes",
                         val_tokens=r"^val_loader:.* tokens:(\d+)"))
    if final := _last(text, "final_int8_zlib_roundtrip_exact"):
        out.update(val_bpb=float(final["val_bpb"]), val_loss=float(final["val_loss"]))
    if rt := _last(text, "final_int8_zlib_roundtrip"):
        out["eval_s"] = _ms(rt.get("eval_time"))
    return out


def parse_record(text: str) -> dict:
    """The record's score with TTT off is its own `diagnostic quantized` line (the reloaded artifact, each document
    scored alone); its train seconds come from the last step line's tokens per second (finer than its minutes)."""
    out = dict.fromkeys(PARSED)
    steps = re.findall(r"^(\d+)/\d+ train_loss: \S+ train_time: \S+ tok/s: (\d+)", text, re.M)
    batch = re.findall(r"^\s*train_batch_tokens: (\d+)", text, re.M)
    if steps and batch:
        out.update(steps=int(steps[-1][0]), train_s=int(steps[-1][0]) * int(batch[-1]) / int(steps[-1][1]))
    out.update(last_ints(text, bytes_model=r"^Serialized model quantized\+\w+: (\d+) bytes",
                         bytes_code=r"^Code size \(compressed\): (\d+) bytes",
                         bytes_total=r"^Total submission size quantized\+\w+: (\d+) bytes",
                         val_tokens=r"^val_tokens: (\d+)"))
    if final := record_eval(text, "diagnostic quantized"):
        out.update(val_loss=final[0], val_bpb=final[1], eval_s=final[2])
    return out


def record_eval(text: str, label: str) -> tuple[float, float, float] | None:
    """(val_loss, val_bpb, seconds) of the record's last `label val_loss:.. val_bpb:.. eval_time:..ms` line."""
    found = re.findall(rf"^{re.escape(label)} val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms", text, re.M)
    return (float(found[-1][0]), float(found[-1][1]), int(found[-1][2]) / 1000) if found else None


PARSERS = dict(ours=parse_ours, baseline=parse_baseline, record=parse_record)


def paired_measures(text: str) -> dict | None:
    """What export and the final scoring mode each do to one run's own model: far less noisy across seeds than the
    score itself, so they resolve export and evaluation rows. None when the log lacks a line (the baseline's)."""
    if (quantized := record_eval(text, "diagnostic quantized")) is not None:
        # The record with TTT off submits `diagnostic quantized`; its gain is the sliding add-on's (cross-document).
        pre, sliding = record_eval(text, "diagnostic pre-quantization post-ema"), record_eval(
            text, "quantized_sliding_window")
        if not (pre and sliding):
            return None
        return dict(pre_export=pre[1], export_penalty=quantized[1] - pre[1], eval_gain=sliding[1] - quantized[1],
                    eval_mode="sliding_xdoc")
    pre, roundtrip, final = (_last(text, key) for key in ("pre_export_exact", "final_roundtrip_exact",
                                                          "final_submission"))
    if not (pre and roundtrip and final):
        return None
    pre_bpb, rt_bpb, final_bpb = (float(line["val_bpb"]) for line in (pre, roundtrip, final))
    mode = (_last(text, "compliance") or {}).get("eval_mode", "sliding")
    return dict(pre_export=pre_bpb, export_penalty=rt_bpb - pre_bpb, eval_gain=final_bpb - rt_bpb, eval_mode=mode)


def error_line(text: str, exit_code: int, parsed: dict) -> str | None:
    errors = [line.strip() for line in text.splitlines() if line.startswith("error: ")]
    if errors:
        return errors[-1]
    if exit_code != 0:
        return last_line(text)
    return None if parsed["val_bpb"] is not None else "no final score line in the output"


# ------------------------------------------------------------------------------------------ running


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    # Hostnames of these VMs are all alike; the boot id tells one sitting on one machine from the next.
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    return dict(cpu=cpu, cores=os.cpu_count(), hostname=socket.gethostname(), boot_id=boot, bf16=cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (train_gpt.py's own test): without it a compiled bf16 run is 12-75x
    slower and compiles in fp32 instead, so results of the two kinds are never compared with each other."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"cannot ask torch whether this CPU has bf16: {last_line(done.stderr)}")
    return done.stdout.strip() == "True"


def cpu_kind(rec: dict) -> str:
    return "native bf16" if rec["machine"]["bf16"] else "no native bf16"


def by_cpu_kind(records: list[dict]) -> dict[str, list[dict]]:
    """Runs of the two kinds of CPU never meet in one comparison: the records split by kind."""
    kinds: dict[str, list[dict]] = {}
    for rec in records:
        kinds.setdefault(cpu_kind(rec), []).append(rec)
    return kinds


def git_state() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    # Only the files that change what runs; the results file itself is written during a sitting.
    dirty = git("status", "--porcelain", "--", "train_gpt.py", "tools/pack_code.py", "bench/minigolf.py")
    return dict(commit=git("rev-parse", "HEAD") or None, dirty=bool(dirty))


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise HarnessError(f"{path}:{i} is not a JSON line") from None
    return records


def baseline_seconds(records: list[dict], host: dict, threads: int) -> float | None:
    """Mean train seconds of the successful baseline runs on this machine at this thread count."""
    seconds = [r["train_s"] for r in records if r.get("row") == "baseline" and r.get("exit_code") == 0
               and r.get("val_bpb") is not None and r.get("machine") == host and r.get("threads") == threads]
    return statistics.fmean(seconds) if seconds else None


def other_cores(action) -> float | None:
    """Cores kept busy by processes other than this one and its children while `action` runs (from /proc/stat
    and this process's child CPU time); None where /proc/stat is not available."""
    def busy_seconds() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    try:
        busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        action()
        return None
    action()
    wall = time.perf_counter() - start
    return max(0.0, (busy_seconds() - busy) - (own_seconds() - own)) / wall if wall > 0 else None


def execute(cmd: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> tuple[int, float]:
    """Run one training process in its own process group, so a timeout stops it and its children and nothing else."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            code = 124
    return code, time.perf_counter() - start


def cmd_run(args: argparse.Namespace) -> int:
    rows, shape = resolve_rows(args.rows), SHAPES[args.shape]
    refused = [why for r in rows if (why := shape_refusal(r, shape))]
    if refused:
        raise HarnessError("; ".join(refused))
    if args.iterations is not None and not args.smoke:
        raise HarnessError("--iterations only goes with --smoke (a shortened run is not a mini-golf result)")
    shared = need_shared(args.shared)
    work = args.work
    results = args.results or (work / "smoke_runs.jsonl" if args.smoke else results_file(shape))
    host, plan = machine(), schedule(rows, args.seeds)
    timed = any(r.budget == "time" for r in rows) and args.wallclock == "auto"
    if timed and not args.dry_run and not any(r.name == "baseline" for r in rows) and \
            baseline_seconds(read_results(results), host, args.threads) is None:
        raise HarnessError(f"no baseline run from this machine in this sitting at {args.threads} threads in "
                           f"{results}: add the `baseline` row or pass --wallclock SECONDS")
    if args.dry_run:
        scripts = dict(ours=capped_copy(work, shape, packed=not args.no_pack),
                       baseline=work / "code" / "baseline_cpu.py", record=shared / RECORD_RUNNER)
    else:
        scripts = {}
        if any(r.script == "ours" for r in rows):
            scripts["ours"] = prepare_ours(work, pack=not args.no_pack, shape=shape)
        if any(r.script == "baseline" for r in rows):
            scripts["baseline"] = prepare_baseline(shared, work)
        if any(r.script == "record" for r in rows):
            scripts["record"] = prepare_record(shared)
        for variant in sorted({shape.data or r.data for r in rows}):
            info = ensure_data(shared, work, variant, args.smoke, args.threads)
            print(f"data {variant}: {info['val_docs']} val docs, {info['val_tokens']:,} val tokens "
                  f"(sha {info['val_sha16']}), {info['train_tokens']:,} train tokens", flush=True)
    inherited = {k: v for k, v in os.environ.items() if k not in setting_names(shared)}
    warmup = args.warmup_steps if args.warmup_steps is not None else (2 if args.compile else 0)
    failed = 0
    for i, (r, seed) in enumerate(plan, 1):
        wallclock = None
        if r.budget == "time":
            wallclock = args.wallclock if args.wallclock != "auto" else baseline_seconds(
                read_results(results), host, args.threads)
            if wallclock is None and not args.dry_run:
                raise HarnessError(f"{r.name} seed {seed}: every baseline run of this sitting failed, so there is no "
                                   f"wall clock to give it; pass --wallclock SECONDS")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_id = f"{r.name}_s{seed}_{stamp}"
        data = data_dir(work, shape.data or r.data, args.smoke)
        env = row_env(r, seed, run_id, data, shared, args.threads, args.compile, warmup, args.smoke, args.iterations,
                      wallclock if wallclock is not None else math.nan, shape)
        cmd = [sys.executable, str(scripts[r.script])]
        if r.script == "record":
            cmd = ["bash", str(scripts["record"]), str(data), str(seed),
                   str(work / "runs" / run_id), *(f"{k}={v}" for k, v in env.items())]
        if args.dry_run:
            shown = " ".join(f"{k}={v}" for k, v in env.items())
            if wallclock is None and r.budget == "time":
                shown = shown.replace("MAX_WALLCLOCK_SECONDS=nan", "MAX_WALLCLOCK_SECONDS=<mean baseline train s>")
            print(f"# [{i}/{len(plan)}] {r.name} seed {seed}\ncd {work / 'runs' / run_id} && env {shown} "
                  f"{' '.join(cmd)}")
            continue
        budget = f"{r.budget}, {wallclock:.1f} s" if wallclock else r.budget
        print(f"[{i}/{len(plan)}] {r.name} seed {seed} ({r.script}, {budget}): "
              f"log {work / 'runs' / run_id / 'output.txt'}", flush=True)
        code = shared / "anchors" / "record_1855_train_gpt.py" if r.script == "record" else scripts[r.script]
        record = run_one(r, seed, cmd, code, work / "runs" / run_id, {**inherited, **env}, env, args, shape)
        record.update(wallclock_s=wallclock, machine=host)
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record["error"]:
            failed += 1
            print(f"    FAILED exit {record['exit_code']}: {record['error']}", flush=True)
        else:
            print(f"    val_bpb {record['val_bpb']:.6f}  bytes {record['bytes_total']:,}"
                  f"{'' if record['fits'] else ' OVER CAP'}  steps {record['steps']}  "
                  f"{record['s_per_step']:.3f} s/step  train {record['train_s']:.1f} s  "
                  f"eval {record['eval_s']:.1f} s  wall {record['wall_s']:.1f} s", flush=True)
    if not args.dry_run:
        print(f"{len(plan) - failed}/{len(plan)} runs recorded in {results}")
    return 1 if failed else 0


def run_one(r: Row, seed: int, cmd: list[str], code: Path, cwd: Path, full_env: dict, env: dict,
            args: argparse.Namespace, shape: Shape) -> dict:
    """Run one row/seed in its own folder and turn its output into a record."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / "output.txt"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # Another job on the two cores can slow every step tenfold (OpenMP threads then wait on each other), so
    # each record says how many cores other processes kept busy while it ran.
    busy_before = other_cores(lambda: time.sleep(1.0))
    if busy_before and busy_before > 0.3:
        print(f"    note: other processes keep {busy_before:.1f} cores busy; timings may be inflated", flush=True)
    ran: list = []
    busy_during = other_cores(lambda: ran.extend(execute(cmd, cwd, full_env, log, args.timeout)))
    exit_code, wall = ran
    if r.script == "record":  # the runner prints a summary; the record's console log is train.log
        log = cwd / "train.log" if (cwd / "train.log").exists() else log
    text = log.read_text(encoding="utf-8", errors="replace")
    parsed = PARSERS[r.script](text)
    record = dict(
        row=r.name, seed=seed, script=r.script, budget=r.budget, data=shape.data or r.data, smoke=args.smoke,
        shape=shape.name,
        val_bpb=parsed["val_bpb"], val_loss=parsed["val_loss"], bytes_code=parsed["bytes_code"],
        bytes_model=parsed["bytes_model"], bytes_total=parsed["bytes_total"],
        fits=None if parsed["bytes_total"] is None else parsed["bytes_total"] <= shape.cap, steps=parsed["steps"],
        s_per_step=parsed["train_s"] / parsed["steps"] if parsed["train_s"] and parsed["steps"] else None,
        train_s=parsed["train_s"], eval_s=parsed["eval_s"], wall_s=round(wall, 1), wallclock_s=None,
        exit_code=exit_code,
        error=f"timeout after {args.timeout:.0f} s" if exit_code == 124 else error_line(text, exit_code, parsed),
        val_tokens=parsed["val_tokens"], val_sha256=parsed["val_sha256"], **git_state(),
        packed=r.script == "ours" and not args.no_pack, code_sha16=sha16(code), date=date, machine=None,
        threads=args.threads, other_cores=None if busy_during is None else round(busy_during, 2),
        run_id=cwd.name, log=str(log), env=env)
    if not args.smoke and log.stat().st_size <= LOG_COPY_MAX_BYTES:
        LOG_COPIES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, LOG_COPIES / f"{cwd.name}.txt")
        record["log"] = str((LOG_COPIES / f"{cwd.name}.txt").relative_to(REPO))
    return record


def resolve_rows(names: list[str]) -> list[Row]:
    if names == ["all"]:
        return list(ROWS.values())
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise HarnessError(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return [ROWS[n] for n in dict.fromkeys(names)]


# ------------------------------------------------------------------------------------------ table


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def standard_error(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def mean_se_text(values: list[float]) -> str:
    se = standard_error(values)
    return f"{statistics.fmean(values):.4f}" + (f" ± {se:.4f}" if se is not None else "")


def scored(runs) -> list[dict]:
    """The runs that finished with a score."""
    return [r for r in runs if r.get("exit_code") == 0 and r.get("val_bpb") is not None]


def delta(values: list[float], reference: list[float]) -> tuple[float, float | None]:
    """Difference of means and its standard error, sqrt(s_a^2/n_a + s_b^2/n_b); None while either side has one run."""
    (m, s), (m_ref, s_ref) = mean_std(values), mean_std(reference)
    if s is None or s_ref is None:
        return m - m_ref, None
    return m - m_ref, math.sqrt(s ** 2 / len(values) + s_ref ** 2 / len(reference))


def paired_delta(runs: list[dict], reference: list[dict]) -> tuple[float, float | None] | None:
    """Mean over the seeds both sides ran of (row − base) and its standard error: a seed's data order and
    initialisation are shared, so this sees a change that the spread across seeds hides. None without a shared seed."""
    def by_seed(rs):
        seeds: dict[int, list[float]] = {}
        for r in rs:
            if r.get("seed") is not None:
                seeds.setdefault(r["seed"], []).append(r["val_bpb"])
        return {k: statistics.fmean(v) for k, v in seeds.items()}
    mine, ref = by_seed(runs), by_seed(reference)
    diffs = [mine[k] - ref[k] for k in mine if k in ref]
    if not diffs:
        return None
    return statistics.fmean(diffs), standard_error(diffs)


def registry_order(name: str) -> tuple[int, str]:
    """Rows in registry order; relabelled rows that the registry no longer has come last, by name."""
    return list(ROWS).index(name) if name in ROWS else len(ROWS), name


def base_of(name: str, records: list[dict]) -> str | None:
    """A registry row's base; a relabelled row (gone from the registry) keeps the base its runs recorded."""
    if name in ROWS:
        return ROWS[name].base
    return next((r["base"] for r in records if r["row"] == name and r.get("base")), None)


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["row"], []).append(rec)
    order = sorted(groups, key=registry_order)
    ok = {n: scored(groups[n]) for n in order}
    scores = {n: [r["val_bpb"] for r in ok[n]] for n in order}
    out = []
    for n in order:
        runs, first = ok[n], groups[n][0]
        line = dict(row=n, script=first["script"], budget=first["budget"], data=first["data"], n=len(runs),
                    failed=len(groups[n]) - len(runs), mean=None, std=None, base=None, vs_base=None, vs_baseline=None,
                    vs_base_seeds=None,
                    bytes_total=None, fits=None, s_per_step=None, train_s=None, eval_s=None)
        if runs:
            line["mean"], line["std"] = mean_std(scores[n])
            line["base"] = base_of(n, groups[n])
            for ref, key in ((line["base"], "vs_base"), ("baseline", "vs_baseline")):
                if ref and ref != n and scores.get(ref):
                    line[key] = delta(scores[n], scores[ref])
            if line["base"] and line["base"] != n and ok.get(line["base"]):
                line["vs_base_seeds"] = paired_delta(runs, ok[line["base"]])
            line["bytes_total"] = max(r["bytes_total"] for r in runs)
            line["fits"] = all(r["fits"] for r in runs)
            for key in ("s_per_step", "train_s", "eval_s"):
                values = [r[key] for r in runs if r.get(key) is not None]
                line[key] = statistics.fmean(values) if values else None
        out.append(line)
    return out


def format_delta(d: tuple[float, float | None] | None) -> str:
    """A (difference, standard error) pair as table text; the error is left out where one side has a single run."""
    return "" if d is None else f"{d[0]:+.4f}" + (f" ± {d[1]:.4f}" if d[1] is not None else "")


def render_table(summary: list[dict], records: list[dict], cap: int = CAP) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = ["| row | script | budget | data | n | val_bpb mean ± std | Δ vs base | Δ vs base, same seeds | Δ vs baseline "
             f"| bytes_total (cap {cap:,}) | s/step | train s | eval s |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        n = f"{s['n']}" + (f" (+{s['failed']} failed)" if s["failed"] else "")
        score = "" if s["mean"] is None else f"{s['mean']:.4f}" + (
            f" ± {s['std']:.4f}" if s["std"] is not None else "")
        size = "" if s["bytes_total"] is None else f"{s['bytes_total']:,}" + ("" if s["fits"] else " OVER")
        lines.append(f"| {s['row']} | {s['script']} | {s['budget']} | {s['data']} | {n} | {score} | "
                     f"{format_delta(s['vs_base'])}{' (' + s['base'] + ')' if s['vs_base'] else ''} | "
                     f"{format_delta(s['vs_base_seeds'])} | {format_delta(s['vs_baseline'])} | {size} | "
                     f"{num(s['s_per_step'], '.3f')} | {num(s['train_s'], '.1f')} | {num(s['eval_s'], '.1f')} |")
    hosts = sorted({f"{r['machine']['cpu']} x{r['machine']['cores']} ({r['machine']['hostname']}), "
                    f"{r['threads']} threads" for r in records})
    lines += ["", "Δ: difference of means ± its standard error (sqrt(s²/n + s_ref²/n_ref)); same seeds: mean of the "
              "seed-by-seed differences ± its standard error (seeds the base also ran); blank noise = one run. "
              "Machines: " + "; ".join(hosts) + "."]
    return "\n".join(lines)


def log_copy(rec: dict) -> str | None:
    path = REPO / rec["log"]
    return path.read_text(encoding="utf-8") if path.is_file() else None


def paired_table(records: list[dict], read_log=log_copy) -> str:
    """Per row: mean ± std over seeds of the paired measures, and their difference from the row's base (runs whose
    log copy is missing are left out)."""
    measures: dict[str, list[dict]] = {}
    for rec in records:
        text = read_log(rec) if rec.get("exit_code") == 0 and rec.get("log") else None
        if text and (m := paired_measures(text)):
            measures.setdefault(rec["row"], []).append(m)

    def signed(x: float) -> str:
        return f"{round(x, 5) + 0.0:+.5f}"  # + 0.0: no "-0.00000" for a difference that rounds to nothing

    def cell(row: str, key: str) -> str:
        m, s = mean_std([x[key] for x in measures[row]])
        return signed(m) + (f" ± {s:.5f}" if s is not None else "")

    def vs_base(row: str, key: str) -> str:
        base = base_of(row, records)
        if not base or base not in measures:
            return ""
        d, noise = delta([x[key] for x in measures[row]], [x[key] for x in measures[base]])
        return signed(d) + (f" ± {noise:.5f}" if noise is not None else "") + f" ({base})"

    lines = ["| row | n | before export | export penalty | Δ penalty vs base | evaluation gain | Δ gain vs base "
             "| final mode |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in sorted(measures, key=registry_order):
        modes = "/".join(sorted({x["eval_mode"] for x in measures[row]}))
        lines.append(f"| {row} | {len(measures[row])} | {cell(row, 'pre_export').lstrip('+')} | "
                     f"{cell(row, 'export_penalty')} | {vs_base(row, 'export_penalty')} | {cell(row, 'eval_gain')} | "
                     f"{vs_base(row, 'eval_gain')} | {modes} |")
    lines += ["", "Export penalty = `final_roundtrip_exact` − `pre_export_exact`; evaluation gain = `final_submission` − "
              "`final_roundtrip_exact` (each run's own log); Δ as in the table above."]
    return "\n".join(lines)


def is_parity_row(name: str) -> bool:
    return name == "record" or name.startswith(("record_", "ours_fp32"))


def parity_table(summary: list[dict]) -> str:
    """Each difference measured in both scripts: the record moved to our value, ours moved to the record's. Where
    one change helps one script and hurts the other, the two implementations differ. A pair run on one seed is read
    by its same-seed difference: against the base's mean it would carry that seed's own offset."""
    lines = {s["row"]: s for s in summary}

    def cell(name: str) -> str:
        s = lines.get(name)
        if not s or s["vs_base"] is None:
            return "not run"
        same = s["vs_base_seeds"]
        return f"{format_delta(s['vs_base'])} (n={s['n']})" + (f"; same seeds {format_delta(same)}" if same else "")

    out = ["| difference (ours' side) | record → ours' value (Δ vs `record`) | ours → the record's value "
           "(Δ vs `ours_fp32_m099`) |", "| --- | --- | --- |",
           f"| all of them: `ours_fp32` against `record` | | {cell('ours_fp32')} |",
           f"| all of them, ours at momentum 0.99: `ours_fp32_m099` against `record` | | {cell('ours_fp32_m099')} |"]
    out += [f"| {name}: {ours_has} | {cell('record_' + name)} | {cell('ours_fp32_' + name)} |"
            for name, ours_has, _, _ in PARITY]
    out += ["", "Δ as in the main table: difference of means ± its standard error; n = runs of the row. A negative "
            "record Δ says our value helps the record; a negative ours Δ says the record's value helps ours."]
    return "\n".join(out)


def standings_table(records: list[dict]) -> str:
    """Ours, the record and the baseline: mean ± standard error over seeds, the deltas between them, and where
    each number came from (seeds, commits, dates)."""
    ok = {name: scored(r for r in records if r["row"] == name) for name in STANDINGS}
    scores = {name: [r["val_bpb"] for r in runs] for name, runs in ok.items()}

    def versus(name: str, ref: str) -> str:
        return format_delta(delta(scores[name], scores[ref])) if name != ref and scores[name] and scores[ref] else ""

    lines = ["| row | what it is | seeds | val_bpb (mean ± SE) | Δ vs baseline | Δ vs record | bytes (largest) "
             "| s/step | commits | dates (UTC) |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name in STANDINGS:
        runs = sorted(ok[name], key=lambda r: r["date"])
        if not runs:
            lines.append(f"| {name} | {ROWS[name].about} | not run | | | | | | | |")
            continue
        size = max(r["bytes_total"] for r in runs)
        commits = ", ".join(dict.fromkeys((r.get("commit") or "?")[:7] for r in runs))
        days = sorted({r["date"][:10] for r in runs})
        lines.append(f"| {name} | {ROWS[name].about} | {', '.join(str(r['seed']) for r in runs)} | {mean_se_text(scores[name])} | "
                     f"{versus(name, 'baseline')} | {versus(name, 'record')} | {size:,}"
                     f"{'' if size <= CAP else ' OVER'} | {statistics.fmean(r['s_per_step'] for r in runs):.3f} | "
                     f"{commits} | {days[0]}{' .. ' + days[-1] if len(days) > 1 else ''} |")
    lines += ["", f"SE: standard error of the mean over seeds (std/√n); Δ: difference of means ± its standard error; "
              f"bytes: code + model, cap {CAP:,} (OVER: above it); s/step: mean over the seeds, CPU seconds. "
              "Every number is computed from `results/minigolf/runs.jsonl` by `python3 bench/minigolf.py table`."]
    return "\n".join(lines)


def plot_standings(summary: list[dict], records: list[dict], path: Path) -> None:
    """The standings (mean ± SE) and every technique row's same-seed delta against its `plain` base (± SE over
    seeds; a single-seed row is drawn hollow, with no bar), as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    techniques = [s for s in summary if s["base"] == "plain" and s["vs_base_seeds"]]
    off_scale = [s for s in techniques if abs(s["vs_base_seeds"][0]) > 0.05]  # sp8192: the vocabulary, not a tweak
    techniques = sorted((s for s in techniques if s not in off_scale), key=lambda s: s["vs_base_seeds"][0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 8.5), gridspec_kw=dict(width_ratios=[1, 1.3]))

    scores = {name: [r["val_bpb"] for r in scored(r for r in records if r["row"] == name)] for name in STANDINGS}
    shown = [name for name in STANDINGS if scores[name]][::-1]
    for y, name in enumerate(shown):
        m, se = statistics.fmean(scores[name]), standard_error(scores[name])
        left.errorbar(m, y, xerr=se, fmt="o", color="C0" if name.startswith("ours") else "C7", capsize=5, ms=7)
        left.annotate(f"{mean_se_text(scores[name])}  (n={len(scores[name])})", (m, y),
                      xytext=(0, 10), textcoords="offset points", ha="center", fontsize=9)
    left.set_yticks(range(len(shown)), shown)
    left.set_ylim(-0.6, len(shown) - 0.4)
    lo, hi = left.get_xlim()
    left.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    left.set_xlabel("val_bpb (lower is better), mean ± standard error over seeds")
    left.set_title("Standings: ours against the record and the baseline")
    left.grid(axis="x", alpha=0.3)

    # A single-seed row has no error of its own: it is read against 2 std of its base's seeds (the decision rule).
    base_std = {s["row"]: s["std"] for s in summary}.get("plain") or 0.0
    for y, s in enumerate(techniques):
        d, se = s["vs_base_seeds"]
        beyond = abs(d) > 2 * (se if se is not None else base_std)
        color = ("C2" if d < 0 else "C3") if beyond else "C7"
        right.errorbar(d, y, xerr=se, fmt="o", color=color, capsize=3, ms=6, mfc=color if se is not None else "white")
    right.set_yticks(range(len(techniques)),
                     [s["row"] + ("" if s["vs_base_seeds"][1] is not None else "  (1 seed)") for s in techniques])
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("Δ val_bpb against `plain`, same seeds: mean ± standard error")
    note = "; ".join(f"{s['row']} {s['vs_base_seeds'][0]:+.4f}" for s in off_scale)
    right.set_title("Technique rows: `plain` + one change. Filled: 3 seeds, ± SE; hollow: one seed\n"
                    f"green/red: a gain/loss beyond 2 SE (one seed: beyond 2 std of plain, {2 * base_std:.4f})"
                    + (f"\noff the scale: {note}" if note else ""), fontsize=10)
    right.margins(x=0.08)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle("Mini-golf: 600 steps on a 2-core CPU, proxy data; from results/minigolf/runs.jsonl", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_section(doc: str, table: str, begin: str = TABLE_BEGIN, end: str = TABLE_END, first: bool = False) -> str:
    """The document with the text between the markers replaced. Markers absent: the block is appended, or with
    `first` put before the first `## ` section."""
    block = f"{begin}\n{table}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if first and "\n## " in doc:
        head, rest = doc.split("\n## ", 1)
        return f"{head}\n{block}\n\n## {rest}"
    return doc.rstrip("\n") + ("\n\n" if doc.strip() else "") + block + "\n"


def cmd_table(args: argparse.Namespace) -> int:
    shape = SHAPES[args.shape]
    results = args.results or results_file(shape)
    records = [r for r in read_results(results) if not r.get("smoke") or args.results]
    if not records:
        raise HarnessError(f"no runs recorded in {results}")
    if shape.name != "mini":
        return regime_table(args, shape, records)
    kinds = by_cpu_kind(records)  # one table of each per kind
    heading = (lambda kind: f"CPU with {kind}:\n\n") if len(kinds) > 1 else (lambda kind: "")
    table = "\n\n".join(heading(k) + render_table(summarize(rs), rs) for k, rs in sorted(kinds.items()))
    paired = "\n\n".join(heading(k) + paired_table(rs) for k, rs in sorted(kinds.items()))
    # Like the standings below, the parity pairs only for a kind of CPU that ran any of them.
    paired_up = {k: rs for k, rs in kinds.items() if any(is_parity_row(r["row"]) for r in rs)} or kinds
    parity_heading = heading if len(paired_up) > 1 else (lambda kind: "")
    parity = "\n\n".join(parity_heading(k) + parity_table(summarize(rs)) for k, rs in sorted(paired_up.items()))
    # The standings (and their figure) per kind of CPU that ran any of their rows: a kind that only ran other rows
    # (a data pair, say) would show an empty table.
    ranked = {k: rs for k, rs in kinds.items() if any(r["row"] in STANDINGS for r in rs)} or kinds
    figures = {k: args.figure if len(ranked) == 1 else args.figure.with_name(
        f"{args.figure.stem}_{k.replace(' ', '_')}{args.figure.suffix}") for k in ranked}
    ranked_heading = heading if len(ranked) > 1 else (lambda kind: "")
    standings = "\n\n".join(
        ranked_heading(k) + f"![standings and technique deltas]({os.path.relpath(figures[k], args.doc.parent)})\n\n"
        + standings_table(rs) for k, rs in sorted(ranked.items()))
    print(standings, table, paired, parity, sep="\n\n")
    if args.write:
        doc = args.doc.read_text(encoding="utf-8") if args.doc.exists() else (
            "# Mini-golf results\n\nThe Parameter Golf rules scaled down to a 2-core CPU (bench/README.md, Mini-golf): "
            f"code + model <= {CAP:,} bytes, proxy data, the official baseline run side by side. Written by "
            "`python3 bench/minigolf.py table` from results/minigolf/runs.jsonl.\n")
        doc = replace_section(doc, standings, STANDINGS_BEGIN, STANDINGS_END, first=True)
        doc = replace_section(replace_section(doc, table), paired, PAIRED_BEGIN, PAIRED_END)
        doc = replace_section(doc, parity, PARITY_BEGIN, PARITY_END)
        args.doc.write_text(doc, encoding="utf-8")
        print(f"updated {args.doc}")
        for k, rs in ranked.items():
            plot_standings(summarize(rs), rs, figures[k])
            print(f"wrote {figures[k]}")
    return 0


def regime_table(args: argparse.Namespace, shape: Shape, records: list[dict]) -> int:
    """A shape other than mini: its rows and paired measures, per kind of CPU, in a section of their own."""
    kinds = by_cpu_kind(records)
    heading = (lambda kind: f"CPU with {kind}:\n\n") if len(kinds) > 1 else (lambda kind: "")
    text = "\n\n".join(heading(k) + render_table(summarize(rs), rs, shape.cap) + "\n\n" + paired_table(rs)
                       for k, rs in sorted(kinds.items()))
    print(text)
    if args.write:
        doc = replace_section(args.doc.read_text(encoding="utf-8"), text, REGIME_BEGIN, REGIME_END)
        args.doc.write_text(doc, encoding="utf-8")
        print(f"updated {args.doc}")
    return 0


# ------------------------------------------------------------------------------------------ rows and sizes


def cmd_rows(args: argparse.Namespace) -> int:
    for r in ROWS.values():
        env = " ".join(f"{k}={v}" for k, v in r.env.items())
        print(f"{r.name:<18} {r.script:<8} {r.budget:<5} {r.data:<6} {r.about}" + (f"\n{'':<40} {env}" if env else ""))
    print(f"\nshape (both scripts): {' '.join(f'{k}={v}' for k, v in SHAPE.items())}")
    for shape in SHAPES.values():
        if shape.data:
            print(f"--shape {shape.name}: every row on {shape.data}, {' '.join(f'{k}={v}' for k, v in shape.env.items() if SHAPE[k] != v)}, "
                  f"cap {shape.cap:,}; the record also {' '.join(f'{k}={v}' for k, v in shape.record_env.items())}")
    print(f"ours also: {' '.join(f'{k}={v}' for k, v in OURS_BASE.items())} COMPILE=<--compile>")
    return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    """Artifact size with every weight Gaussian: near the size of a briefly trained model (trained 17.52 MB against
    18.11 MB Gaussian at the old default shape, results/proxy_trained_size.md), so an estimate that errs on the large
    side."""
    shape = SHAPES[args.shape]
    rows = resolve_rows(args.rows or [n for n, r in ROWS.items() if r.script == "ours"])
    extra = dict(kv.split("=", 1) for kv in args.set)
    code = prepare_ours(args.work, pack=not args.no_pack, shape=shape)
    code_bytes = code.stat().st_size
    sys.path.insert(0, str(REPO))
    import torch
    import train_gpt as tg
    torch.manual_seed(0)
    print(f"code bytes {code_bytes:,} ({code.name}); cap {shape.cap:,}")
    for r in rows:
        if r.script != "ours" or shape_refusal(r, shape):
            continue
        env = {**row_env(r, 1, "sizes", args.work, args.shared, 1, 0, 0, False, None, math.nan, shape), **extra}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            hp = tg.Hyperparameters.from_env()
            hp.validate(1)
        except tg.UserError as e:
            raise HarnessError(f"{r.name}: {e}") from None
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        model = tg.GPT(hp)
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model_bytes = len(tg.encode_artifact(tg.pack(tg.quantize_state(state, hp)), hp.compressor, hp.byte_shuffle))
        total = model_bytes + code_bytes
        params = sum(p.numel() for p in model.parameters())
        print(f"{r.name:<18} params {params:>9,}  model ~{model_bytes:>9,}  total ~{total:>9,}  "
              f"{'fits' if total <= shape.cap else 'OVER'} ({shape.cap - total:+,})", flush=True)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    shared = need_shared(args.shared)
    infos = [ensure_data(shared, args.work, v, smoke, args.threads) for v in VOCABS for smoke in (False, True)]
    for info in infos:
        print(f"{info['path']}: {info['val_docs']} docs, {info['val_tokens']:,} val tokens (sha {info['val_sha16']}), "
              f"train {info['train_tokens']:,} tokens")
    (args.work / "data.json").write_text(json.dumps(infos, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bench/minigolf.py", description="Parameter Golf scaled down to a CPU (bench/README.md).")
    common = Parser(add_help=False)
    common.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (data, code copies, runs)")
    common.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (proxy data, anchors)")
    common.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every run and data build")
    common.add_argument("--shape", choices=SHAPES, default="mini",
                        help="mini: 4 x 128 (sp8192 rows 96), 600 steps; regime: 4 x 64 on sp1024, 3,000 steps, "
                             "~100 tokens a weight as in the records (results in results/minigolf/regime_runs.jsonl)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("prepare", parents=[common], help="build and check the data in the work folder")
    run = sub.add_parser("run", parents=[common], help="run rows x seeds, interleaved; append to the results")
    run.add_argument("rows", nargs="+", metavar="ROW", help="row names (see `rows`), or `all`")
    run.add_argument("--seeds", nargs="+", type=int, default=[1337])
    run.add_argument("--wallclock", default="auto", metavar="S|auto",
                     help="train seconds of equal-wall-clock rows; auto = mean baseline train s on this machine")
    run.add_argument("--compile", type=int, choices=(0, 1), default=1,
                     help="COMPILE for ours (default 1, the script's own default: 1.75x faster per step here)")
    run.add_argument("--warmup-steps", type=int, default=None, help="WARMUP_STEPS (default 2 with --compile 1, else 0)")
    run.add_argument("--no-pack", action="store_true", help="run the capped copy of train_gpt.py without packing it")
    run.add_argument("--results", type=Path, default=None,
                     help=f"JSON lines file (default {DEFAULT_RESULTS.relative_to(REPO)}, or per --shape; "
                          "with --smoke WORK/smoke_runs.jsonl)")
    # A guard against hung runs, not a budget: fp32 record rows at one thread, two side by side, took up to 89 minutes.
    run.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before a run is stopped")
    run.add_argument("--smoke", action="store_true",
                     help=f"harness check: {SMOKE_ITERATIONS} steps, {SMOKE_VAL_DOCS} val docs, separate results file")
    run.add_argument("--iterations", type=int, default=None, help="with --smoke: steps instead of the default")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    table = sub.add_parser("table", help="markdown table of the results; updates results/MINIGOLF.md")
    table.add_argument("--shape", choices=SHAPES, default="mini", help="whose results: mini's or regime's")
    table.add_argument("--results", type=Path, default=None, help=f"default {DEFAULT_RESULTS.relative_to(REPO)}")
    table.add_argument("--doc", type=Path, default=TABLE_DOC, help="document whose marked section is replaced")
    table.add_argument("--figure", type=Path, default=FIGURE, help="PNG of the standings and technique deltas")
    table.add_argument("--no-write", dest="write", action="store_false", help="print only")
    sub.add_parser("rows", help="list the registry")
    sizes = sub.add_parser("sizes", parents=[common], help="estimated bytes of rows' models (Gaussian weights)")
    sizes.add_argument("rows", nargs="*", metavar="ROW")
    sizes.add_argument("--set", nargs="*", default=[], metavar="K=V", help="settings on top of each row")
    sizes.add_argument("--no-pack", action="store_true", help="count the unpacked capped copy as the code")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", 1) < 1:
            raise HarnessError("--threads must be at least 1")
        if args.command == "run":
            if args.wallclock != "auto":
                try:
                    args.wallclock = float(args.wallclock)
                except ValueError:
                    raise HarnessError(f"--wallclock must be seconds or auto, got {args.wallclock!r}") from None
                if args.wallclock <= 0:
                    raise HarnessError("--wallclock must be positive")
            if args.iterations is not None and args.iterations < 1:
                raise HarnessError("--iterations must be at least 1")
        if args.command == "sizes" and any("=" not in kv for kv in args.set):
            raise HarnessError("--set takes K=V pairs")
        commands = dict(prepare=cmd_prepare, run=cmd_run, table=cmd_table, rows=cmd_rows, sizes=cmd_sizes)
        return commands[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (the run in progress was stopped and not recorded)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
