"""Parameter Golf: train a small GPT in 10 minutes on 8xH100, export it under 16 MB, score it in bits per byte.

Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (or `python train_gpt.py`); every setting is an
environment variable read once by `Hyperparameters`. The last log line, `final_submission`, is the score of
the artifact reloaded from disk.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import uuid
import zlib

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake the user can fix: reported as one line, never as a traceback."""


def depth_defaults(num_layers: int) -> dict:
    """The block-indexed settings' defaults for NUM_LAYERS blocks: XSA in every block; recurrence over the (up to)
    3 blocks ending at the middle one, (NUM_LAYERS - 1) // 2; parallel lanes in the top 3 blocks above those (none
    at 1 block). 11 blocks: XSA_LAST_N=11, RECUR_LAYERS=3,4,5, PARALLEL_START=8."""
    mid = (num_layers - 1) // 2
    parallel = max(num_layers - 3, mid + 1)
    return dict(xsa_last_n=num_layers, parallel_start=parallel if parallel < num_layers else -1,
                recur_layers=",".join(map(str, range(max(0, mid - 2), mid + 1))))


# Settings a release replaced: one set from an older command line is named, not silently ignored.
RETIRED = {"WARMDOWN_ITERS": "set WARMDOWN_FRAC (the fraction of training the warm-down takes, e.g. 0.85) instead",
           "LQER_ASYM": "LQER always takes the records' asymmetric form now (LQER_RANK=0 turns it off)"}


def colon_pairs(text: str) -> list[list[str]]:
    """'a:b,c:d' as [['a', 'b'], ['c', 'd']], spaces ignored; ValueError when an item is not one pair."""
    items = [item.split(":") for item in text.replace(" ", "").split(",") if item]
    if any(len(item) != 2 for item in items):
        raise ValueError(text)
    return items


