"""Shared fixtures: a tiny real-text dataset in the challenge format, built once per pytest session."""
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # A worker per core (pytest.ini): each computes on one thread, and so do the runs it starts, or two workers'
    # OpenMP threads would fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_VOCAB = 512


def stdlib_documents(limit_chars: int) -> list[str]:
    """Docstrings of standard-library modules, classes and methods: real English on every Python install."""
    import importlib
    names = ("collections", "json", "textwrap", "argparse", "pathlib", "functools", "itertools", "random", "string",
             "datetime", "decimal", "fractions", "statistics", "email.message", "http.client", "logging",
             "subprocess", "tarfile", "zipfile", "unittest.case", "asyncio.events", "inspect", "enum", "shutil")
    docs, seen = [], set()
    for name in names:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            members = [obj] + [m for _, m in sorted(vars(obj).items())] if isinstance(obj, type) else [obj]
            for member in members:
                doc = inspect.getdoc(member) if callable(member) or isinstance(member, type) else None
                if doc and len(doc) > 150 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
                    limit_chars -= len(doc)
                    if limit_chars <= 0:
                        return docs
    return docs


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 1, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Real text, a BPE tokenizer trained on the spot (byte fallback), ~20% of documents as val."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    docs = stdlib_documents(400_000)
    (root / "corpus.txt").write_text("\n".join(d.replace("\n", " ") for d in docs))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=TINY_VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=2,
        bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    n_val = max(4, len(docs) // 5)
    encode = lambda ds: np.concatenate([[1] + sp.encode(d) for d in ds]).astype(np.uint16)  # noqa: E731
    write_shard(root / "fineweb_val_000000.bin", encode(docs[:n_val]))
    write_shard(root / "fineweb_train_000000.bin", encode(docs[n_val:]))
    return types.SimpleNamespace(path=root, tokenizer=root / "tokenizer.model", vocab_size=TINY_VOCAB, docs=docs,
                                 n_val=n_val)


# The plain model: every technique of the default recipe off, so a test sees only what it switches on (and the
# recipe's block indices, e.g. RECUR_LAYERS=3,4,5, need not fit its few layers). test_default_recipe.py runs the
# recipe itself.
PLAIN = dict(xsa_last_n=0, parallel_start=-1, recur_layers="", smear=False, skip_gates=False, attn_gate=False,
             muon_ns="classic", muon_row_norm=False, muon_wd=0.04, min_lr_frac=0.0, qat_bits_mlp=5,
             embed_bits=8, clip_mode="max", gptq=False, byte_shuffle=False, doc_eval=False, ttt=False,
             qat_start_frac=0.85, qk_gain_init=1.5, rope_dims=0, ln_scale=False, awq_group=False,
             lqer_rank=0, ortho_init=False, scalar_wd=0.0, asym_logit=False, doc_attention=False)


def plain_env() -> dict:
    return {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in PLAIN.items()}


def plain_hp(**overrides):
    import train_gpt as tg
    return tg.Hyperparameters(**{**PLAIN, **overrides})


def small_hp(**overrides):
    """A model small enough to build and run in milliseconds, with GQA and a U-Net of two skips."""
    base = dict(vocab_size=97, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)
    return plain_hp(**{**base, **overrides})


def randomised(model, seed=0):
    """The model with every parameter redrawn at a scale where each part visibly matters, in eval mode."""
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def byte_tables(vocab: int) -> tuple:
    """Byte tables where every token is one byte and nothing is a boundary: bpb = loss / ln 2 per token."""
    return (torch.ones(vocab, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool),
            torch.zeros(vocab, dtype=torch.bool))


def tiny_env(dataset, run_id: str, **overrides) -> dict:
    """Environment for a CPU run of train_gpt.py with a model small enough for tests."""
    env = {**os.environ, **plain_env()}
    env.update(DATA_PATH=str(dataset.path), TOKENIZER_PATH=str(dataset.tokenizer),
               VOCAB_SIZE=str(dataset.vocab_size), NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
               MLP_MULT="2", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048", ITERATIONS="40", WARMUP_STEPS="0",
               WARMDOWN_FRAC="0.25", VAL_BATCH_SIZE="8192", TTT_GLOBAL_CHUNK_TOKENS="2048",
               TRAIN_LOG_EVERY="10", MAX_WALLCLOCK_SECONDS="0",
               EVAL_STRIDE="32", MATRIX_LR="0.04", TIED_EMBED_LR="0.05", SCALAR_LR="0.04", EMA_DECAY="0.9",
               QAT_START_FRAC="0.5", COMPILE="0", RUN_ID=run_id, OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_train(cwd: Path, env: dict, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    return subprocess.run(cmd + [str(REPO / "train_gpt.py")], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def parse_line(text: str, event: str) -> dict:
    """The key:value pairs of the last line that starts with `event`."""
    lines = [line for line in text.splitlines() if line.startswith(event + " ") or line.startswith(event + ":")]
    assert lines, f"no {event} line in output:\n{text[-3000:]}"
    return dict(tok.split(":", 1) for tok in lines[-1].split() if ":" in tok)


# Fixtures that run train_gpt.py or build a dataset end to end: a test that uses one is in the slow tier
# (pytest.ini), whatever it checks itself.
SLOW_FIXTURES = {"real_runs", "plain_and_packed_runs", "gptq_run", "two_rank_run", "recipe_run", "caseops_demo",
                 "proxy_val_with_record_tokenizer"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