@dataclasses.dataclass
class Hyperparameters:
    # Each field is read from the environment variable of the same name in upper case.
    data_path: str = "./data/datasets/fineweb10B_sp8192"
    tokenizer_path: str = "./data/tokenizers/fineweb_8192_bpe.model"
    run_id: str = ""
    seed: int = 1337
    # Model.
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    logit_softcap_neg: float = 0.0
    asym_logit: bool = True
    qk_gain_init: float = 5.0
    rope_dims: int = 16  # a quarter of the head (64 at 512 / 8 heads), even; left unset, it follows the head size
    ln_scale: bool = True
    xsa_last_n: int = 11  # these three: their 11-block values; left unset, they follow NUM_LAYERS (depth_defaults)
    parallel_start: int = 8
    recur_layers: str = "3,4,5"
    recur_passes: int = 3
    recur_start_frac: float = 0.35
    smear: bool = True
    bigram_buckets: int = 0
    bigram_dim: int = 128
    skip_gates: bool = True
    attn_gate: bool = True
    attn_gate_scale: float = 0.5
    ortho_init: bool = True
    doc_attention: bool = True
    # Schedule.
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0
    train_batch_tokens: int = 786432
    train_seq_len: int = 2048
    train_seq_schedule: str = ""
    seq_change_warmup_steps: int = 0
    grad_accum_steps: int = 0
    warmup_steps: int = 20
    lr_warmup_steps: int = 0
    warmdown_frac: float = 0.85
    min_lr_frac: float = 0.1
    # Optimizers.
    matrix_lr: float = 0.028
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_ns: str = "polar"
    muon_row_norm: bool = True
    muon_wd: float = 0.095
    adam_wd: float = 0.085
    scalar_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.9965
    # Quantisation and export.
    qat_start_frac: float = 1.0
    qat_bits_attn: int = 6
    qat_bits_mlp: int = 6
    embed_bits: int = 7
    clip_mode: str = "std"
    qat_clip_k: float = 6.0
    clip_search: bool = True
    gptq: bool = True
    gptq_act_order: bool = False
    gptq_embed: bool = True
    clip_sigmas: str = ""
    gptq_calib_batches: int = 32
    gptq_reserve_seconds: float = 12.0
    compressor: str = "rans"
    byte_shuffle: bool = True
    awq_group: bool = True
    lqer_rank: int = 4
    lqer_tensors: int = 3
    artifact_dir: str = "artifacts"
    fit_to_limit: bool = True
    allow_oversize: bool = False
    # Evaluation.
    val_batch_size: int = 524288
    val_loss_every: int = 0
    train_log_every: int = 100
    eval_seq_len: int = 0
    eval_stride: int = 64
    doc_eval: bool = True
    eval_seconds: float = 570.0
    compile: bool = True
    # Score-first test-time training: per-document LoRA, then optional global phases (TTT=0: off).
    ttt: bool = True
    ttt_lora_rank: int = 80
    ttt_lora_targets: str = "q,v,o,mlp,head"
    ttt_lr: float = 8e-5
    ttt_wd: float = 2.0
    ttt_chunk_tokens: int = 48
    ttt_short_chunks: str = ""
    ttt_batch_docs: int = 64
    ttt_prefix_docs: int = 2500
    ttt_phases: int = 1
    ttt_phase_lr: float = 1e-3
    ttt_global_chunk_tokens: int = 32768

    @classmethod
    def from_env(cls) -> "Hyperparameters":
        for old, new in RETIRED.items():
            if old in os.environ:
                raise UserError(f"{old} is no longer read: {new}")
        values = {}
        for f in dataclasses.fields(cls):
            name, raw, kind = f.name.upper(), os.environ.get(f.name.upper()), type(f.default)
            if raw is None or (raw == "" and kind is not str):  # set but empty: a text setting's "off"
                continue
            try:
                if kind is bool:
                    if raw.lower() not in ("0", "1", "true", "false"):
                        raise ValueError
                    values[f.name] = raw.lower() in ("1", "true")
                else:
                    values[f.name] = kind(raw)
            except ValueError:
                raise UserError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        head_dim = values.get("model_dim", cls.model_dim) // max(1, values.get("num_heads", cls.num_heads))
        shape = {**depth_defaults(values.get("num_layers", cls.num_layers)), "rope_dims": head_dim // 8 * 2}
        hp = cls(**{**shape, **values})
        hp.run_id = hp.run_id or uuid.uuid4().hex[:12]
        # Unset, the evaluation reads a quarter further than training did: #2135's 2,560 at 2,048 (from #1953), which
        # partial RoPE lets the model use; the same share at any training length.
        hp.eval_seq_len = hp.eval_seq_len or hp.train_seq_len * 5 // 4
        return hp

    def validate(self, world_size: int) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f"{f.name.upper()} must be finite, got {value}")
        # A rate of 0 or below does not fail: it trains (or adapts) the wrong way and reports a worse score.
        for name in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr", "ttt_lr", "ttt_phase_lr",
                     "adam_eps", "rope_base", "qk_gain_init"):
            need(getattr(self, name) > 0, f"{name.upper()} must be positive, got {getattr(self, name)}")
        for name in ("muon_wd", "adam_wd", "scalar_wd", "ttt_wd", "grad_clip_norm", "seq_change_warmup_steps"):
            need(getattr(self, name) >= 0, f"{name.upper()} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            need(0 <= getattr(self, name) < 1, f"{name.upper()} must be in [0, 1), got {getattr(self, name)}")
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "train_seq_len",
                     "train_batch_tokens", "val_batch_size", "train_log_every", "gptq_calib_batches", "qat_clip_k"):
            need(getattr(self, name) > 0, f"{name.upper()} must be positive, got {getattr(self, name)}")
        need(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shards")
        need(self.model_dim % self.num_heads == 0,
             f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}")
        need((self.model_dim // self.num_heads) % 2 == 0, "MODEL_DIM/NUM_HEADS must be even for RoPE")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0,
             f"ROPE_DIMS must be even and in 0..{head_dim} (0 = whole head), got {self.rope_dims}")
        need(0 <= self.xsa_last_n <= self.num_layers, f"XSA_LAST_N must be in 0..NUM_LAYERS, got {self.xsa_last_n}")
        need(-1 <= self.parallel_start < self.num_layers,
             f"PARALLEL_START must be -1 (off) or a block index below NUM_LAYERS, got {self.parallel_start}")
        self.recur_span()
        need(self.recur_passes >= 1, f"RECUR_PASSES must be >= 1 (1 = no repeat), got {self.recur_passes}")
        need(0.0 <= self.recur_start_frac <= 1.0, f"RECUR_START_FRAC must be in [0, 1], got {self.recur_start_frac}")
        need(self.bigram_buckets >= 0, f"BIGRAM_BUCKETS must be >= 0 (0 = off), got {self.bigram_buckets}")
        need(self.bigram_dim > 0, f"BIGRAM_DIM must be positive, got {self.bigram_dim}")
        need(self.grad_accum_steps >= 0, "GRAD_ACCUM_STEPS must be >= 0 (0 = automatic)")
        for seq_len, _ in self.seq_schedule():
            micro = world_size * self.accum_steps(world_size) * seq_len
            need(self.train_batch_tokens % micro == 0,
                 f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be divisible by world_size({world_size}) x "
                 f"GRAD_ACCUM_STEPS({self.accum_steps(world_size)}) x the sequence length ({seq_len}) = {micro}")
        need(self.logit_softcap > 0 and self.logit_softcap_neg >= 0,
             f"LOGIT_SOFTCAP must be positive and LOGIT_SOFTCAP_NEG >= 0 (0 = same), got {self.logit_softcap}, "
             f"{self.logit_softcap_neg}")
        for name in ("qat_bits_attn", "qat_bits_mlp"):
            need(getattr(self, name) in (4, 5, 6, 7, 8), f"{name.upper()} must be 4..8, got {getattr(self, name)}")
        need(self.embed_bits in (6, 7, 8, 16), f"EMBED_BITS must be 6, 7, 8 or 16 (fp16), got {self.embed_bits}")
        need(self.compressor in (*COMPRESSORS, "best") and (self.compressor != "brotli" or have_brotli()),
             f"COMPRESSOR must be best or one of {sorted(COMPRESSORS)} (brotli if installed), got {self.compressor!r}")
        need(self.clip_mode in ("max", "std"), f"CLIP_MODE must be max or std, got {self.clip_mode!r}")
        self.clip_sigma_map()
        need(self.lqer_rank >= 0 and self.lqer_tensors >= 0,
             f"LQER_RANK and LQER_TENSORS must be >= 0, got {self.lqer_rank}, {self.lqer_tensors}")
        cap = self.max_wallclock_seconds
        need(not (self.gptq and cap) or 0 <= self.gptq_reserve_seconds < cap,
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} must be in [0, MAX_WALLCLOCK_SECONDS={cap})")
        need(0.0 <= self.qat_start_frac <= 1.0, f"QAT_START_FRAC must be in [0, 1], got {self.qat_start_frac}")
        need(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY must be in [0, 1), got {self.ema_decay}")
        need(0 <= self.eval_stride <= self.eval_seq_len,
             f"EVAL_STRIDE={self.eval_stride} must be in 0..EVAL_SEQ_LEN={self.eval_seq_len} (0 disables sliding)")
        for name in ("ttt_lora_rank", "ttt_chunk_tokens", "ttt_batch_docs", "ttt_global_chunk_tokens", "eval_seconds"):
            need(getattr(self, name) > 0, f"{name.upper()} must be positive, got {getattr(self, name)}")
        need(not self.ttt or self.ttt_chunk_tokens <= self.eval_seq_len,
             f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} must be at most EVAL_SEQ_LEN={self.eval_seq_len}: a chunk is "
             f"scored by one window, so a longer one would leave targets unscored")
        self.ttt_chunk_for(0)
        need(self.ttt_prefix_docs >= 0 and self.ttt_phases >= 0,
             f"TTT_PREFIX_DOCS and TTT_PHASES must be >= 0, got {self.ttt_prefix_docs}, {self.ttt_phases}")
        targets = self.ttt_lora_targets.split(",")
        need(bool(targets) and set(targets) <= set(LORA_ROLES.values()),
             f"TTT_LORA_TARGETS={self.ttt_lora_targets!r} must be a comma-separated subset of q,k,v,o,mlp,head")
        need(self.iterations > 0, f"ITERATIONS must be positive, got {self.iterations}")
        need(self.max_wallclock_seconds >= 0, "MAX_WALLCLOCK_SECONDS must be >= 0 (0 = no cap)")
        need(self.muon_ns in NS_COEFFICIENTS, f"MUON_NS must be one of {sorted(NS_COEFFICIENTS)}, got {self.muon_ns!r}")
        for name in ("min_lr_frac", "warmdown_frac"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name.upper()} must be in [0, 1], got {getattr(self, name)}")
        need(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", self.run_id) is not None,
             f"RUN_ID={self.run_id!r} may hold only letters, digits, '-', '_' and '.' (it names files)")

    def seq_schedule(self) -> list[tuple[int, float]]:
        """TRAIN_SEQ_SCHEDULE as (sequence length, fraction of training it starts at), e.g. '1024@0,2048@0.4': the
        context grows while the tokens per step stay TRAIN_BATCH_TOKENS; it ends at TRAIN_SEQ_LEN. Empty: constant."""
        if not self.train_seq_schedule.strip():
            return [(self.train_seq_len, 0.0)]
        try:
            stages = [(int(length), float(start)) for length, start in
                      (item.split("@") for item in self.train_seq_schedule.replace(" ", "").split(","))]
        except ValueError:
            stages = []
        if (not stages or stages[0][1] != 0.0 or stages[-1][0] != self.train_seq_len or stages[-1][1] > 1.0
                or any(length <= 0 for length, _ in stages) or any(b[1] <= a[1] for a, b in zip(stages, stages[1:]))):
            raise UserError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r} must be length@fraction pairs with "
                            f"fractions rising from 0 to at most 1, ending at TRAIN_SEQ_LEN={self.train_seq_len}, "
                            f"e.g. '1024@0,{self.train_seq_len}@0.4'")
        return stages

    def clip_sigma_map(self) -> dict[str, float]:
        """CLIP_SIGMAS as {kind: k}, e.g. 'mlp:11.5,attn:13,embed:14'; empty: every kind searches its clip."""
        try:
            pairs = {kind: float(k) for kind, k in colon_pairs(self.clip_sigmas)}
        except ValueError:
            pairs = {"": 0.0}
        if not set(pairs) <= {"attn", "mlp", "embed"} or not all(k > 0 and math.isfinite(k) for k in pairs.values()):
            raise UserError(f"CLIP_SIGMAS={self.clip_sigmas!r} must be kind:k pairs, kinds attn, mlp and embed, each k "
                            f"positive, e.g. 'mlp:11.5,attn:13,embed:14'")
        return pairs

    def ttt_chunk_for(self, longest: int) -> int:
        """Chunk size of a TTT batch whose longest document has `longest` tokens: TTT_SHORT_CHUNKS, e.g.
        '256:8,2000:24' (#2014), gives batches of short documents smaller chunks, so their adapters step more often;
        TTT_CHUNK_TOKENS otherwise."""
        try:
            steps = [(int(limit), int(chunk)) for limit, chunk in colon_pairs(self.ttt_short_chunks)]
        except ValueError:
            steps = [(0, 0)]
        if any(limit <= 0 or not 0 < chunk <= self.eval_seq_len for limit, chunk in steps) or \
                [limit for limit, _ in steps] != sorted({limit for limit, _ in steps}):
            raise UserError(f"TTT_SHORT_CHUNKS={self.ttt_short_chunks!r} must be length:chunk pairs with rising "
                            f"lengths and chunks in 1..EVAL_SEQ_LEN={self.eval_seq_len}, e.g. '256:8,2000:24'")
        return next((chunk for limit, chunk in steps if longest <= limit), self.ttt_chunk_tokens)

    def recur_span(self) -> range:
        """RECUR_LAYERS as the range of blocks that repeat; empty when off."""
        text = self.recur_layers.replace(" ", "")
        try:
            idx = [int(i) for i in text.split(",")] if text else []
        except ValueError:
            idx = [-1]
        if idx and (idx != list(range(idx[0], idx[0] + len(idx))) or idx[0] < 0 or idx[-1] >= self.num_layers):
            raise UserError(f"RECUR_LAYERS={self.recur_layers!r} must be consecutive block indices below "
                            f"NUM_LAYERS={self.num_layers}, e.g. '3,4,5'")
        return range(idx[0], idx[-1] + 1) if idx else range(0)

    def block_order(self) -> list[int]:
        """Block indices in the order they run once recurrence is on: the RECUR_LAYERS span RECUR_PASSES times."""
        span = self.recur_span()
        return [*range(span.start), *list(span) * self.recur_passes, *range(span.stop, self.num_layers)]

    @property
    def train_seconds(self) -> float:
        # GPTQ's Hessian collection counts as training time, so the loop hands it a slice of the wall clock.
        cap = self.max_wallclock_seconds
        return cap - self.gptq_reserve_seconds if self.gptq and cap else cap

    def accum_steps(self, world_size: int) -> int:
        # Default: 8 micro-batches across the job, so one GPU sees the same global batch as eight.
        return self.grad_accum_steps or max(1, 8 // world_size)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def shard_token_count(path: str) -> int:
    """Token count from a shard's header, after checking magic, version and file size."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a file; shards must be regular files")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"{path}: not a challenge shard (need magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    count, expected = int(header[2]), HEADER_INTS * 4 + 2 * int(header[2])
    if os.path.getsize(path) != expected:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes but the header's {count} tokens need {expected}")
    return count


def read_shard(path: str, vocab_size: int) -> np.ndarray:
    """Tokens of one challenge shard, after checking the header, the size and the token range."""
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_INTS * 4)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; "
                        f"wrong tokenizer or VOCAB_SIZE")
    return tokens


def shard_files(data_path: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))  # not fineweb_val_bytes_*
    if not files:
        raise UserError(f"no {split} shards match {data_path}/fineweb_{split}_*.bin: set DATA_PATH "
                        f"(build a dataset with `python data/prepare.py --out DIR`)")
    return files


class TokenStream:
    """Training shards in order, forever; every rank reads the same stream and keeps its own slice. The next shard
    is read by a background thread while the current one is consumed, so the loop never waits on the disk."""

    def __init__(self, files: list[str], vocab_size: int):
        if sum(shard_token_count(f) for f in files) == 0:
            raise UserError(f"training shards {files[0]}... hold no tokens")
        self.files, self.vocab_size = files, vocab_size
        self.file_index, self.tokens, self.pos = -1, np.zeros(0, np.uint16), 0
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.next_tokens = self.reader.submit(read_shard, files[0], vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == self.tokens.size:
                self.file_index = (self.file_index + 1) % len(self.files)
                self.tokens, self.pos = self.next_tokens.result(), 0
                following = self.files[(self.file_index + 1) % len(self.files)]
                self.next_tokens = self.reader.submit(read_shard, following, self.vocab_size)
                continue
            part = self.tokens[self.pos:self.pos + n]
            parts.append(part)
            self.pos += part.size
            n -= part.size
        return np.concatenate(parts)


class TrainLoader:
    def __init__(self, files: list[str], vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.stream = TokenStream(files, vocab_size)
        self.rank, self.world_size, self.device = rank, world_size, device

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id: UTF-8 bytes of its text without the leading '▁', whether it has that '▁', and whether it
    is a boundary (control/unknown/unused, or padding past the tokenizer): boundaries carry no bytes and
    swallow the next token's '▁'."""
    base = np.zeros(vocab_size, np.int16)
    leading_space = np.zeros(vocab_size, np.bool_)
    boundary = np.ones(vocab_size, np.bool_)
    for i in range(min(sp.vocab_size(), vocab_size)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            leading_space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, leading_space, boundary


def count_target_bytes(prev: torch.Tensor, target: torch.Tensor, tables: tuple,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """UTF-8 bytes of each target. With a byte sidecar, `tables` is (sidecar,), indexed by the targets' positions."""
    if len(tables) == 1:  # positions past its end are warm-up data, never scored
        return tables[0][positions.clamp_max(tables[0].numel() - 1)]
    base, leading_space, boundary = tables
    return base[target] + (leading_space[target] & ~boundary[prev]).to(base.dtype)


def load_tokenizer(hp: Hyperparameters) -> spm.SentencePieceProcessor:
    """The tokenizer, checked against VOCAB_SIZE and against the hash the dataset's manifest.json records (written
    by data/prepare.py): byte counts from another tokenizer would make every bits-per-byte figure silently wrong."""
    try:
        with open(hp.tokenizer_path, "rb") as f:
            model = f.read()
        sp = spm.SentencePieceProcessor(model_proto=model)
        if sp.vocab_size() == 0:
            raise RuntimeError("it has no pieces")
    except (OSError, RuntimeError) as e:
        raise UserError(f"TOKENIZER_PATH={hp.tokenizer_path} is not a readable SentencePiece model ({e})") from None
    if sp.vocab_size() != hp.vocab_size:
        raise UserError(f"VOCAB_SIZE={hp.vocab_size} but {hp.tokenizer_path} has {sp.vocab_size()} pieces")
    try:
        with open(os.path.join(hp.data_path, "manifest.json"), encoding="utf-8") as f:
            expected = json.load(f).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        expected = None
    if expected and hashlib.sha256(model).hexdigest() != expected:
        raise UserError(f"TOKENIZER_PATH={hp.tokenizer_path} is not the tokenizer of DATA_PATH={hp.data_path} "
                        f"(its manifest.json records sha256 {expected[:16]}...): point TOKENIZER_PATH at that one")
    return sp


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def fp16_scale(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    """Grid step for a row, as stored (fp16). The floor is fp16's smallest subnormal, so an all-zero row gets a
    tiny step instead of 0/0."""
    return (clip / qmax).clamp_min(2.0 ** -24).half().float()


def std_clip(w: torch.Tensor, k: float, cap: bool = True) -> torch.Tensor:
    """Per-row clip k * std, capped at the row's max |w| (range past it would only coarsen the grid). Uncapped, a
    wide k leaves the outer codes unused: a coarser grid of fewer distinct codes, which compresses better."""
    clip = k * w.std(dim=1, keepdim=True)
    return clip.minimum(w.abs().amax(dim=1, keepdim=True)) if cap else clip


def fake_quantize(w: torch.Tensor, bits: int, clip_k: float = 0.0) -> torch.Tensor:
    """Per-row symmetric round-to-grid with the export's fp16 scales; gradients pass straight through. The clip
    is the row's max |w|, or std_clip(clip_k) for CLIP_MODE=std (one of the k the export searches)."""
    qmax = 2 ** (bits - 1) - 1
    w_ = w.detach()
    scale = fp16_scale(std_clip(w_, clip_k) if clip_k else w_.abs().amax(dim=1, keepdim=True), qmax)
    grid = (w_ / scale).round().clamp(-qmax, qmax) * scale
    return w + (grid - w).detach()


class CastedLinear(nn.Linear):
    """fp32 master weights (autocast does the bf16 matmul) with optional fake quantisation.

    The on/off switch `qat_on` is a plain attribute: compiled graphs guard on it, so flipping it re-traces (the
    compile warm-up builds both graphs) and fake quantisation costs nothing until it is switched on."""

    def __init__(self, in_features: int, out_features: int, qat_bits: int = 0, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits, self.clip_k, self.qat_on = qat_bits, 0.0, False
        self.lora = None  # test-time adapters (DocumentAdapters)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_bits and self.qat_on:
            w = fake_quantize(w, self.qat_bits, self.clip_k)
        return F.linear(x, w) if self.lora is None else F.linear(x, w) + lora_delta(x, *self.lora)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first 2 * cos.size(-1) dims of each head; the rest (partial RoPE) carry no position."""
    half = cos.size(-1)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., 2 * half:]), dim=-1)


def flash_attention_3():
    """FlashAttention-3's attention function when its package imports (Hopper builds), else None."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention_kernel(device: torch.device, documents: bool = False) -> str:
    """Which kernel the model's attention runs on. On CUDA, SDPA is pinned to the flash kernel (setup_distributed):
    left to choose, recent torch may pick cuDNN attention, which has open correctness bugs with few KV heads. Document
    masks (DOC_ATTENTION) take flex attention on CUDA; on a CPU, flex attention has no backward (torch 2.13), so SDPA
    takes the mask as a dense boolean (batch, 1, time, time) tensor, a few MB at the shapes a CPU trains."""
    if documents:
        return "flex" if device.type == "cuda" else "sdpa_mask"
    return "fa3" if flash_attention_3() else "sdpa_flash" if device.type == "cuda" else "sdpa"


def document_mask(input_ids: torch.Tensor, kernel: str) -> BlockMask | torch.Tensor:
    """Causal attention within documents only: a BOS starts a new one, and a row's tokens before its first BOS are
    the tail of a document that began in an earlier row. Built once per forward pass, shared by every block."""
    b, t = input_ids.shape
    docs = (input_ids == BOS_ID).cumsum(1)
    if kernel == "flex":
        return create_block_mask(lambda i, h, q, k: (k <= q) & (docs[i, q] == docs[i, k]), b, None, t, t,
                                 device=input_ids.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fa3,
                     mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention on (batch, time, heads, head_dim) tensors, in FA3's layout, within documents when given
    their mask (document_mask)."""
    if mask is None and fa3 is not None:
        y = fa3(q, k, v, causal=True)
        return y[0] if isinstance(y, tuple) else y  # some FA3 versions also return the log-sum-exp
    q, k, v, gqa = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), k.size(2) != q.size(2)
    if isinstance(mask, BlockMask):
        y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return y.transpose(1, 2)


GATE_CHANNELS = 12  # the attention and smear gates read this many input channels: the records' sparse gates (#1787)


class Attention(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        dim, self.heads, self.kv_heads = hp.model_dim, hp.num_heads, hp.num_kv_heads
        self.head_dim = dim // hp.num_heads
        self.xsa = layer >= hp.num_layers - hp.xsa_last_n
        self.fa3 = flash_attention_3()
        bits = hp.qat_bits_attn
        self.c_q = CastedLinear(dim, dim, bits)
        self.c_k = CastedLinear(dim, self.kv_heads * self.head_dim, bits)
        self.c_v = CastedLinear(dim, self.kv_heads * self.head_dim, bits)
        self.proj = CastedLinear(dim, dim, bits, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.heads,), hp.qk_gain_init))
        # ATTN_GATE: each head's output times sigmoid(ATTN_GATE_SCALE x a linear read of the block input's first
        # GATE_CHANNELS), zero initialised (x0.5 at the start), so a head can quiet itself where its context does not
        # help; the scale slows the gate's logits against the shared scalar learning rate (the records' 0.5).
        self.gate = nn.Parameter(torch.zeros(self.heads, GATE_CHANNELS)) if hp.attn_gate else None
        self.gate_scale = hp.attn_gate_scale
        rope = hp.rope_dims or self.head_dim
        inv_freq = hp.rope_base ** (-torch.arange(0, rope, 2, dtype=torch.float32) / rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(t, device=device, dtype=torch.float32), self.inv_freq)[:, None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward(self, x: torch.Tensor, mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.heads, self.head_dim)
        k = self.c_k(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.c_v(x).view(b, t, self.kv_heads, self.head_dim)
        cos, sin = self.rotary(t, x.device, q.dtype)
        q = apply_rotary(F.rms_norm(q, (self.head_dim,)), cos, sin) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rotary(F.rms_norm(k, (self.head_dim,)), cos, sin)
        y = causal_attention(q, k, v, self.fa3, mask)
        if self.xsa:
            # XSA: drop the part of each head's output that only repeats its own token's value, so attention
            # spends itself on context. Query heads are grouped by the kv head that serves them.
            y = y.unflatten(2, (self.kv_heads, -1))
            v_hat = F.normalize(v, dim=-1).unsqueeze(3)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).flatten(2, 3)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate_scale * x[..., :GATE_CHANNELS] @ self.gate.to(x.dtype).T)[..., None]
        return self.proj(y.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        hidden = int(hp.mlp_mult * hp.model_dim)
        self.fc = CastedLinear(hp.model_dim, hidden, hp.qat_bits_mlp)
        self.proj = CastedLinear(hidden, hp.model_dim, hp.qat_bits_mlp, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LeakyReLU(0.5)^2 keeps a gradient for negative inputs, unlike ReLU^2.
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        dim = hp.model_dim
        self.attn, self.mlp = Attention(hp, layer), MLP(hp)
        # LN_SCALE damps the normed input of deep blocks, so their updates to the residual start smaller.
        self.norm_scale = (layer + 1) ** -0.5 if hp.ln_scale else 1.0
        self.parallel = 0 <= hp.parallel_start <= layer
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Row 0 weighs the running residual, row 1 the embedding x0: each block picks how much raw token
        # identity to pull back in.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        if self.parallel:
            # Two-lane blocks (the records' form since #1855): how much of each lane carries on, and how much of the
            # attention (row 0) and MLP (row 1) output goes into lane 0 and lane 1.
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),)) * self.norm_scale

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask: BlockMask | torch.Tensor | None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        out = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), mask)
        return out + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(out))

    def lanes(self, x: torch.Tensor, lane: torch.Tensor, x0: torch.Tensor,
              mask: BlockMask | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A parallel block: attention reads lane 0 (mixed with x0), the MLP reads lane 1, side by side, and both
        outputs go into both lanes."""
        mix, resid, post = self.resid_mix.to(x.dtype), self.lane_resid.to(x.dtype), self.lane_post.to(x.dtype)
        attn = self.attn_scale.to(x.dtype) * self.attn(self.norm(mix[0] * x + mix[1] * x0), mask)
        mlp = self.mlp_scale.to(x.dtype) * self.mlp(self.norm(lane))
        return (resid[0] * x + post[0, 0] * attn + post[1, 0] * mlp,
                resid[1] * lane + post[0, 1] * attn + post[1, 1] * mlp)


class GPT(nn.Module):
    """U-Net transformer over the order the blocks run in: the first half of that order (encoder) keeps its outputs,
    and the mirrored entry of the second half (decoder) adds them back through learned per-dimension skip weights.
    With recurrence on the order is unrolled (RECUR_LAYERS repeated), so the repeat passes make and take skips too.

    With `bf16` the forward pass runs under bf16 autocast and the residual stream itself is bf16 (half the bytes
    through every add, norm and skip); parameters stay fp32. A model reloaded from an artifact is built with
    `qat=False`: its weights are already on the grid, so fake quantisation would only cost time."""

    def __init__(self, hp: Hyperparameters, bf16: bool = False, qat: bool = True):
        super().__init__()
        self.bf16 = bf16
        self.softcap, self.softcap_neg = hp.logit_softcap, hp.logit_softcap_neg or hp.logit_softcap
        # ASYM_LOGIT: the two caps become weights that training leaves where they start (no gradient, so DDP never
        # waits for one) and the evaluation's global TTT phases adapt to the scored text (the #2135 form).
        self.softcaps = nn.Parameter(torch.tensor([self.softcap, self.softcap_neg]), requires_grad=False) \
            if hp.asym_logit else None
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=0.005 if hp.tie_embeddings else 1.0)
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(hp.num_layers))
        unrolled = hp.block_order()
        # Skip rows are sized for the unrolled order, whose encoder half is the longer; decoder entry k takes row k, so
        # before recurrence switches on only the first NUM_LAYERS // 2 rows are in use.
        self.skip_weights = nn.Parameter(torch.ones(len(unrolled) // 2, hp.model_dim))
        # SKIP_GATES: a decoder block mixes its input with the weighted skip through a sigmoid gate per dimension
        # (zero-initialised: an even mix) instead of adding it.
        self.skip_gates = nn.Parameter(torch.zeros_like(self.skip_weights)) if hp.skip_gates else None
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, zero_init=True)
        self.final_norm = nn.RMSNorm(hp.model_dim, elementwise_affine=False)  # a module, so GPTQ_EMBED can hook it
        # Plain attributes, not buffers: compiled graphs guard on recur_on, so flipping it re-traces.
        self.orders = (list(range(hp.num_layers)), unrolled)
        self.recur, self.recur_on = len(unrolled) > hp.num_layers, False
        self.lora = None  # test-time adapters of the tied output head (DocumentAdapters)
        # DOC_ATTENTION: no token attends across a BOS, in training and in every evaluation window alike.
        self.doc_attention = hp.doc_attention
        self.vocab_size, self.bigram_buckets = hp.vocab_size, hp.bigram_buckets
        self.bigram_emb = self.bigram_proj = self.smear_gate = self.smear_lambda = None
        if hp.bigram_buckets:
            self.bigram_emb = nn.Embedding(hp.bigram_buckets, hp.bigram_dim)
            nn.init.normal_(self.bigram_emb.weight, std=0.005)
            self.bigram_proj = CastedLinear(hp.bigram_dim, hp.model_dim, hp.qat_bits_mlp, zero_init=True)
        if hp.smear:
            # Each token decides from its own first GATE_CHANNELS how much of its predecessor to take in; the
            # strength lambda starts at zero, so the model starts without it (the records' form since #1667).
            self.smear_gate = nn.Parameter(torch.zeros(GATE_CHANNELS))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        for name, module in self.named_modules():
            if isinstance(module, CastedLinear):
                module.clip_k = hp.qat_clip_k if hp.clip_mode == "std" else 0.0
                module.qat_bits *= qat
                # ORTHO_INIT: the input maps start orthogonal (every direction the same gain; the records since
                # #1855); the output maps stay zero.
                if hp.ortho_init and name.endswith(("c_q", "c_k", "c_v", "fc")):
                    nn.init.orthogonal_(module.weight)

    def set_qat(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat_on = enabled

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embedding plus the optional bigram and smear terms. A document's first token (BOS) sees no
        previous token, so nothing leaks across documents."""
        x = self.tok_emb(input_ids)
        is_bos = input_ids == BOS_ID
        if self.bigram_emb is not None:
            absent = self.vocab_size
            prev = F.pad(input_ids[:, :-1], (1, 0), value=absent).masked_fill(is_bos, absent)
            # Fibonacci hashing of the pair id: the top 32 bits of a multiplicative hash spread well.
            bucket = ((prev * (absent + 1) + input_ids) * 2654435761 & 0xFFFFFFFF) * self.bigram_buckets >> 32
            x = x + self.bigram_proj(self.bigram_emb(bucket))
        if self.smear_gate is not None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0)).masked_fill(is_bos[..., None], 0.0)
            gate = torch.sigmoid(x[..., :GATE_CHANNELS] @ self.smear_gate.to(x.dtype))[..., None]
            x = x + self.smear_lambda.to(x.dtype) * gate * prev
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, torch.bfloat16, enabled=self.bf16):
            x = self.embed(input_ids)
            x = x0 = x.to(torch.bfloat16) if self.bf16 else x
            mask = document_mask(input_ids, attention_kernel(input_ids.device, True)) if self.doc_attention else None
            order = self.orders[self.recur_on]
            half, skips, lane = len(order) // 2, [], None
            for k, i in enumerate(order):
                if k >= half and skips:  # into lane 0 while there are two
                    skip = self.skip_weights[k - half].to(x.dtype) * skips.pop()
                    x = x + skip if self.skip_gates is None else torch.lerp(
                        skip, x, torch.sigmoid(self.skip_gates[k - half]).to(x.dtype))
                block = self.blocks[i]
                # The first parallel block opens a second lane from the residual; a plain block (only where the
                # recurrence span reaches past PARALLEL_START), and the end, merge the two by their mean.
                if block.parallel:
                    x, lane = block.lanes(x, x if lane is None else lane, x0, mask)
                else:
                    x, lane = (x if lane is None else 0.5 * (x + lane)), None
                    x = block(x, x0, mask)
                if k < half:
                    skips.append(x)
            x = self.final_norm(x if lane is None else 0.5 * (x + lane))
            logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
            if self.lora is not None:
                logits = logits + lora_delta(x, *self.lora)
            z = logits.float()
            # LOGIT_SOFTCAP_NEG: its own cap for negative logits (how surely a token is ruled out).
            pos, neg = self.softcaps.float().unbind() if self.softcaps is not None else (self.softcap, self.softcap_neg)
            cap = pos if self.softcaps is None and pos == neg else torch.where(z > 0, pos, neg)
            return cap * torch.tanh(z / cap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        logits = self.logits(input_ids)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target_ids.reshape(-1),
                               reduction="none" if per_token else "mean")
        return loss.view_as(target_ids) if per_token else loss


# ----------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------


# Quintic iteration x <- a x + b (x x^T) x + c (x x^T)^2 x. "classic" repeats one tuned triple; "polar" uses the
# per-iteration minimax triples of Polar Express (Amsel et al. 2025, arXiv:2505.16932, degree 5), each but the
# last divided by 1.01, 1.01^3, 1.01^5 as the paper recommends for bf16 safety; later iterations repeat the last.
NS_COEFFICIENTS = {
    "classic": [(3.4445, -4.7750, 2.0315)],
    "polar": [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248))] + [(1.875, -1.25, 0.375)],
}


def newton_schulz(g: torch.Tensor, steps: int, variant: str = "classic") -> torch.Tensor:
    """Approximately orthogonalise a (batch of) matrices: singular values are pushed towards 1."""
    coefficients = NS_COEFFICIENTS[variant]
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    # The polar triples assume the spectrum starts inside [0, 1] with a margin; 1.01 gives it.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1.01 if variant == "polar" else 1.0) + 1e-7)
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """Rank that orthogonalises each matrix: largest first, each to the least-loaded rank, so every rank does about
    the same Newton-Schulz work (NS costs grow with the matrix size)."""
    owners, load = [0] * len(sizes), [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[i] = min(range(world_size), key=load.__getitem__)
        load[owners[i]] += sizes[i]
    return owners


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz orthogonalisation. Each rank orthogonalises the matrices it owns
    (same-shape ones as one batch) into its slice of one flat update buffer; one all-reduce shares the buffer,
    and every rank applies all the updates with foreach ops."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, ns_variant: str = "classic", row_norm: bool = False,
                 compile: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.world_size = backend_steps, world_size
        self.ns_variant, self.row_norm = ns_variant, row_norm
        self.orthogonalise = torch.compile(newton_schulz, dynamic=False, fullgraph=True) if compile else newton_schulz
        params = self.param_groups[0]["params"]
        work_dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=work_dtype, device=params[0].device)
        self.updates = [u.view_as(p) for u, p in zip(self.flat.split([p.numel() for p in params]), params)]
        owners = balanced_owners([p.numel() for p in params], world_size)
        by_shape: dict[tuple, list] = {}
        for i, p in enumerate(params):
            if owners[i] == rank:
                by_shape.setdefault(tuple(p.shape), []).append(i)
        self.owned = list(by_shape.values())

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        params, lr, momentum = group["params"], group["lr"], group["momentum"]
        if self.world_size > 1:
            self.flat.zero_()  # the all-reduce sums: slices this rank does not own must hold zeros
        for indices in self.owned:
            ps = [params[i] for i in indices]
            grads = [p.grad for p in ps]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            stacked = torch.stack(torch._foreach_add(grads, bufs, alpha=momentum))
            if self.row_norm:
                # MuonEq-R: equalise row norms first, so a few loud rows cannot dominate the orthogonalisation.
                stacked = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            ortho = self.orthogonalise(stacked, self.backend_steps, self.ns_variant)
            ortho *= max(1.0, ps[0].size(0) / ps[0].size(1)) ** 0.5
            torch._foreach_copy_([self.updates[i] for i in indices], list(ortho.unbind()))
        if self.world_size > 1:
            dist.all_reduce(self.flat)
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, self.updates, alpha=-lr)


def build_optimizers(model: GPT, hp: Hyperparameters, rank: int, world_size: int, fused: bool,
                     compile: bool = False):
    # Muon takes the linear layers' weights (blocks and bigram projection); Adam the embedding tables, the
    # untied head, and everything else (gains, scales, resid_mix, skip weights, gates) as scalars with their own
    # SCALAR_WD: orthogonalising a 2 x dim mixing table would be meaningless.
    matrices = [p for name, p in model.named_parameters()
                if p.ndim == 2 and name.startswith(("blocks.", "bigram_proj.")) and name.endswith(".weight")]
    embeds = [m.weight for m in (model.tok_emb, model.bigram_emb) if m is not None]
    head = [model.lm_head.weight] if model.lm_head is not None else []
    taken = {id(p) for p in matrices + embeds + head}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    muon = Muon(matrices, hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd, rank, world_size,
                hp.muon_ns, hp.muon_row_norm, compile)
    groups = [dict(params=embeds, lr=hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr,
                   weight_decay=hp.adam_wd),
              dict(params=scalars, lr=hp.scalar_lr, weight_decay=hp.scalar_wd)]
    if head:
        groups.append(dict(params=head, lr=hp.head_lr, weight_decay=hp.adam_wd))
    adam = torch.optim.AdamW(groups, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=fused)
    optimizers = [muon, adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    """Warm-up, flat, then over the last WARMDOWN_FRAC of training (by steps or the wall clock, whichever is further
    on) a linear decay towards zero that holds at MIN_LR_FRAC: the records' shape since #1855."""
    warm = min(1.0, (step + 1) / hp.lr_warmup_steps) if hp.lr_warmup_steps > 0 else 1.0
    left = 1.0 - training_progress(step, elapsed_ms, hp)
    return warm * max(min(1.0, left / hp.warmdown_frac), hp.min_lr_frac) if hp.warmdown_frac > 0 else warm


def rewarm(step: int, switched_at: int, hp: Hyperparameters) -> float:
    """The learning rate's share SEQ_CHANGE_WARMUP_STEPS after a context switch at `switched_at` (#2014): a longer
    context changes the gradients' statistics, and full steps at once disturb what was learnt."""
    n = hp.seq_change_warmup_steps
    return min(1.0, (step - switched_at + 1) / n) if n > 0 and switched_at > 0 else 1.0


def training_progress(step: int, elapsed_ms: float, hp: Hyperparameters) -> float:
    by_time = elapsed_ms / (1000 * hp.train_seconds) if hp.train_seconds > 0 else 0.0
    return max(step / hp.iterations, by_time)


# ----------------------------------------------------------------------------------------------------------
# Quantisation and export
# ----------------------------------------------------------------------------------------------------------

CLIP_FRACTIONS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7)
STD_CLIP_KS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
GPTQ_BLOCK, GPTQ_DAMP = 128, 0.01
ARTIFACT_MAGIC, PAYLOAD_MAGIC = b"PGA2", b"PGQ1"


def quantize_rows(w: torch.Tensor, bits: int, clip_mode: str = "max", weight: torch.Tensor | None = None,
                  ks: tuple | None = None, cap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int quantisation. Each row's clip is the candidate (max: fractions ks of the row's max |w|,
    CLIP_FRACTIONS by default; std: std_clip(w, k) for k in ks, STD_CLIP_KS by default) with the least squared
    error, columns weighted by `weight` (the Hessian diagonal under GPTQ). Returns int8 codes and fp16 scales."""
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    if clip_mode == "max":
        clips = [w.abs().amax(dim=1, keepdim=True) * f for f in ks or CLIP_FRACTIONS]
    else:
        clips = [std_clip(w, k, cap) for k in ks or STD_CLIP_KS]
    weight = torch.ones(w.size(1), device=w.device) if weight is None else weight.float()
    best_err = best_scale = None
    for clip in clips:
        scale = fp16_scale(clip, qmax)
        err = (((w / scale).round().clamp(-qmax, qmax) * scale - w).square() * weight).sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    codes = (w / best_scale).round().clamp(-qmax, qmax).to(torch.int8)
    return codes, best_scale.squeeze(1).half()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, scale: torch.Tensor,
                  group: tuple[int, int, torch.Tensor] | None = None, act_order: bool = False) -> torch.Tensor:
    """GPTQ int8 codes of w on the per-row grid `scale`: columns are rounded in order and each rounding error is
    moved onto the columns not yet rounded through the inverse Hessian, so the output X W^T moves least. `group`
    (first column, width, per-row scale) is a column group rounded at 8 bits on its own grid, in the same solve.
    `act_order` rounds the loudest inputs (largest Hessian diagonal) first, while the most columns are still free
    to absorb their error."""
    qmax = 2 ** (bits - 1) - 1
    step = scale.float().to(w.device)
    first, width, group_step = group if group else (0, 0, None)
    order = (torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(w.size(1))).to(w.device)
    in_group = ((order >= first) & (order < first + width)).tolist()
    w, h = w.float()[:, order], hessian.float().to(w.device)[order][:, order]
    # An input that was always zero leaves its weights free: zero them, and give H a unit diagonal there.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(GPTQ_DAMP * h.diagonal().mean())
    # Row j of the upper Cholesky factor of H^-1 says how column j's error spreads onto the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for b0 in range(0, w.size(1), GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, w.size(1))
        errs = torch.zeros(w.size(0), b1 - b0, device=w.device)
        for j in range(b0, b1):
            s, q = (group_step.float(), 127) if in_group[j] else (step, qmax)
            codes[:, j] = (w[:, j] / s).round().clamp(-q, q)
            errs[:, j - b0] = (w[:, j] - codes[:, j] * s) / u[j, j]
            w[:, j:b1] -= errs[:, j - b0, None] * u[None, j, j:b1]
        # Columns past the block take the whole block's errors in one matrix product: the point of blocking.
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return codes.to(torch.int8)[:, torch.argsort(order)]


@torch.no_grad()
def collect_hessians(model: GPT, batches, embed: bool = False) -> dict[str, torch.Tensor]:
    """Mean x x^T of the input x of every CastedLinear over batches of token ids, keyed by weight name (GPTQ's
    Hessian up to a factor); with `embed` and a tied head also the head's input (the final norm's output), keyed by
    the embedding it multiplies (GPTQ_EMBED). The forward runs as in training (bf16 under autocast), the sums in fp32;
    the mean, not the sum, puts every tensor's diagonal on one scale, which pruning compares across tensors."""
    sums, hooks, tokens = {}, [], 0

    def hook(key: str):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
            with torch.autocast(x.device.type, enabled=False):  # the hook runs inside the model's bf16 autocast
                sums[key] = sums.get(key, 0) + x.T @ x
        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            hooks.append(module.register_forward_hook(hook(f"{name}.weight")))
    if embed and model.lm_head is None:
        head_input = hook("tok_emb.weight")
        hooks.append(model.final_norm.register_forward_hook(lambda module, _, out: head_input(module, (out,), out)))
    try:
        for x in batches:
            model.logits(x)
            tokens += x.numel()
    finally:
        for handle in hooks:
            handle.remove()
    return {key: s / tokens for key, s in sums.items()}


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


def tensor_kind(name: str) -> str:
    """embed, attn or mlp: which bit width (QAT_BITS_*, EMBED_BITS) and CLIP_SIGMAS entry a matrix takes."""
    if name in ("tok_emb.weight", "lm_head.weight", "bigram_emb.weight"):
        return "embed"
    return "attn" if ".attn." in name else "mlp"


def export_bits(name: str, tensor: torch.Tensor, hp: Hyperparameters) -> int:
    """Bit width a tensor is stored at; 16 means plain fp16 (small and control tensors)."""
    kind = tensor_kind(name)
    if kind == "embed":
        return hp.embed_bits
    if name == "bigram_proj.weight" or (tensor.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight")):
        return hp.qat_bits_attn if kind == "attn" else hp.qat_bits_mlp
    return 16


@dataclasses.dataclass
class QuantTensor:
    """One tensor as the artifact stores it: fp16 `values` (bits 16), or int8 `codes` on a per-row grid `scale`,
    with optionally a salient column group from `group` on, at 8 bits on its own per-row grid `group_scale`
    (AWQ_GROUP), and low-rank factors of the quantisation error, W ~ codes * scale + lqer_a^T lqer_b (LQER)."""
    name: str
    shape: list
    bits: int
    values: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    group: int = -1
    group_scale: torch.Tensor | None = None
    lqer: tuple | None = None  # (a codes, a scale, b codes, b scale): rank x out and rank x in, a scale per group
    cost: torch.Tensor | None = None  # per code: squared error of setting its weight to 0 (Hessian-weighted)

    def dequantize(self) -> torch.Tensor:
        if self.bits == 16:
            return self.values.float().view(self.shape)
        w = dequantize_rows(self.codes, self.scale)
        if self.group >= 0:
            width = self.group_scale.numel() and AWQ_WIDTH
            w[:, self.group:self.group + width] = dequantize_rows(self.codes[:, self.group:self.group + width],
                                                                 self.group_scale)
        if self.lqer is not None:
            a_codes, a_scale, b_codes, b_scale = self.lqer
            w += dequantize_groups(a_codes, a_scale).T @ dequantize_groups(b_codes, b_scale)
        return w


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes in as many equal runs (of the flattened tensor) as there are scales: one per row, or per matrix."""
    return (codes.float().view(scale.numel(), -1) * scale.float()[:, None]).view(codes.shape)


AWQ_WIDTH = 64  # columns in a salient group: the frontier records' choice (PR #1908)


def salient_group(w: torch.Tensor, hessian: torch.Tensor, width: int) -> int:
    """First column of the aligned group of `width` input columns that matters most: activation RMS (the root of the
    Hessian diagonal) times mean |w|, summed over the group."""
    saliency = hessian.diagonal().clamp_min(0).sqrt() * w.abs().mean(dim=0)
    return int(saliency[:saliency.numel() // width * width].view(-1, width).sum(1).argmax()) * width


def row_grid(name: str, w: torch.Tensor, bits: int, hp: Hyperparameters, weight: torch.Tensor) -> tuple:
    """Codes and per-row scales of round-to-nearest on the grid `name` exports with. CLIP_SIGMAS fixes k per kind of
    tensor (the records' uncapped k * std). Otherwise the QAT k joins the search, so the grid training converged to is
    always on offer; without the search (CLIP_SEARCH=0) block matrices keep exactly that grid, and k becomes the size
    lever: a wider clip means coarser steps, fewer distinct codes and a smaller artifact. Embeddings always search."""
    k = hp.clip_sigma_map().get(tensor_kind(name))
    if k is not None:
        return quantize_rows(w, bits, "std", weight, (k,), cap=False)
    search = hp.clip_search or not name.startswith(("blocks.", "bigram_proj."))
    if hp.clip_mode == "max":  # QAT trained on the row maximum's grid
        return quantize_rows(w, bits, "max", weight, CLIP_FRACTIONS if search else (1.0,))
    return quantize_rows(w, bits, "std", weight, STD_CLIP_KS * search + (hp.qat_clip_k,))


def quantize_tensor(name: str, tensor: torch.Tensor, bits: int, hp: Hyperparameters,
                    hessian: torch.Tensor | None = None) -> QuantTensor:
    """One tensor at `bits`: per-row clip search, then GPTQ where a Hessian was collected, with the salient column
    group at 8 bits when AWQ_GROUP is on."""
    if bits == 16:
        return QuantTensor(name, list(tensor.shape), 16, values=tensor.detach().cpu().half().flatten())
    w = tensor.detach().float().to(hessian.device if hessian is not None else "cpu")
    weight = hessian.diagonal() if hessian is not None else torch.ones(w.size(1), device=w.device)
    codes, scale = row_grid(name, w, bits, hp, weight)
    group, group_scale = -1, None
    if hessian is not None:
        if hp.awq_group and bits < 8 and w.size(1) >= 2 * AWQ_WIDTH and tensor_kind(name) != "embed":
            group = salient_group(w, hessian, AWQ_WIDTH)
            group_scale = fp16_scale(w[:, group:group + AWQ_WIDTH].abs().amax(dim=1), 127).half()
        codes = gptq_quantize(w, hessian, bits, scale, (group, AWQ_WIDTH, group_scale) if group >= 0 else None,
                              hp.gptq_act_order)
    return QuantTensor(name, list(w.shape), bits, codes=codes.cpu(), scale=scale.cpu(), group=group,
                       group_scale=None if group_scale is None else group_scale.cpu(),
                       cost=(w.square() * weight).cpu())


def add_lqer(tensors: list[QuantTensor], state: dict[str, torch.Tensor], hp: Hyperparameters) -> list:
    """LQER, the records' form: the LQER_TENSORS quantised matrices with the largest quantisation error |E| get a
    rank-LQER_RANK correction, the leading singular directions of E, stored as two low-bit factors and added back at
    load. (A relative, Hessian-weighted choice with 8-bit factors exported 0.5% larger for the same score: the
    paired measure in results/MINIGOLF.md.) Returns the names chosen."""
    scored = []
    for t in tensors:
        if t.bits == 16 or t.lqer is not None:
            continue
        error = state[t.name].detach().float().cpu() - t.dequantize()
        scored.append((float(error.norm()), t, error))
    chosen = sorted(scored, key=lambda item: -item[0])[:hp.lqer_tensors]
    for _, t, error in chosen:
        t.lqer = lqer_factors(error, hp.lqer_rank)
    return [t.name for _, t, _ in chosen]


LQER_ASYM_GROUP = 32  # the #2135 run's LQER_ASYM_GROUP


def lqer_factors(error: torch.Tensor, rank: int) -> tuple:
    """The leading `rank` singular directions of a quantisation error as two factors (rank x out, rank x in), the
    records' asymmetric form: A at 2 bits, codes -2..1 on one grid for the whole factor, and B at 4 bits, codes
    -8..7, a grid per LQER_ASYM_GROUP values; where B's size is no multiple of that, both 8-bit, a grid per row."""
    u, sigma, vh = torch.linalg.svd(error, full_matrices=False)
    a, b = (u[:, :rank] * sigma[:rank]).T.contiguous(), vh[:rank].contiguous()
    if b.numel() % LQER_ASYM_GROUP:
        return (*quantize_rows(a, 8), *quantize_rows(b, 8))
    a_scale = (a.abs().max().clamp_min(1e-10) / 1.5).half().view(1)
    b_scale = (b.view(-1, LQER_ASYM_GROUP).abs().amax(dim=1).clamp_min(1e-10) / 7.5).half()
    a_codes = (a / a_scale.float()).round().clamp(-2, 1).to(torch.int8)
    b_codes = (b.view(-1, LQER_ASYM_GROUP) / b_scale.float()[:, None]).round().clamp(-8, 7).to(torch.int8)
    return a_codes, a_scale, b_codes.view(b.shape), b_scale


@dataclasses.dataclass
class Packed:
    """A quantised state before serialisation; codes and cost are aligned, so pruning is one index operation."""
    table: list  # per tensor: name, shape, bits, [offset, count] of its parts in `codes` and `halves`
    codes: np.ndarray  # int8, all quantised tensors back to back
    halves: np.ndarray  # fp16: per-row scales and the tensors kept in fp16
    cost: np.ndarray  # per code: squared error of setting its weight to 0; LQER factors are never pruned


def pack(tensors: list[QuantTensor]) -> Packed:
    table, codes, halves, cost = [], [], [], []

    def put(parts: list, tensor: torch.Tensor) -> list:
        parts.append(tensor.flatten())
        return [sum(map(len, parts)) - tensor.numel(), tensor.numel()]

    for t in tensors:
        entry = dict(name=t.name, shape=t.shape, bits=t.bits)
        if t.bits == 16:
            entry["values"] = put(halves, t.values)
        else:
            entry.update(codes=put(codes, t.codes), scale=put(halves, t.scale))
            cost.append(t.cost.flatten())
            if t.group >= 0:
                entry.update(group=t.group, group_scale=put(halves, t.group_scale))
            if t.lqer is not None:
                a_codes, a_scale, b_codes, b_scale = t.lqer
                entry["lqer"] = [put(codes, a_codes), put(halves, a_scale), put(codes, b_codes), put(halves, b_scale),
                                 list(a_codes.shape), list(b_codes.shape)]
                cost.append(torch.full((a_codes.numel() + b_codes.numel(),), math.inf))
        table.append(entry)
    return Packed(table, torch.cat(codes).numpy(), torch.cat(halves).numpy(), torch.cat(cost).numpy())


def quantize_state(state: dict[str, torch.Tensor], hp: Hyperparameters,
                   hessians: dict[str, torch.Tensor] | None = None) -> list[QuantTensor]:
    """Every tensor at its export_bits, then LQER factors for the worst-quantised matrices (LQER_RANK > 0)."""
    hessians = hessians or {}
    tensors = [quantize_tensor(name, tensor, export_bits(name, tensor, hp), hp, hessians.get(name))
               for name, tensor in state.items()]
    if hp.lqer_rank:
        add_lqer(tensors, state, hp)
    return tensors


def serialize(p: Packed, shuffle: bool = False) -> bytes:
    """Own format, no pickle: magic, the int8 codes, the fp16 data, a JSON table of contents, its length. Grouping
    the codes keeps their statistics uniform, which the compressor rewards; the table goes last because zstd-22
    carries its statistics from block to block, and text at the start cost 94 KB on a default-size model.
    `shuffle` stores the fp16 data as all low bytes then all high bytes, the smooth sign/exponent bytes in a run."""
    halves = p.halves.view(np.uint8).reshape(-1, 2).T if shuffle else p.halves
    header = json.dumps(dict(tensors=p.table, codes=p.codes.size, shuffle=shuffle)).encode()
    return PAYLOAD_MAGIC + p.codes.tobytes() + halves.tobytes() + header + len(header).to_bytes(4, "little")


def unpack_state(payload: bytes) -> dict[str, torch.Tensor]:
    """The state dict a payload holds. Every offset, count and shape is checked against the data, so a truncated or
    foreign payload is one UserError, never a crash or a silently wrong tensor."""
    if payload[:4] != PAYLOAD_MAGIC:
        raise UserError("artifact payload has no PGQ1 magic: not written by this script")
    try:
        end = len(payload) - 4 - int.from_bytes(payload[-4:], "little")
        header = json.loads(payload[end:-4])
        codes = np.frombuffer(payload, np.int8, header["codes"], 4)
        raw = np.frombuffer(payload, np.uint8, end - 4 - header["codes"], 4 + header["codes"])
        halves = (np.ascontiguousarray(raw.reshape(2, -1).T) if header["shuffle"] else raw).view(np.float16).ravel()

        def read(array: np.ndarray, offset_count: list, shape: list) -> torch.Tensor:
            offset, stored = offset_count
            count = math.prod(shape)
            if stored != count or not 0 <= offset <= array.size - count:
                raise ValueError(f"{count} values expected at {offset}, {stored} declared, {array.size} stored")
            return torch.from_numpy(array[offset:offset + count].copy()).view(shape)

        state = {}
        for e in header["tensors"]:
            shape = [int(n) for n in e["shape"]]
            t = QuantTensor(e["name"], shape, e["bits"])
            if t.bits == 16:
                t.values = read(halves, e["values"], shape)
            else:
                t.codes, t.scale = read(codes, e["codes"], shape), read(halves, e["scale"], shape[:1])
                if "group" in e:
                    t.group, t.group_scale = int(e["group"]), read(halves, e["group_scale"], shape[:1])
                    if not 0 <= t.group <= shape[1] - AWQ_WIDTH:
                        raise ValueError(f"column group at {t.group} outside {shape}")
                if "lqer" in e:
                    a, a_scale, b, b_scale, a_shape, b_shape = e["lqer"]
                    if a_shape[1] != shape[0] or b_shape[1] != shape[1] or a_shape[0] != b_shape[0]:
                        raise ValueError(f"LQER factors {a_shape} x {b_shape} do not fit {shape}")
                    if any(n <= 0 or math.prod(s) % n for n, s in ((a_scale[1], a_shape), (b_scale[1], b_shape))):
                        raise ValueError(f"LQER scales {a_scale[1]}, {b_scale[1]} do not group {a_shape}, {b_shape}")
                    t.lqer = (read(codes, a, a_shape), read(halves, a_scale, [a_scale[1]]), read(codes, b, b_shape),
                              read(halves, b_scale, [b_scale[1]]))
            state[t.name] = t.dequantize()
        return state
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise UserError(f"artifact payload is malformed ({e}); it is truncated or not written by this script") from None


def package(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"this artifact or COMPRESSOR needs the {name} package: pip install {name}") from None


def have_brotli() -> bool:
    try:
        package("brotli")
    except UserError:
        return False
    return True


RANS_BITS, RANS_LOW, RANS_MAX_TABLES, RANS_ROW_CLASSES = 15, 1 << 16, 2048, 4  # lane states stay in [2^16, 2^32)


def payload_header(payload: bytes) -> dict:
    return json.loads(payload[len(payload) - 4 - int.from_bytes(payload[-4:], "little"):-4])


def order0_bytes(x: np.ndarray) -> float:
    p = np.bincount(x.ravel().view(np.uint8))
    p = p[p > 0] / x.size
    return float(-(p * np.log2(p)).sum() * x.size / 8)


def matrix_model(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Side data that makes a matrix's codes cheaper to code: a shift per column (its mean code: a briefly trained
    embedding's columns sit up to +-19 codes off centre) and one of RANS_ROW_CLASSES tables per row, by the spread
    of its shifted codes (its rows range from flat to peaked). Each is kept only where the entropy it saves exceeds
    its own cost, so small matrices keep one table and no shift."""
    shift = np.round(m.mean(0)).clip(-127, 127).astype(np.int8)
    if order0_bytes(m - shift) + m.shape[1] / 2 >= order0_bytes(m):
        shift[:] = 0
    z = m - shift
    spread = z.astype(np.float32).std(1)
    rows = np.searchsorted(np.quantile(spread, np.arange(1, RANS_ROW_CLASSES) / RANS_ROW_CLASSES), spread)
    split = sum(order0_bytes(z[rows == k]) for k in range(RANS_ROW_CLASSES))
    if split + 150 * (RANS_ROW_CLASSES - 1) + m.shape[0] / 4 >= order0_bytes(z):
        rows[:] = 0
    return shift, rows.astype(np.uint8)


def matrices(header: dict) -> list[tuple[int, list]]:
    """Offset and shape of every quantised matrix's codes (not LQER factors), in header order."""
    return [(e["codes"][0], e["shape"]) for e in header["tensors"] if "codes" in e and len(e["shape"]) == 2]


def code_tables(header: dict, row_classes: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Which frequency table codes each code, and how many tables: per quantised matrix one per row class
    (matrix_model), per LQER factor one, since they differ in bit width and spread, and one more for a matrix's
    AWQ group, whose columns sit on an 8-bit grid of their own."""
    n, tables, classes = header["codes"], 1, iter(row_classes)
    tid = np.zeros(n, np.int16)
    for e in header["tensors"]:
        blocks = [e["codes"]] if "codes" in e else []
        for i, (offset, count) in enumerate(blocks + ([e["lqer"][0], e["lqer"][2]] if "lqer" in e else [])):
            if not 0 <= offset <= offset + count <= n:
                raise ValueError(f"code block [{offset}, +{count}) outside the {n} codes")
            if i == 0 and len(e["shape"]) == 2:
                tid[offset:offset + count].reshape(e["shape"])[:] = tables + next(classes)[:, None].astype(np.int16)
                tables += RANS_ROW_CLASSES
            else:
                tid[offset:offset + count], tables = tables, tables + 1
        if "group" in e:
            offset, count = e["codes"]
            tid[offset:offset + count].reshape(e["shape"])[:, e["group"]:e["group"] + AWQ_WIDTH] = tables
            tables += 1
    if tables > RANS_MAX_TABLES:
        raise ValueError(f"{tables} code tables, over {RANS_MAX_TABLES}")
    return tid, tables


def modelled_codes(payload: bytes) -> tuple:
    """Header, codes (each matrix shifted by its matrix_model), models, code_tables: what rans_encode codes."""
    header = payload_header(payload)
    codes, models = np.frombuffer(payload, np.int8, header["codes"], 4).copy(), []
    for offset, shape in matrices(header):
        m = codes[offset:offset + math.prod(shape)].reshape(shape)
        models.append(matrix_model(m))
        m -= models[-1][0]  # int8 arithmetic wraps, so any shift is lossless
    return header, codes, models, *code_tables(header, [rows for _, rows in models])


def rans_encode(payload: bytes) -> bytes:
    """The codes through an interleaved order-0 rANS coder, each matrix shifted and its rows classed by
    matrix_model, a table per code_tables class; the side data, the tables and the rest of the payload (fp16 data,
    header) through lzma. Lane j codes positions j, j + lanes, ..., so each step codes one contiguous row of
    symbols for all lanes at once, as numpy operations."""
    header, codes, models, tid, tables = modelled_codes(payload)
    n = header["codes"]
    lanes = min(4096, max(1, n >> 12))  # more lanes: fewer numpy steps, 4 more bytes of final state each
    sym = codes.view(np.uint8) ^ 128
    counts = np.bincount(tid.astype(np.int64) * 256 + sym, minlength=256 * tables).reshape(tables, 256)
    total = np.maximum(1, counts.sum(1, keepdims=True))
    freq = np.where(counts > 0, np.maximum(1, counts * (1 << RANS_BITS) // total), 0)  # every seen symbol >= 1
    freq[np.arange(tables), freq.argmax(1)] += (1 << RANS_BITS) - freq.sum(1)
    cum = np.cumsum(freq, 1) - freq
    tid, sym = (np.append(a, np.full(-n % lanes, a[-1] if n else 0, a.dtype)).reshape(-1, lanes) for a in (tid, sym))
    x, words = np.full(lanes, RANS_LOW, np.uint64), []
    for s in reversed(range(len(sym))):
        f, c = freq[tid[s], sym[s]].astype(np.uint64), cum[tid[s], sym[s]].astype(np.uint64)
        big = x >= f << (32 - RANS_BITS)
        words.append((x[big] & 0xFFFF).astype("<u2").tobytes())
        x = np.where(big, x >> 16, x)
        x = (x // f << RANS_BITS) + x % f + c
    side = b"".join(shift.tobytes() + rows.tobytes() for shift, rows in models)
    meta = lzma.compress(lanes.to_bytes(2, "little") + len(side).to_bytes(4, "little") + side
                         + freq.astype("<u2").tobytes() + payload[:4] + payload[4 + n:], preset=9 | lzma.PRESET_EXTREME)
    return len(meta).to_bytes(4, "little") + meta + x.astype("<u4").tobytes() + b"".join(reversed(words))


def rans_decode(blob: bytes, limit: int) -> bytes:
    """rans_encode's inverse, bounded by `limit`, the declared payload size: the codes must fit in it, and nothing
    allocated is much larger."""
    size = int.from_bytes(blob[:4], "little")
    meta = lzma.LZMADecompressor().decompress(blob[4:4 + size], 2 * limit + 512 * RANS_MAX_TABLES)
    header, lanes, side = payload_header(meta), int.from_bytes(meta[:2], "little"), int.from_bytes(meta[2:6], "little")
    n, shapes = header["codes"], matrices(header)
    if n > limit or not 1 <= lanes <= 4096 or side != sum(rows + cols for _, (rows, cols) in shapes):
        raise ValueError(f"rANS header ({n} codes, {lanes} lanes, {side} side bytes) does not fit the payload")
    models, at = [], 6
    for _, (rows, cols) in shapes:
        models.append((np.frombuffer(meta, np.int8, cols, at), np.frombuffer(meta, np.uint8, rows, at + cols)))
        at += rows + cols
    if any((classes >= RANS_ROW_CLASSES).any() for _, classes in models):
        raise ValueError("rANS row classes out of range")
    tid, tables = code_tables(header, [classes for _, classes in models])
    freq = np.frombuffer(meta, "<u2", 256 * tables, at).reshape(tables, 256).astype(np.int64)
    if (freq.sum(1) != 1 << RANS_BITS).any():
        raise ValueError("rANS frequency tables do not sum to the precision")
    cum, lookup = np.cumsum(freq, 1) - freq, np.stack([np.repeat(np.arange(256, dtype=np.uint8), f) for f in freq])
    tid = np.append(tid, np.full(-n % lanes, tid[-1] if n else 0, np.int16)).reshape(-1, lanes)
    x = np.frombuffer(blob, "<u4", lanes, 4 + size).astype(np.uint64)
    words = np.frombuffer(blob, "<u2", offset=4 + size + 4 * lanes).astype(np.uint64)
    out, used = np.empty(tid.shape, np.uint8), 0
    for s in range(len(tid)):
        slot = (x & ((1 << RANS_BITS) - 1)).astype(np.int64)
        out[s] = sym = lookup[tid[s], slot]
        x = (freq[tid[s], sym] * (x >> RANS_BITS).astype(np.int64) + slot - cum[tid[s], sym]).astype(np.uint64)
        small = np.flatnonzero(x < RANS_LOW)
        if used + small.size > words.size:
            raise ValueError("rANS stream is truncated")
        x[small] = x[small] << 16 | words[used:used + small.size]
        used += small.size
    codes = (out.ravel()[:n] ^ 128).view(np.int8)
    for (offset, shape), (shift, _) in zip(shapes, models):
        codes[offset:offset + math.prod(shape)].reshape(shape)[:] += shift
    rest = meta[at + 512 * tables:]
    return rest[:4] + codes.tobytes() + rest[4:]


# Per method: its id in the artifact, compress, and decompress(data, n) that stops after about n bytes of output, so a
# hostile artifact cannot make the loader allocate more than its header declares.
COMPRESSORS = {
    "zstd": (0, lambda b: package("zstandard").ZstdCompressor(level=22).compress(b),
             lambda b, n: package("zstandard").ZstdDecompressor().stream_reader(b).read(n)),
    "lzma": (1, lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
             lambda b, n: lzma.LZMADecompressor().decompress(b, n)),
    "zlib": (2, lambda b: zlib.compress(b, 9), lambda b, n: zlib.decompressobj().decompress(b, n)),
    "brotli": (3, lambda b: package("brotli").compress(b, quality=11, lgwin=24),
               lambda b, n: package("brotli").Decompressor().process(b, output_buffer_limit=n)),
    "rans": (4, rans_encode, rans_decode),
}
MAX_PAYLOAD_BYTES = 1 << 28  # a 16 MB artifact unpacks to ~30 MB; anything near this cap is not ours


def encode_artifact(p: Packed, method: str, shuffle: bool = False) -> bytes:
    """Magic, the id of the compressor used, the compressed payload. `best` keeps the smallest of rans, zstd, lzma
    and brotli (brotli only where it is installed: it is not a requirement)."""
    payload = serialize(p, shuffle)
    names = ["rans", "zstd", "lzma"] + ["brotli"] * have_brotli() if method == "best" else [method]
    head = ARTIFACT_MAGIC + len(payload).to_bytes(8, "little")
    return min((head + bytes([COMPRESSORS[n][0]]) + COMPRESSORS[n][1](payload) for n in names), key=len)


def method_name(blob: bytes) -> str:
    return next(name for name, (method_id, *_) in COMPRESSORS.items() if method_id == blob[12])


def quick_size(p: Packed, shuffle: bool = False) -> int:
    """The payload's size under zstd level 3: some 100x faster than the real compressors, and it falls the same way
    when codes are zeroed, so scaled by the real/quick ratio of one payload it steers the fit's searches. Only a
    real encode ever decides that an artifact fits."""
    return len(package("zstandard").ZstdCompressor(level=3).compress(serialize(p, shuffle)))


def prune_to_fit(p: Packed, budget: float, method: str, shuffle: bool = False) -> tuple[bytes, int, int]:
    """The artifact, fitted into `budget` bytes by zeroing the cheapest +-1 codes (p.cost), as few as the search
    finds. Returns it, the count zeroed and the unpruned size; nothing is zeroed when it fits already or when
    zeroing every +-1 code is not enough (the caller reports the size). The search runs on quick_size mapped to the
    real compressor by the line through the last two payloads encoded both ways (the first: the unpruned one and
    zero); each real encode that still comes out over the budget becomes a point of that line, so it takes a few
    real encodes in all (at full size seconds each for rans, about a minute for zstd-22)."""
    blob = encode_artifact(p, method, shuffle)
    if len(blob) <= budget:
        return blob, 0, len(blob)
    method = method_name(blob)  # `best` is settled once; every encode below reuses the winner
    ones = np.flatnonzero(np.abs(p.codes) == 1)
    order = ones[np.argsort(p.cost[ones], kind="stable")]
    if order.size == 0:
        return blob, 0, len(blob)

    def zeroed(n: int) -> Packed:
        codes = p.codes.copy()
        codes[order[:n]] = 0
        return dataclasses.replace(p, codes=codes)

    quick = {0: quick_size(p, shuffle)}

    def estimate(n: int) -> float:
        if n not in quick:
            quick[n] = quick_size(zeroed(n), shuffle)
        return line(known, quick[n])

    known, lo = [(0, 0), (quick[0], len(blob))], 1  # (quick, real) sizes: the real one's estimate is a secant
    while True:
        hi = order.size  # the fewest codes whose estimate fits, by bisection over [lo, order.size]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if estimate(mid) <= budget else (mid + 1, hi)
        if lo == order.size and estimate(lo) > 1.02 * budget:
            return blob, 0, len(blob)  # hopeless by a margin the estimate cannot be that wrong about
        trial = encode_artifact(zeroed(lo), method, shuffle)
        if len(trial) <= budget:
            return trial, lo, len(blob)
        if lo == order.size:
            return blob, 0, len(blob)
        known.append((quick[lo], len(trial)))
        lo = min(lo + 1, order.size)


def line(points: list[tuple[float, float]], x: float) -> float:
    """The line through the last two points, at x (through the last point alone where they share an x)."""
    (xa, ya), (xb, yb) = points[-2:]
    return yb + (x - xb) * (yb - ya) / (xb - xa) if xb != xa else yb


# FIT_TO_LIMIT never takes a matrix below this width. A model that fits only at 2-3 bits scores badly, but the run
# still ends with a score, and its log names every rung: a nearly untrained 11 x 512 model did not fit at 4.
LADDER_MIN_BITS = 2


def quantisation_error(name: str, w: torch.Tensor, bits: int, hp: Hyperparameters,
                       hessian: torch.Tensor | None) -> float:
    """Squared error of round-to-nearest at `bits` on the tensor's export grid, columns weighted by the Hessian
    diagonal: a cheap stand-in for the GPTQ error, good enough to rank which matrix should lose a bit."""
    weight = hessian.diagonal().cpu() if hessian is not None else torch.ones(w.size(1))
    codes, scale = row_grid(name, w, bits, hp, weight)
    return float(((dequantize_rows(codes, scale) - w).square() * weight).sum())


def fit_artifact(tensors: list[QuantTensor], state: dict[str, torch.Tensor], hessians: dict, hp: Hyperparameters,
                 budget: float, log) -> bytes:
    """The artifact, within `budget` bytes if it can be done (FIT_TO_LIMIT's ladder). First the cheapest +-1 codes
    are zeroed (prune_to_fit). If zeroing all of them is not enough, matrices lose one bit at a time, least added
    error per byte saved first (a bit is about numel / 8 bytes), until pruning can close the rest. With Hessians
    only the matrices that have one compete, so errors are compared on one scale. Every step is logged."""
    blob, zeroed, unpruned = prune_to_fit(pack(tensors), budget, hp.compressor, hp.byte_shuffle)
    while len(blob) > budget:
        matrices = [i for i, t in enumerate(tensors) if LADDER_MIN_BITS < t.bits < 16 and len(t.shape) == 2
                    and (not hessians or t.name in hessians)]
        if not matrices:
            break
        priced = []
        for i in matrices:
            t, w, h = tensors[i], state[tensors[i].name].detach().float().cpu(), hessians.get(tensors[i].name)
            added = quantisation_error(t.name, w, t.bits - 1, hp, h) - quantisation_error(t.name, w, t.bits, hp, h)
            priced.append((added / (w.numel() / 8), i))
        saved, over = 0.0, len(blob) - budget
        for _, i in sorted(priced):
            old = tensors[i]
            new = quantize_tensor(old.name, state[old.name], old.bits - 1, hp, hessians.get(old.name))
            if old.lqer is not None:
                new.lqer = lqer_factors(state[old.name].detach().float().cpu() - new.dequantize(), hp.lqer_rank)
            tensors[i], saved = new, saved + new.codes.numel() / 8
            log(f"fit_lower tensor:{old.name} bits:{old.bits}->{new.bits} est_saved:{new.codes.numel() // 8}")
            if saved >= 1.1 * over:
                break
        blob, zeroed, unpruned = prune_to_fit(pack(tensors), budget, hp.compressor, hp.byte_shuffle)
    if zeroed:
        log(f"prune zeroed:{zeroed} bytes_before:{unpruned} bytes_after:{len(blob)}")
    return blob


def write_artifact(path: str, blob: bytes) -> int:
    """Write atomically (temporary name, then rename); returns the size in bytes. On any failure (a full disk, say)
    the temporary file is removed and nothing is left under the artifact's name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write the artifact {path}: {e.strerror or e}") from None
    return len(blob)


def read_artifact(path: str, sha256: str = "") -> dict[str, torch.Tensor]:
    """Magic, declared payload size (8 bytes), compressor id, compressed payload; the size bounds the decompression.
    With `sha256`, the file must be exactly the artifact that hash names (the one this run wrote)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UserError(f"cannot read the artifact {path}: {e.strerror}") from None
    if sha256 and (found := hashlib.sha256(blob).hexdigest()) != sha256:
        raise UserError(f"{path} is not the artifact this run wrote ({len(blob)} bytes, sha256 {found[:16]}, not "
                        f"{sha256[:16]}): another process replaced it")
    methods = {method_id: decompress for method_id, _, decompress in COMPRESSORS.values()}
    if blob[:4] != ARTIFACT_MAGIC or len(blob) < 13 or blob[12] not in methods:
        raise UserError(f"{path} is not a Parameter Golf artifact (bad magic or header); refusing to load it")
    size = int.from_bytes(blob[4:12], "little")
    if size > MAX_PAYLOAD_BYTES:
        raise UserError(f"{path} declares a {size}-byte payload, over the {MAX_PAYLOAD_BYTES}-byte cap; refusing it")
    try:
        payload = methods[blob[12]](blob[13:], size + 1)
    except UserError:
        raise
    except Exception as e:  # each codec has its own error types for corrupt data
        raise UserError(f"{path}: the payload does not decompress ({e})") from None
    if len(payload) != size:
        raise UserError(f"{path}: the payload has {len(payload)} bytes where the header declares {size}; "
                        f"the file is truncated or corrupt")
    return unpack_state(payload)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def plan_windows(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows over target positions 0..num_targets-1 (target t is token t+1 given tokens 0..t).

    Every window holds min(seq_len, num_targets) inputs; the first scores all of its targets, each later one
    ends `stride` further on (the last ends exactly at num_targets) and scores only its new targets, so each
    target is scored exactly once with at least seq_len - stride tokens of context. Returns the window starts
    and, per window, the offset of its first scored target."""
    length = min(seq_len, num_targets)
    ends = np.minimum(np.arange(length, num_targets + stride, stride, dtype=np.int64), num_targets)
    starts = ends - length
    first_scored = np.concatenate(([0], ends[:-1])) - starts
    return starts, first_scored


def document_spans(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per document: its first position in the stream and how many targets it owns. Documents start at position 0
    and at every BOS; a document owns the targets whose context ends inside it, so its last target is the next
    document's BOS (predicting where the text ends) and every target of the stream belongs to exactly one."""
    starts = np.flatnonzero(tokens == BOS_ID)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    counts = np.append(starts[1:], tokens.size - 1) - starts
    return starts[counts > 0], counts[counts > 0]


def plan_document_windows(starts: np.ndarray, counts: np.ndarray, seq_len: int,
                          stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows that score every target exactly once with context from its own document only: plan_windows over each
    document's targets. Returns window starts in the stream, window lengths and first scored offsets."""
    short = counts <= seq_len  # one window each, every target scored: most documents, done without a loop
    parts = [(starts[short], counts[short], np.zeros(short.sum(), np.int64))]
    for begin, count in zip(starts[~short], counts[~short]):
        window_starts, first_scored = plan_windows(int(count), seq_len, stride)
        parts.append((begin + window_starts, np.full(window_starts.size, seq_len), first_scored))
    return tuple(np.concatenate(column).astype(np.int64) for column in zip(*parts))


def window_batch(tokens: torch.Tensor, begins: torch.Tensor, lengths: torch.Tensor, lo: torch.Tensor,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the scored mask of windows of up to `width` tokens from `begins`: a window scores its
    targets from offset `lo` to its length. Positions past a window's end are padding: masked, and causal attention
    keeps them from touching anything that is scored."""
    offsets = torch.arange(width + 1, device=tokens.device)
    window = tokens[(begins[:, None] + offsets).clamp_max(tokens.numel() - 1)]
    scored = (offsets[None, :-1] >= lo[:, None]) & (offsets[None, :-1] < lengths[:, None])
    return window[:, :-1], window[:, 1:], scored


def add_scores(sums: torch.Tensor, losses: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scored: torch.Tensor,
               tables: tuple, begins: torch.Tensor, per_target: torch.Tensor | None) -> None:
    """Add (loss, targets, bytes) of the scored positions to `sums`. With `per_target`, each scored target's loss
    is also written at its stream position, so tests can see exactly what was scored with which weights."""
    losses = losses.detach().double()
    positions = begins[:, None] + torch.arange(x.size(1), device=x.device)
    sums[0] += (losses * scored).sum()
    sums[1] += scored.sum()
    sums[2] += (count_target_bytes(x, y, tables, positions + 1) * scored).sum()
    if per_target is not None:
        per_target[positions[scored]] = losses[scored].to(per_target.dtype)


@torch.no_grad()
def score_windows(model: nn.Module, tokens: torch.Tensor, tables: tuple, starts: np.ndarray, lengths: np.ndarray,
                  first_scored: np.ndarray, batch_tokens: int, sums: torch.Tensor,
                  per_target: torch.Tensor | None = None) -> None:
    """Score windows (stream starts, lengths, first scored offsets) into `sums`, longest first, in batches of at
    most `batch_tokens` tokens (at least one window). A batch is padded to its longest window and to a whole number
    of rows, so windows of one length always make the same shape, the one a compiled model was built for. The plan
    goes to the device once, not batch by batch."""
    order = np.argsort(-lengths, kind="stable")
    starts, lengths, first_scored = starts[order], lengths[order], first_scored[order]
    device_plan = [torch.from_numpy(a).to(tokens.device) for a in (starts, lengths, first_scored)]
    i = 0
    while i < starts.size:
        width = max(2, int(lengths[i]))  # dynamic-shape graphs would specialise on a length of 1
        rows = max(2, batch_tokens // width)
        begins, lens, lo = (a[i:i + rows] for a in device_plan)
        pad = rows - begins.numel()  # empty windows: they score nothing
        begins, lens, lo = (F.pad(a, (0, pad)) for a in (begins, lens, lo))
        x, y, scored = window_batch(tokens, begins, lens, lo, width)
        add_scores(sums, model(x, y, per_token=True), x, y, scored, tables, begins, per_target)
        i += rows


def loss_and_bpb(sums: torch.Tensor, world_size: int) -> tuple[float, float]:
    if world_size > 1:
        dist.all_reduce(sums)
    loss, targets, nbytes = sums.tolist()
    return loss / targets, loss / math.log(2) / nbytes


def evaluate(model: nn.Module, val_tokens: torch.Tensor, tables: tuple, seq_len: int, stride: int,
             batch_tokens: int, rank: int, world_size: int, documents: bool = False,
             per_target: torch.Tensor | None = None) -> tuple[float, float]:
    """Exact val_loss (nats/token) and val_bpb over every target of the validation split: windows over the stream,
    or (`documents`) windows inside each document."""
    if documents:
        starts, lengths, first_scored = plan_document_windows(*document_spans(val_tokens.cpu().numpy()), seq_len,
                                                               stride)
    else:
        starts, first_scored = plan_windows(val_tokens.numel() - 1, seq_len, stride)
        lengths = np.full(starts.size, min(seq_len, val_tokens.numel() - 1))
    mine = np.array_split(np.arange(starts.size), world_size)[rank]
    sums = torch.zeros(3, dtype=torch.float64, device=val_tokens.device)  # loss, targets, bytes
    score_windows(model, val_tokens, tables, starts[mine], lengths[mine], first_scored[mine], batch_tokens, sums,
                  per_target)
    return loss_and_bpb(sums, world_size)


# Test-time training: per-document LoRA, score-first, with optional global phases.

LORA_ALPHA = 144.0  # adapter output scale is alpha / rank, the frontier records' choice (PR #1855: rank 80)
LORA_ROLES = {"attn.c_q": "q", "attn.c_k": "k", "attn.c_v": "v", "attn.proj": "o", "mlp.fc": "mlp",
              "mlp.proj": "mlp", "lm_head": "head"}


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each document's low-rank correction B_d A_d x: x (docs, time, in), a (docs, rank, in), b (docs, out, rank)."""
    return (x @ a.mT) @ b.mT * (LORA_ALPHA / a.size(1))


class DocumentAdapters:
    """Low-rank adapters for test-time training, one per document of a batch, on the linear maps TTT_LORA_TARGETS
    names (q, k, v, o, mlp, head). reset() gives every row the same fresh state: B = 0, so a fresh adapter changes
    nothing; A from one fixed draw; no optimizer state. So each document adapts on its own tokens only, and two
    identical documents score identically."""

    def __init__(self, model: GPT, hp: Hyperparameters, docs: int, device: torch.device):
        roles, rank = set(hp.ttt_lora_targets.split(",")), hp.ttt_lora_rank
        self.model, self.sites = model, []
        for name, module in model.named_modules():
            if isinstance(module, CastedLinear) and LORA_ROLES.get(name.split(".", 2)[-1]) in roles:
                self.sites.append((module, module.in_features, module.out_features))
        if "head" in roles and model.lm_head is None:
            self.sites.append((model, model.tok_emb.embedding_dim, model.tok_emb.num_embeddings))  # the tied head
        generator = torch.Generator().manual_seed(0)
        self.a0 = [((torch.rand(rank, n_in, generator=generator) * 2 - 1) / n_in ** 0.5).to(device)
                   for _, n_in, _ in self.sites]
        self.a = [torch.zeros(docs, rank, n_in, device=device, requires_grad=True) for _, n_in, _ in self.sites]
        self.b = [torch.zeros(docs, n_out, rank, device=device, requires_grad=True) for _, _, n_out in self.sites]
        for t in self.a + self.b:  # fixed shapes: as symbols they would multiply the dynamic graphs' compile time
            torch._dynamo.mark_static(t)
        self.opt = torch.optim.AdamW(self.a + self.b, lr=hp.ttt_lr, betas=(0.0, 0.99), eps=1e-10,
                                     weight_decay=hp.ttt_wd)

    def attach(self) -> None:
        for (site, _, _), a, b in zip(self.sites, self.a, self.b):
            site.lora = (a, b)
        self.reset()

    def detach(self) -> None:
        for site, _, _ in self.sites:
            site.lora = None

    @torch.no_grad()
    def reset(self) -> None:
        for a, a0, b in zip(self.a, self.a0, self.b):
            a.copy_(a0.expand_as(a))
            b.zero_()
        self.opt.state.clear()


def train_on_scored(model: GPT, scorer: nn.Module, tokens: torch.Tensor, starts: np.ndarray, counts: np.ndarray,
                    hp: Hyperparameters, rank: int, world_size: int) -> int:
    """A global TTT phase: one SGD epoch of the base weights on documents that have all been scored already (their
    tokens and the BOS that ends each), in rows of EVAL_SEQ_LEN split over the ranks, one step per
    TTT_GLOBAL_CHUNK_TOKENS (the mean gradient of those rows; the records' 32,768: many small steps adapt more than
    a few large ones), the LR decayed along a cosine. Every step has the same shape, the one the warm-up compiled: the
    last step refills itself from the first rows, and a stream shorter than one row is repeated. Returns the number
    of tokens trained on."""
    stream = torch.cat([tokens[b:b + c + 1] for b, c in zip(starts.tolist(), counts.tolist())])
    seq = hp.eval_seq_len
    stream = stream.repeat(-(-(seq + 1) // stream.numel()))
    rows = (stream.numel() - 1) // seq
    x, y = stream[:rows * seq].view(rows, seq), stream[1:rows * seq + 1].view(rows, seq)
    per_step = max(1, hp.ttt_global_chunk_tokens // (seq * world_size)) * world_size
    steps = -(-rows // per_step)
    params = list(model.parameters())
    model.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=hp.ttt_phase_lr, momentum=0.9)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = hp.ttt_phase_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        mine = torch.arange(step * per_step + rank, (step + 1) * per_step, world_size, device=tokens.device) % rows
        (scorer(x[mine], y[mine], per_token=True).sum() / (per_step * seq)).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world_size > 1:  # every rank brings a gradient for every parameter, zeros for any the forward left unused
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            grads = [f.view_as(p) for f, p in zip(flat.split([p.numel() for p in params]), params)]
        for p, g in zip(params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # one unusual document must not wreck the base weights
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return steps * per_step * seq



def adapt_cost(counts: np.ndarray, hp: Hyperparameters) -> int:
    """Tokens one batch of documents runs through the model under TTT: per chunk, every row padded to the widest
    window."""
    chunk, seq = hp.ttt_chunk_for(int(counts.max())), hp.eval_seq_len
    ends = np.minimum(np.arange(1, -(-int(counts.max()) // chunk) + 1)[:, None] * chunk, counts[None, :])
    return int(hp.ttt_batch_docs * np.minimum(ends, seq).max(axis=1).sum())


def score_cost(counts: np.ndarray, hp: Hyperparameters) -> int:
    """Tokens document windows run through the model to score these documents without adapting."""
    seq, stride = hp.eval_seq_len, hp.eval_stride or hp.eval_seq_len
    windows = 1 + np.maximum(0, -(-(counts - seq) // stride))
    return int(np.where(counts <= seq, counts, windows * seq).sum())


class EvalClock:
    """The evaluation's own timer against EVAL_SECONDS; every rank reads the slowest rank's time, after its device
    has finished what it was given, so all take the same decision at the same point."""

    def __init__(self, seconds: float, agreed):
        self.start, self.seconds, self.agreed = time.perf_counter(), seconds, agreed

    def elapsed(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.agreed(time.perf_counter() - self.start)

    def fits(self, now: float, predicted: float) -> bool:
        """Whether work predicted to take `predicted` seconds from `now` ends inside the budget. Rates measured on a
        loaded 2-core CPU drifted up to 1.3x within one evaluation, and an overrun fails the run while one TTT round
        less costs little, so the plan keeps a quarter of every prediction in hand."""
        return now + 1.25 * predicted <= self.seconds


def evaluate_ttt(model: GPT, scorer: nn.Module, tokens: torch.Tensor, tables: tuple, hp: Hyperparameters,
                 rank: int, world_size: int, clock: EvalClock, rates: dict, log=print,
                 per_target: torch.Tensor | None = None) -> tuple[float, float, dict]:
    """Score-first test-time training in one pass over the documents, longest first, TTT_BATCH_DOCS at a time
    (batches dealt to the ranks in turn, a round at a time). Within a batch each document is cut into chunks of
    TTT_CHUNK_TOKENS targets; a chunk is scored first, by a window of up to EVAL_SEQ_LEN tokens of its own document,
    with the adapters as they are, and only then do the adapters take one step on it. After the first
    TTT_PREFIX_DOCS documents (in TTT_PHASES steps) the base weights also take an SGD epoch on the documents scored
    so far. Adapting and the phases are optional, scoring every target is not: each round and each phase starts only
    if it, and then scoring every later document without adapting, still fits in EVAL_SECONDS. Once a round does
    not, the rest is scored by document windows in full-size batches, the shape whose rate `rates["score"]` holds.
    `rates` holds measured tokens/s per rank for "adapt", "score" and "train"; adapting is predicted from the
    warm-up's rate times how far the last round ran behind it (`slowdown`), a phase from the last phase's measured
    rate. Returns loss, bpb and stats."""
    batch_docs, seq = hp.ttt_batch_docs, hp.eval_seq_len
    starts, counts = document_spans(tokens.cpu().numpy())
    queue = np.argsort(-counts, kind="stable")
    batches = [queue[i:i + batch_docs] for i in range(0, queue.size, batch_docs)]
    prefix = -(-min(hp.ttt_prefix_docs, queue.size) // batch_docs) if hp.ttt_phases else 0
    phase_ends = sorted({max(1, round(prefix * (k + 1) / hp.ttt_phases)) for k in range(hp.ttt_phases)} if prefix
                        else set())
    adapt_tokens = [adapt_cost(counts[b], hp) for b in batches]
    score_tokens = np.array([score_cost(counts[b], hp) for b in batches], dtype=np.float64)
    adapters = DocumentAdapters(model, hp, batch_docs, tokens.device)
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    stats = dict(docs=int(queue.size), docs_adapted=0, phases=0)
    # Rounds of one batch per rank; a round never straddles a phase, so the phases fall at the same documents
    # whatever the number of ranks. `owner` is the rank each batch is dealt to.
    rounds, first = [], 0
    for end in phase_ends + [len(batches)]:
        rounds += [range(start, min(start + world_size, end)) for start in range(first, end, world_size)]
        first = end
    owner = np.concatenate([np.arange(len(r)) for r in rounds]) if rounds else np.zeros(0, np.int64)

    def rest_seconds(first: int) -> float:
        """Scoring batches[first:] without adapting, on the rank with the most of them."""
        share = np.bincount(owner[first:], weights=score_tokens[first:], minlength=world_size)
        return float(share.max()) / rates["score"]

    slowdown, stop = 1.0, len(batches)
    for round_ in rounds:
        now = clock.elapsed()
        predicted = max(adapt_tokens[i] for i in round_) / rates["adapt"]
        need = slowdown * predicted + rest_seconds(round_.stop)
        if not clock.fits(now, need):
            log(f"ttt_stop reason:budget docs_adapted:{stats['docs_adapted']} elapsed_s:{now:.1f} "
                f"needed_s:{need:.1f} slowdown:{slowdown:.2f} budget_s:{clock.seconds:.0f}")
            stop = round_.start
            break
        if round_.start + rank < round_.stop:
            docs = batches[round_.start + rank]
            adapters.attach()
            adapt_batch(scorer, adapters, tokens, tables, starts[docs], counts[docs], hp, sums, per_target)
            adapters.detach()
        slowdown = max(1.0, (clock.elapsed() - now) / predicted)
        stats["docs_adapted"] += sum(len(batches[i]) for i in round_)
        if round_.stop in phase_ends:
            done = np.concatenate(batches[:round_.stop])
            now = clock.elapsed()
            need = counts[done].sum() / (rates["train"] * world_size) + rest_seconds(round_.stop)
            if not clock.fits(now, need):
                log(f"ttt_phase_skipped reason:budget docs:{done.size} elapsed_s:{now:.1f} needed_s:{need:.1f}")
                continue
            trained = train_on_scored(model, scorer, tokens, starts[done], counts[done], hp, rank, world_size)
            took = clock.elapsed() - now
            rates["train"] = trained / world_size / max(took, 1e-9)
            stats["phases"] += 1
            log(f"ttt_phase index:{stats['phases']} docs:{done.size} tokens:{trained} time_ms:{1000 * took:.0f} "
                f"elapsed_s:{clock.elapsed():.1f}")
    if stop < len(batches):
        mine = [batches[i] for i in range(stop, len(batches)) if owner[i] == rank]
        docs = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        now, predicted = clock.elapsed(), rest_seconds(stop)
        score_windows(scorer, tokens, tables, *plan_document_windows(starts[docs], counts[docs], seq,
                                                                      hp.eval_stride or seq),
                      hp.val_batch_size // world_size, sums, per_target)
        log(f"ttt_rest docs:{queue.size - stats['docs_adapted']} predicted_s:{predicted:.1f} "
            f"time_s:{clock.elapsed() - now:.1f} elapsed_s:{clock.elapsed():.1f}")
    return *loss_and_bpb(sums, world_size), stats


def adapt_batch(scorer: nn.Module, adapters: DocumentAdapters, tokens: torch.Tensor, tables: tuple,
                starts: np.ndarray, counts: np.ndarray, hp: Hyperparameters, sums: torch.Tensor,
                per_target: torch.Tensor | None) -> None:
    """Score-first TTT on one batch of documents, chunk by chunk: each chunk is scored by the current adapters,
    then (if its document has a chunk after it) trains them. Rows of documents that have ended score nothing."""
    chunk, seq = hp.ttt_chunk_for(int(counts.max())), hp.eval_seq_len
    pad = hp.ttt_batch_docs - len(starts)  # rows of no document: they score and learn nothing
    begin_host = np.concatenate((starts, np.zeros(pad, np.int64)))
    count_host = np.concatenate((counts, np.zeros(pad, np.int64)))
    begin, count = (torch.from_numpy(a).to(tokens.device) for a in (begin_host, count_host))
    for c in range(-(-int(counts.max()) // chunk)):
        end_host = np.minimum((c + 1) * chunk, count_host)
        width = int(max(2, (end_host - np.maximum(0, end_host - seq)).max()))
        end = count.clamp_max((c + 1) * chunk)
        lo = (end - seq).clamp_min(0)
        x, y, scored = window_batch(tokens, begin + lo, end - lo, c * chunk - lo, width)
        learn = bool((count_host > (c + 1) * chunk).any())
        with torch.set_grad_enabled(learn):
            losses = scorer(x, y, per_token=True)
        add_scores(sums, losses, x, y, scored, tables, begin + lo, per_target)
        if learn:
            # Score first, then learn: the step below only ever sees targets that were just scored. A document's
            # last chunk teaches nothing (no later chunk of it is left), so it is left out of the loss.
            teach = scored & (count > (c + 1) * chunk)[:, None]
            per_doc = (losses * teach).sum(1) / teach.sum(1).clamp_min(1)
            per_doc.sum().backward()
            adapters.opt.step()
            adapters.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------


class Logger:
    """One event per line of `key:value` pairs, to stdout and logs/<RUN_ID>.txt (rank 0 only). The log of an earlier
    run with the same RUN_ID is kept, renamed to logs/<RUN_ID>.txt.<n>."""

    def __init__(self, run_id: str, enabled: bool):
        self.enabled, self.path, self.kept = enabled, os.path.join("logs", f"{run_id}.txt"), ""
        if not enabled:
            return
        try:
            os.makedirs("logs", exist_ok=True)
            if os.path.exists(self.path):
                self.kept = next(name for name in (f"{self.path}.{n}" for n in itertools.count(1))
                                 if not os.path.exists(name))
                os.replace(self.path, self.kept)
            with open(__file__, "rb") as f:
                code = f.read()
            with open(self.path, "wb") as f:
                f.write(f"code_begin bytes:{len(code)} sha256:{hashlib.sha256(code).hexdigest()}\n".encode())
                f.write(code + b"\ncode_end\n")
        except OSError as e:
            raise UserError(f"cannot write the log {self.path}: {e.strerror}; run from a writable folder") from None

    def __call__(self, line: str) -> None:
        if self.enabled:
            if not self.append(line):
                raise UserError(f"cannot write the log {self.path} (a full or read-only disk?): free space there "
                                f"and rerun; the log ends before this line: {line.split(' ', 1)[0]}")
            print(line, flush=True)

    def append(self, line: str) -> bool:
        """Write the whole line to the log file, or nothing: a line cut short by a full disk is cut off again, so the
        log never holds half a claim. The screen sees a line only once the file has it."""
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "ab") as f:
                f.write((line + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            return False


@contextlib.contextmanager
def claim_run(hp: Hyperparameters):
    """Hold the run's name while it runs: a second run with the same RUN_ID, started meanwhile, would overwrite its
    artifact and mix its log. An flock dies with its process, so a crash never leaves the name held; the lock files
    go when the run ends, and a run that finds its lock file removed under it (the last holder leaving) takes anew.
    Yields whether it holds the name: without flock (Windows) a run goes on unguarded."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    held = []
    try:
        for folder in {os.path.realpath(f) for f in ("logs", hp.artifact_dir)}:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{hp.run_id}.lock")
            while not held or held[-1].name != path:
                f = open(path, "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise UserError(f"RUN_ID={hp.run_id} is in use by another run (it holds {path}): wait for it or "
                                    f"choose another RUN_ID") from None
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                        held.append(f)
                        continue
                f.close()
        yield True
    finally:
        for f in held:
            with contextlib.suppress(OSError):
                os.remove(f.name)
            f.close()


def check_writable(folder: str) -> None:
    """Fail at start-up, not after the whole training budget, when the artifact could not be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"ARTIFACT_DIR={folder} is not a writable folder ({e.strerror})") from None


def check_compiler(hp: Hyperparameters) -> None:
    """torch.compile on a CPU builds C++ kernels: without a compiler it would fail at the first step, so say so now."""
    if hp.compile and not torch.cuda.is_available() and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise UserError("COMPILE=1 on a CPU needs a C++ compiler (g++ or clang++) for torch.compile: install one "
                        "or set COMPILE=0")


def cpu_has_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision(hp: Hyperparameters, device: torch.device) -> str:
    """`bf16`, or `fp32 reason:...`. CUDA always computes in bf16. On a CPU, COMPILE=1 rehearses the GPU path
    (inductor and bf16) where the CPU has bf16 natively; without it (AVX2 only) a bf16 matmul runs 12-75x slower
    than fp32, compiled or not, so it compiles in fp32. COMPILE=0 is the plain fp32 eager path."""
    if device.type == "cuda":
        return "bf16"
    if not hp.compile:
        return "fp32 reason:compile_0"
    return "bf16" if cpu_has_bf16() else "fp32 reason:no_native_bf16"


def uses_bf16(hp: Hyperparameters, device: torch.device) -> bool:
    return precision(hp, device) == "bf16"


def setup_distributed() -> tuple[int, int, torch.device]:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # Pin SDPA to the flash kernel (see attention_kernel); everything attends in bf16.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_flash_sdp(True)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def check_manifest(data_path: str) -> None:
    """Where the data tool left a manifest.json listing the shards, the val split (its token shards and byte
    sidecars) must be exactly the one it lists: a val shard cut short, swapped or missing would otherwise score a
    subset and report it as the whole."""
    val_files = glob.glob(os.path.join(data_path, "fineweb_val_*.bin"))
    path = os.path.join(data_path, "manifest.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            listed = json.load(f).get("shards") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); rebuild the dataset or remove it") from None
    expected = {name: entry for name, entry in listed.items() if name.startswith("fineweb_val_")}
    found = {os.path.basename(f): f for f in val_files}
    if expected and set(expected) != set(found):
        raise UserError(f"{data_path}: val shards {sorted(found)} are not the {sorted(expected)} its manifest.json "
                        f"lists; rebuild or re-download the dataset")
    for name, entry in expected.items():
        with open(found[name], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        count = shard_token_count(found[name])
        if count != entry.get("tokens") or digest != entry.get("sha256"):
            raise UserError(f"{found[name]}: {count} tokens, sha256 {digest[:16]}, but manifest.json lists "
                            f"{entry.get('tokens')} tokens, sha256 {str(entry.get('sha256'))[:16]}; the val split "
                            f"was changed: rebuild or re-download the dataset")


def load_validation(hp: Hyperparameters, device: torch.device) -> torch.Tensor:
    files = shard_files(hp.data_path, "val")
    check_manifest(hp.data_path)
    tokens = np.concatenate([read_shard(f, hp.vocab_size) for f in files])
    if tokens.size < 2:
        raise UserError(f"validation split in {hp.data_path} has {tokens.size} tokens; need at least 2")
    return torch.from_numpy(tokens.astype(np.int64)).to(device)


def load_byte_sidecar(hp: Hyperparameters, sp: spm.SentencePieceProcessor, n_tokens: int,
                      device: torch.device) -> torch.Tensor | None:
    """Per val token, the bytes of the original text it stands for: CaseOps pieces are of the transformed text."""
    files = sorted(glob.glob(os.path.join(hp.data_path, "fineweb_val_bytes_[0-9]*.bin")))
    if not files:
        if sp.piece_to_id("\ue001") != sp.unk_id():
            raise UserError(f"{hp.tokenizer_path} is a CaseOps tokenizer but {hp.data_path} has no "
                            f"fineweb_val_bytes_*.bin: build it with `python data/prepare.py --caseops`")
        return None
    counts = np.concatenate([read_shard(f, 1 << 16) for f in files])
    if counts.size != n_tokens:
        raise UserError(f"{hp.data_path}: the byte sidecar has {counts.size} entries for {n_tokens} val tokens")
    return torch.from_numpy(counts.astype(np.int32)).to(device)


def load_scoring(hp: Hyperparameters, device: torch.device) -> tuple[torch.Tensor, tuple]:
    """The validation tokens and what counts their bytes: the byte sidecar where one exists, else the tokenizer's
    byte tables."""
    sp = load_tokenizer(hp)
    val_tokens = load_validation(hp, device)
    sidecar = load_byte_sidecar(hp, sp, val_tokens.numel(), device)
    return val_tokens, (sidecar,) if sidecar is not None else tuple(
        torch.from_numpy(t).to(device) for t in build_byte_tables(sp, hp.vocab_size))


def diverged(step: int) -> UserError:
    return UserError(f"training diverged (a non-finite loss or weight by step {step}): lower the learning rates "
                     f"(MATRIX_LR, SCALAR_LR, TIED_EMBED_LR) or set GRAD_CLIP_NORM")


class Trainer:
    """Owns the model, optimizers, EMA and data stream for one run."""

    def __init__(self, hp: Hyperparameters, rank: int, world_size: int, device: torch.device, log: Logger):
        self.hp, self.rank, self.world_size, self.device, self.log = hp, rank, world_size, device, log
        self.model = GPT(hp, bf16=uses_bf16(hp, device)).to(device)
        # The model's autocast region is traced into its graphs, which AOTAutograd (torch <= 2.13) then never caches,
        # so every run traced and partitioned every graph again; its enter and exit depend on their arguments only,
        # which the cache key holds (pytorch/pytorch#191106, fixed upstream the same way).
        for name in ("_enter_autocast", "_exit_autocast"):
            torch._inductor.config.unsafe_marked_cacheable_functions[f"torch.amp.autocast_mode.{name}"] = torch.__version__
        compiled = torch.compile(self.model, dynamic=False, fullgraph=True) if hp.compile else self.model
        ddp_devices = [device.index] if device.type == "cuda" else None
        # The only buffers (rotary frequencies) are equal on every rank: broadcasting them each step is waste.
        self.step_model = (DDP(compiled, device_ids=ddp_devices, broadcast_buffers=False) if world_size > 1
                           else compiled)
        self.eval_model = compiled
        self.optimizers = build_optimizers(self.model, hp, rank, world_size, device.type == "cuda", hp.compile)
        self.accum = hp.accum_steps(world_size)
        self.local_tokens = hp.train_batch_tokens // (world_size * self.accum)
        self.train_files = shard_files(hp.data_path, "train")
        self.loader = TrainLoader(self.train_files, hp.vocab_size, rank, world_size, device)
        # Host-side scalars (the clock) are agreed over gloo so no rank waits on its GPU to decide.
        self.clock_group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None
        self.hessians, self.hessian_ms, self.qat_on = {}, 0.0, False
        self.schedule = hp.seq_schedule()
        self.seq_len = self.schedule[0][0]

    def train_step(self, step: int) -> torch.Tensor:
        hp = self.hp
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(self.local_tokens, self.seq_len)
            if isinstance(self.step_model, DDP):
                self.step_model.require_backward_grad_sync = micro == self.accum - 1
            loss = self.step_model(x, y)
            (loss / self.accum).backward()
            total += loss.detach()
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp.grad_clip_norm)
        warm = min(1.0, step / hp.muon_momentum_warmup_steps) if hp.muon_momentum_warmup_steps > 0 else 1.0
        self.optimizers[0].param_groups[0]["momentum"] = (
            (1 - warm) * hp.muon_momentum_warmup_start + warm * hp.muon_momentum)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / self.accum

    def set_lr(self, multiplier: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * multiplier

    def training_states(self) -> list[tuple[int, bool, bool]]:
        """(sequence length, recurrence on, QAT on) of each stretch of training, in order: each is its own graph."""
        hp, recur = self.hp, self.model.recur
        switches = {start for _, start in self.schedule} | {hp.qat_start_frac, hp.recur_start_frac if recur else 0.0}
        states = []
        for point in sorted(switches):
            state = ([length for length, start in self.schedule if point >= start][-1],
                     recur and point >= hp.recur_start_frac, point >= hp.qat_start_frac)
            if point < 1.0 and state not in states:
                states.append(state)
        return states

    def warm_up_compile(self, tables: tuple) -> None:
        """Run WARMUP_STEPS real steps on training tokens so compilation happens before the clock starts, then
        restore the model, optimizers and data stream exactly as they were. The steps cycle through every state
        training will pass through (sequence length, recurrence, QAT), so every graph is compiled."""
        if self.hp.warmup_steps <= 0:
            return
        model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        snapshots = []
        for opt in self.optimizers:
            snapshots.append(io.BytesIO())
            torch.save(opt.state_dict(), snapshots[-1])
        states = self.training_states()
        for step in range(max(self.hp.warmup_steps, len(states))):  # at least one step in every state
            self.set_state(*states[step % len(states)])
            self.train_step(step)
        self.model.load_state_dict(model_state)
        for snapshot, opt in zip(snapshots, self.optimizers):
            snapshot.seek(0)
            opt.load_state_dict(torch.load(snapshot, weights_only=True))
            opt.zero_grad(set_to_none=True)
        self.loader = TrainLoader(self.train_files, self.hp.vocab_size, self.rank, self.world_size, self.device)
        self.model.eval()
        # Scoring graphs: the pre-export score runs at EVAL_SEQ_LEN in the state training ends in (recurrence on when
        # set); validation during training (VAL_LOSS_EVERY) runs at TRAIN_SEQ_LEN in any state.
        final = (self.hp.eval_seq_len, self.model.recur, states[-1][2])
        shapes = {final} | ({(self.hp.train_seq_len, r, q) for _, r, q in states} if self.hp.val_loss_every else set())
        for seq_len, recur_on, qat_on in sorted(shapes):
            self.set_state(seq_len, recur_on, qat_on)
            warm_up_scorer(self.eval_model, self.hp, tables, seq_len, self.world_size, self.device)
        self.set_state(*states[0])
        self.model.train()
        self.sync()

    def set_state(self, seq_len: int, recur_on: bool, qat_on: bool) -> None:
        self.seq_len, self.model.recur_on, self.qat_on = seq_len, recur_on, qat_on
        self.model.set_qat(qat_on)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def agreed(self, value: float) -> float:
        """The max over ranks of a host scalar, so every rank takes the same decision at the same step."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.clock_group)
        return t.item()

    def calibrate(self) -> None:
        """GPTQ Hessians of the final weights over GPTQ_CALIB_BATCHES batches of a fresh pass over the training
        shards (never validation), averaged over ranks. The loop stopped GPTQ_RESERVE_SECONDS early for this."""
        hp, t = self.hp, time.perf_counter()
        loader = TrainLoader(self.train_files, hp.vocab_size, self.rank, self.world_size, self.device)
        batches = (loader.next_batch(self.local_tokens, hp.train_seq_len)[0] for _ in range(hp.gptq_calib_batches))
        self.hessians = collect_hessians(self.model, batches, hp.gptq_embed)
        if self.world_size > 1:
            for h in self.hessians.values():
                dist.all_reduce(h)
                h /= self.world_size
        self.sync()
        self.hessian_ms = 1000 * (time.perf_counter() - t)

    def validate(self, step: int, val_tokens: torch.Tensor, tables: tuple) -> str:
        hp = self.hp
        self.model.eval()
        val_loss, val_bpb = evaluate(self.eval_model, val_tokens, tables, hp.train_seq_len, hp.train_seq_len,
                                     hp.val_batch_size // self.world_size, self.rank,
                                     self.world_size)
        self.model.train()
        return f"step:{step}/{hp.iterations} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}"

    def train(self, val_tokens: torch.Tensor, tables: tuple) -> tuple[int, float]:
        """The timed loop. Returns the steps taken and the training milliseconds (validation excluded)."""
        hp, log = self.hp, self.log
        params = list(self.model.parameters())
        ema = [p.detach().clone() for p in params] if hp.ema_decay > 0 else None
        finite = torch.ones((), dtype=torch.bool, device=self.device)  # a device flag: no host sync per step
        cap_ms = 1000 * hp.train_seconds
        step, paused_ms, last_ms, switched_at = 0, 0.0, 0.0, 0
        self.sync()
        t0 = time.perf_counter()

        def train_ms() -> float:
            return 1000 * (time.perf_counter() - t0) - paused_ms

        while True:
            elapsed_ms = self.agreed(train_ms())
            # Stop before a step that would end past the cap, so train_s never exceeds it: the next step is taken to
            # last as long as the slowest of the last one and the average, once more for the GPU work the host
            # may still have queued (the loop does not sync each step).
            step_ms = max(elapsed_ms - last_ms, elapsed_ms / step) if step else 0.0
            out_of_time = cap_ms > 0 and step > 0 and elapsed_ms + 2 * step_ms > cap_ms
            last_ms = elapsed_ms
            last = step == hp.iterations or out_of_time
            # Recurrence is always on by the end: the exported model is scored with it whenever RECUR_LAYERS
            # repeats.
            if self.model.recur and not self.model.recur_on and (
                    last or training_progress(step, elapsed_ms, hp) >= hp.recur_start_frac):
                self.model.recur_on = True
                order = self.model.orders[1]
                log(f"recurrence_enabled step:{step} train_time:{elapsed_ms:.0f}ms "
                    f"order:{','.join(map(str, order))} encoder:{len(order) // 2}")
            if hp.val_loss_every > 0 and (step % hp.val_loss_every == 0 or last):
                self.sync()
                pause_start = time.perf_counter()
                line = self.validate(step, val_tokens, tables)
                log(f"{line} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / max(step, 1):.2f}ms")
                paused_ms += 1000 * (time.perf_counter() - pause_start)
            if last:
                if out_of_time and step < hp.iterations:
                    log(f"stopping_early reason:wallclock step:{step}/{hp.iterations} train_time:{elapsed_ms:.0f}ms")
                break
            progress = training_progress(step, elapsed_ms, hp)
            seq_len = [length for length, start in self.schedule if progress >= start][-1]
            if seq_len != self.seq_len:
                self.seq_len, switched_at = seq_len, step
                log(f"seq_len_changed step:{step} seq_len:{seq_len} train_time:{elapsed_ms:.0f}ms "
                    f"rewarm_steps:{hp.seq_change_warmup_steps}")
            if not self.qat_on and progress >= hp.qat_start_frac:
                self.model.set_qat(True)
                self.qat_on = True
                log(f"qat_enabled step:{step} train_time:{elapsed_ms:.0f}ms")
            self.set_lr(lr_multiplier(step, elapsed_ms, hp) * rewarm(step, switched_at, hp))
            loss = self.train_step(step)
            finite &= torch.isfinite(loss)
            if ema is not None:
                # Warmed-up decay: a short run exports what it trained, not mostly its initialisation; after a few
                # thousand steps this is EMA_DECAY, so long runs are unchanged.
                decay = min(hp.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            step += 1
            if step % hp.train_log_every == 0 or step == hp.iterations:
                self.sync()  # The only host sync in the loop, and only on log steps.
                if not finite.item():
                    raise diverged(step)
                now_ms, loss_value = train_ms(), loss.item()
                avg_ms = now_ms / step
                eta_ms = (hp.iterations - step) * avg_ms
                if cap_ms > 0:
                    eta_ms = min(eta_ms, max(cap_ms - now_ms, 0.0))
                log(f"step:{step}/{hp.iterations} train_loss:{loss_value:.4f} train_time:{now_ms:.0f}ms "
                    f"step_avg:{avg_ms:.2f}ms tok_s:{hp.train_batch_tokens * step / (now_ms / 1000):.0f} "
                    f"eta:{eta_ms / 1000:.0f}s")
        self.sync()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
        # A diverged run must stop here, before export: one error line, no artifact, a non-zero exit.
        if not (finite.item() and all(bool(p.isfinite().all()) for p in params)):
            raise diverged(step)
        return step, self.agreed(train_ms())  # the slowest rank's clock, as the stop decision used


def export(hp: Hyperparameters, trainer: Trainer, log: Logger) -> tuple[str, dict]:
    """Quantise, fit and write the artifact on rank 0. Every rank learns whether that failed, so a failure there ends
    the whole job at once instead of leaving the other ranks waiting in the next collective."""
    path = os.path.join(hp.artifact_dir, f"{hp.run_id}.pgz")
    sizes, failure = dict(bytes_model=0, bytes_code=os.path.getsize(__file__)), None
    if trainer.rank == 0:
        try:
            t = time.perf_counter()
            state = trainer.model.state_dict()
            tensors = quantize_state(state, hp, trainer.hessians)
            if hp.gptq:
                log(f"gptq calib_batches:{hp.gptq_calib_batches} hessian_ms:{trainer.hessian_ms:.0f} "
                    f"quant_ms:{1000 * (time.perf_counter() - t):.0f}")
            if hp.lqer_rank:
                log(f"lqer rank:{hp.lqer_rank} tensors:{','.join(t.name for t in tensors if t.lqer is not None)}")
            budget = SIZE_LIMIT - sizes["bytes_code"] if hp.fit_to_limit else math.inf
            blob = fit_artifact(tensors, state, trainer.hessians, hp, budget, log)
            sizes["bytes_model"] = write_artifact(path, blob)
            sizes["bytes_total"] = sizes["bytes_model"] + sizes["bytes_code"]
            sizes["sha256"] = hashlib.sha256(blob).hexdigest()
            log(f"artifact path:{path} bytes_model:{sizes['bytes_model']} bytes_code:{sizes['bytes_code']} "
                f"bytes_total:{sizes['bytes_total']} limit:{SIZE_LIMIT} compressor:{method_name(blob)} "
                f"sha256:{sizes['sha256']} export_ms:{1000 * (time.perf_counter() - t):.0f}")
        except UserError as e:
            failure = e
    if trainer.agreed(float(failure is not None)):
        raise failure or UserError("rank 0 could not export the artifact")
    sizes["bytes_model"] = int(trainer.agreed(float(sizes["bytes_model"])))
    if trainer.world_size > 1:  # every rank checks that it scores the file rank 0 wrote
        shared = [sizes.get("sha256", "")]
        dist.broadcast_object_list(shared, src=0)
        sizes["sha256"] = shared[0]
    sizes["bytes_total"] = sizes["bytes_model"] + sizes["bytes_code"]
    if sizes["bytes_total"] > SIZE_LIMIT and not hp.allow_oversize:
        raise UserError(f"artifact total {sizes['bytes_total']} bytes is over the {SIZE_LIMIT}-byte limit "
                        f"(shrink the model or lower the bit widths; ALLOW_OVERSIZE=1 to continue)")
    if trainer.world_size > 1:
        dist.barrier()
    return path, sizes


def load_artifact_model(hp: Hyperparameters, path: str, device: torch.device, sha256: str = "") -> GPT:
    """A fresh model holding exactly the weights the artifact stores, as the scorer sees them."""
    model = GPT(hp, bf16=uses_bf16(hp, device), qat=False).to(device)
    try:
        model.load_state_dict(read_artifact(path, sha256), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this configuration ({str(e).splitlines()[0]}); run with the "
                        f"settings that wrote it") from None
    model.recur_on = model.recur
    return model.eval()


def final_mode(hp: Hyperparameters) -> str:
    if hp.ttt or hp.doc_eval:
        return "ttt" if hp.ttt else "doc"
    return "sliding" if 0 < hp.eval_stride < hp.eval_seq_len else "roundtrip"


def mode_cost(mode: str, val_tokens: torch.Tensor, hp: Hyperparameters) -> int:
    """Tokens one mode's scoring of every target runs through the model (TTT: without adapting)."""
    seq, stride = hp.eval_seq_len, hp.eval_stride or hp.eval_seq_len
    if mode in ("ttt", "doc"):
        return score_cost(document_spans(val_tokens.cpu().numpy())[1], hp)
    return plan_windows(val_tokens.numel() - 1, seq, stride if mode == "sliding" else seq)[0].size * seq


def score_artifact(hp: Hyperparameters, trainer: Trainer, path: str, sha256: str, val_tokens: torch.Tensor,
                   tables: tuple, log: Logger) -> tuple[dict, float, str]:
    """Score what was written: reload it from disk (checked against the hash written) into a fresh model and
    evaluate, inside EVAL_SECONDS by the evaluation's own clock, which starts before the artifact's first byte is
    read. Scoring every target in the final mode (TTT, document windows DOC_EVAL, sliding or plain windows) is
    never skipped; the plain roundtrip pass that shows the export's cost (beside pre_export_exact) runs only where
    it and the final mode's scoring still fit, and TTT adapts only while the rest still fits (evaluate_ttt).
    Returns the final score, the evaluation milliseconds and the final mode's name."""
    rank, world_size, device = trainer.rank, trainer.world_size, trainer.device
    trainer.sync()
    clock = EvalClock(hp.eval_seconds, trainer.agreed)
    model = load_artifact_model(hp, path, device, sha256).requires_grad_(False)
    # Document windows and TTT chunks come in every length: one dynamic-shape graph per mode, not one per length.
    # Sizes 0 and 1 stay specialised even so (a batch of one document, a one-token chunk: a graph each), so the
    # default limit of 8 graphs per function, a hard failure under fullgraph, is raised. Duck sizing is off: it
    # ties dimensions that happen to be equal when a graph is built (128 windows of 128 tokens), and the first
    # batch where they differ then compiles again, on the evaluation's clock.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch.fx.experimental._config.use_duck_shape = False
    scorer = torch.compile(model, dynamic=True, fullgraph=True) if hp.compile else model
    rates = warm_up_evaluation(model, scorer, hp, tables, rank, world_size, device)
    log(f"eval_warmup_done elapsed_s:{clock.elapsed():.1f} compiled_graphs:{compiled_graphs()}")
    seq, stride, batch = hp.eval_seq_len, hp.eval_stride or hp.eval_seq_len, hp.val_batch_size // world_size

    def report(event: str, loss: float, bpb: float, details: str = "") -> dict:
        trainer.sync()
        log(f"{event} val_loss:{loss:.8f} val_bpb:{bpb:.8f} {details}eval_time_ms:{1000 * clock.elapsed():.0f}")
        return dict(val_loss=loss, val_bpb=bpb)

    mode = final_mode(hp)
    began = clock.elapsed()
    roundtrip_s, final_s = (mode_cost(m, val_tokens, hp) / (rates["score"] * world_size) for m in ("roundtrip", mode))
    if mode == "roundtrip" or clock.fits(began, roundtrip_s + final_s):
        score = report("final_roundtrip_exact", *evaluate(scorer, val_tokens, tables, seq, seq, batch, rank,
                                                          world_size))
        # The warm-up timed one batch of random tokens; this just scored all of val: the budget takes the slower.
        rates["score"] = min(rates["score"], val_tokens.numel() / (world_size * max(clock.elapsed() - began, 1e-9)))
    else:
        log(f"final_roundtrip_skipped reason:budget elapsed_s:{began:.1f} needed_s:{roundtrip_s + final_s:.1f}")
    if mode == "ttt":
        loss, bpb, stats = evaluate_ttt(model, scorer, val_tokens, tables, hp, rank, world_size, clock, rates, log)
        score = report("final_ttt_exact", loss, bpb, f"mode:lora rank:{hp.ttt_lora_rank} chunk:{hp.ttt_chunk_tokens} "
                       f"phases:{stats['phases']}/{hp.ttt_phases} docs_adapted:{stats['docs_adapted']} "
                       f"docs:{stats['docs']} ")
    elif mode == "doc":
        score = report("final_doc_exact", *evaluate(scorer, val_tokens, tables, seq, stride, batch, rank, world_size,
                                                    documents=True), f"stride:{stride} ")
    elif mode == "sliding":
        score = report("final_sliding_exact", *evaluate(scorer, val_tokens, tables, seq, stride, batch, rank,
                                                        world_size), f"stride:{stride} ")
    return score, 1000 * clock.elapsed(), mode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_evaluation(model: GPT, scorer: nn.Module, hp: Hyperparameters, tables: tuple, rank: int,
                       world_size: int, device: torch.device) -> dict:
    """Compile every graph the final evaluation runs (scoring; with TTT also adapting and the global phases) on
    random tokens, never on validation tokens, then time the full-size ones once more: tokens/s per rank, for the
    TTT budget. The evaluation's own functions first run on a few random documents of awkward lengths (1 and 2
    targets, a chunk and one, more than a window): dynamic shapes still specialise sizes 0 and 1, and graphs first
    built on the evaluation's clock once cost a CPU run 20 s past its budget. A global TTT phase runs twice on them
    too (the second timed), and its update is undone: the evaluation starts from the artifact's weights. An eager
    model (COMPILE=0) has nothing to build: each full-size call runs once, timed."""
    seq, stride = hp.eval_seq_len, hp.eval_stride or hp.eval_seq_len
    calls = 2 if hp.compile else 1
    lengths = np.array([seq + stride + 1, hp.ttt_chunk_tokens + 1, 2, 1])
    stream = np.random.default_rng(0).integers(BOS_ID + 1, hp.vocab_size, int(lengths.sum()) + 1)
    stream[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = BOS_ID
    starts, counts = document_spans(stream)
    sums, docs = torch.zeros(3, dtype=torch.float64, device=device), torch.from_numpy(stream).to(device)
    adapters = DocumentAdapters(model, hp, hp.ttt_batch_docs, device) if hp.ttt else None
    if hp.compile:
        # Flex document masks (CUDA) specialise windows of one 128-token block (sdpa builds no more graphs): the
        # document of a chunk and one also goes alone, so its short windows are scored, adapted and only scored.
        for mine in (slice(None), slice(1, 2)):
            score_windows(scorer, docs, tables, *plan_document_windows(starts[mine], counts[mine], seq, stride),
                          hp.val_batch_size // world_size, sums)
            if hp.ttt:
                adapters.attach()
                adapt_batch(scorer, adapters, docs, tables, starts[mine][:hp.ttt_batch_docs],
                            counts[mine][:hp.ttt_batch_docs], hp, sums, None)
                adapters.detach()
    rows = {"score": max(2, hp.val_batch_size // (seq * world_size)), "adapt": hp.ttt_batch_docs}
    tokens = torch.randint(0, hp.vocab_size, (max(rows.values()) * seq + 1,), device=device)
    rates = {}
    if hp.ttt and hp.ttt_phases:
        kept = [p.detach().clone() for p in model.parameters()]
        for attempt in range(calls):
            synchronize(device)
            t = time.perf_counter()
            trained = train_on_scored(model, scorer, docs, starts, counts, hp, rank, world_size)
            synchronize(device)
        rates["train"] = trained / world_size / (time.perf_counter() - t)
        with torch.no_grad():
            for p, k in zip(model.parameters(), kept):
                p.copy_(k)
    for mode in ("score", "adapt") if hp.ttt else ("score",):
        begins = torch.arange(rows[mode], device=device) * seq
        x, y, _ = window_batch(tokens, begins, torch.full_like(begins, seq), torch.zeros_like(begins), seq)
        for attempt in range(calls):  # the first of two compiles, the last is timed
            synchronize(device)
            t = time.perf_counter()
            if mode == "score":
                with torch.no_grad():
                    scorer(x, y, per_token=True)
            else:
                adapters.attach()
                scorer(x, y, per_token=True).mean().backward()
                adapters.detach()
            synchronize(device)
        rates[mode] = x.numel() / (time.perf_counter() - t)
    return rates


def warm_up_scorer(scorer: nn.Module, hp: Hyperparameters, tables: tuple, seq_len: int, world_size: int,
                   device: torch.device) -> None:
    """Compile the in-memory model's scoring graph through the scoring code itself (same shapes, same strides) on
    random tokens, never on validation tokens."""
    batch_tokens = hp.val_batch_size // world_size
    tokens = torch.randint(0, hp.vocab_size, (max(2, batch_tokens // seq_len) * seq_len + 1,), device=device)
    starts, first_scored = plan_windows(tokens.numel() - 1, seq_len, seq_len)
    score_windows(scorer, tokens, tables, starts, np.full(starts.size, seq_len), first_scored, batch_tokens,
                  torch.zeros(3, dtype=torch.float64, device=device))


SIZE_LIMIT = 16_000_000
TIME_LIMIT_S = 600


def compliance_line(bytes_total: int, train_ms: float, eval_ms: float, eval_limit: float, mode: str,
                    val_tokens: torch.Tensor) -> str:
    """The challenge's limits next to what this run used, and a fingerprint of exactly which tokens were scored. The
    evaluation is held to `eval_limit`: EVAL_SECONDS where that is below the challenge's limit."""
    digest = hashlib.sha256(val_tokens.cpu().numpy().astype("<u2").tobytes()).hexdigest()[:16]
    ok = lambda used, limit: int(used <= limit)  # noqa: E731
    return (f"compliance bytes_total:{bytes_total} bytes_limit:{SIZE_LIMIT} bytes_ok:{ok(bytes_total, SIZE_LIMIT)} "
            f"train_s:{train_ms / 1000:.1f} train_ok:{ok(train_ms / 1000, TIME_LIMIT_S)} "
            f"eval_s:{eval_ms / 1000:.1f} eval_budget_s:{eval_limit:g} eval_ok:{ok(eval_ms / 1000, eval_limit)} "
            f"eval_mode:{mode} val_tokens:{val_tokens.numel()} val_sha256:{digest}")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process: each is a compilation, so tests and logs pin the count."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def log_setup(hp: Hyperparameters, log: Logger, world_size: int, device: torch.device) -> None:
    device_name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    log(f"env python:{platform.python_version()} torch:{torch.__version__} platform:{platform.platform()} "
        f"device:{device.type} device_name:{device_name} world_size:{world_size} "
        f"backend:{dist.get_backend() if dist.is_initialized() else 'none'}")
    if log.kept:
        log(f"log_kept previous:{log.kept}")
    for f in dataclasses.fields(hp):
        log(f"hparam {f.name.upper()}:{getattr(hp, f.name)}")
    log(f"runtime compile:{int(hp.compile)} autocast:{precision(hp, device)} "
        f"attention:{attention_kernel(device, hp.doc_attention)}")


def main() -> None:
    log, lead = None, int(os.environ.get("RANK", 0)) == 0
    try:
        hp = Hyperparameters.from_env()
        hp.validate(int(os.environ.get("WORLD_SIZE", 1)))
        check_writable(hp.artifact_dir)
        check_compiler(hp)
        with claim_run(hp) if lead else contextlib.nullcontext(True) as claimed:
            log = Logger(hp.run_id, lead)
            if not claimed:
                log("run_lock held:0 reason:no_fcntl")
            rank, world_size, device = setup_distributed()
            log_setup(hp, log, world_size, device)
            run(hp, rank, world_size, device, log)
    except UserError as e:
        # One line, from rank 0 only: every rank takes the same decisions, so the others would only repeat it. It goes
        # to the log and the screen, or to stderr where the log cannot take it (writing the log may be what failed).
        if lead:
            logged = log is not None and os.path.exists(log.path) and log.append(f"error: {e}")
            print(f"error: {e}", file=sys.stdout if logged else sys.stderr, flush=True)
        sys.exit(2)
    if dist.is_initialized():
        dist.barrier()  # rank 0 finishes last (it writes the artifact and logs); peers must not hang up first
        dist.destroy_process_group()


def run(hp: Hyperparameters, rank: int, world_size: int, device: torch.device, log: Logger) -> None:
    """The recipe: data, model, compile warm-up, timed training, export, roundtrip score."""
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    val_tokens, tables = load_scoring(hp, device)
    n_bytes = int(count_target_bytes(val_tokens[:-1], val_tokens[1:], tables,
                                     torch.arange(1, val_tokens.numel(), device=device)).sum())
    log(f"val_data tokens:{val_tokens.numel()} targets:{val_tokens.numel() - 1} bytes:{n_bytes} "
        f"targets_per_byte:{(val_tokens.numel() - 1) / n_bytes:.10f}")
    trainer = Trainer(hp, rank, world_size, device, log)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model params:{n_params} layers:{hp.num_layers} dim:{hp.model_dim} heads:{hp.num_heads} "
        f"kv_heads:{hp.num_kv_heads} grad_accum:{trainer.accum} local_batch_tokens:{trainer.local_tokens} "
        f"val_tokens:{val_tokens.numel()}")
    t = time.perf_counter()
    trainer.warm_up_compile(tables)
    log(f"warmup_done steps:{hp.warmup_steps} time_ms:{1000 * (time.perf_counter() - t):.0f} "
        f"compiled_graphs:{compiled_graphs()}")
    steps, train_ms = trainer.train(val_tokens, tables)
    if hp.gptq:
        trainer.calibrate()
        train_ms += trainer.hessian_ms
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    log(f"train_done step:{steps} train_time:{train_ms:.0f}ms peak_mem_mib:{peak:.0f}")
    pre_loss, pre_bpb = evaluate(trainer.eval_model, val_tokens, tables, hp.eval_seq_len, hp.eval_seq_len,
                                 hp.val_batch_size // world_size, rank, world_size)
    # With QAT on at the end, the in-memory model is scored through its fake quantisation: say so.
    log(f"pre_export_exact val_loss:{pre_loss:.8f} val_bpb:{pre_bpb:.8f} fake_quant:{int(trainer.qat_on)}")
    path, sizes = export(hp, trainer, log)
    score, eval_ms, mode = score_artifact(hp, trainer, path, sizes["sha256"], val_tokens, tables, log)
    if not all(math.isfinite(v) for v in score.values()):
        raise UserError(f"the final score is not finite (val_loss:{score['val_loss']}): the evaluation diverged "
                        f"(TTT_LR, TTT_PHASE_LR too high?); the artifact {path} is intact")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    log(f"compile graphs:{compiled_graphs()} graph_breaks:{breaks}")
    budget = min(hp.eval_seconds, TIME_LIMIT_S)
    log(compliance_line(sizes["bytes_total"], train_ms, eval_ms, budget, mode, val_tokens))
    log(f"final_submission val_loss:{score['val_loss']:.8f} val_bpb:{score['val_bpb']:.8f} "
        f"bytes_total:{sizes['bytes_total']} bytes_model:{sizes['bytes_model']} "
        f"bytes_code:{sizes['bytes_code']} train_time_ms:{train_ms:.0f} eval_time_ms:{eval_ms:.0f}")
    if eval_ms / 1000 > budget:
        raise UserError(f"the evaluation took {eval_ms / 1000:.1f} s, over its {budget:g} s budget (EVAL_SECONDS; "
                        f"scoring every target alone did not fit): the score above does not meet the evaluation limit")


if __name__ == "__main__":
    main()
