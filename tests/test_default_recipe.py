"""The default recipe end to end: every technique at its default value, only the dimensions shrunk to CPU size."""
import dataclasses
import math
import os

import pytest

import train_gpt as tg
from conftest import parse_line, run_train

pytestmark = pytest.mark.slow  # runs train_gpt.py end to end (README: the quick tier)

# Only sizes, step counts and the evaluation's batch sizes change; the block indices (RECUR_LAYERS, PARALLEL_START,
# XSA_LAST_N) keep their defaults, so the model keeps the default's 11 blocks.
SHRUNK = dict(MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048",
              ITERATIONS="20", WARMUP_STEPS="0", WARMDOWN_FRAC="0.75", MUON_MOMENTUM_WARMUP_STEPS="5",
              MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="10", VAL_BATCH_SIZE="8192", EVAL_STRIDE="32",
              GPTQ_CALIB_BATCHES="2", TTT_LORA_RANK="4", TTT_CHUNK_TOKENS="32", TTT_BATCH_DOCS="8",
              TTT_PREFIX_DOCS="24", COMPILE="0", OMP_NUM_THREADS="1")
RUN_SETTINGS = {"DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "RUN_ID"}


@pytest.fixture(scope="module")
def recipe_run(tiny_dataset, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("recipe")
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(SHRUNK, DATA_PATH=str(tiny_dataset.path), TOKENIZER_PATH=str(tiny_dataset.tokenizer),
               VOCAB_SIZE=str(tiny_dataset.vocab_size), RUN_ID="recipe")
    result = run_train(cwd, env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_setting_but_the_shrunk_ones_is_at_its_default(recipe_run):
    logged = {line.split()[1].split(":", 1)[0]: line.split(":", 1)[1] for line in recipe_run.splitlines()
              if line.startswith("hparam ")}
    for f in dataclasses.fields(tg.Hyperparameters):
        name = f.name.upper()
        if name not in SHRUNK and name not in RUN_SETTINGS and name not in ("EVAL_SEQ_LEN", "ROPE_DIMS"):
            assert logged[name] == str(f.default), name
    assert logged["ROPE_DIMS"] == "4"  # follows the head: a quarter of its 16 dims (16 of 64 at full size)


def test_the_recipe_trains_exports_within_the_limit_and_scores_with_its_evaluation(recipe_run):
    line = parse_line(recipe_run, "compliance")
    assert line["bytes_ok"] == line["train_ok"] == line["eval_ok"] == "1"
    final = parse_line(recipe_run, "final_submission")
    assert recipe_run.strip().splitlines()[-1].startswith("final_submission ")
    mode = {"ttt": "final_ttt_exact", "doc": "final_doc_exact", "sliding": "final_sliding_exact"}[line["eval_mode"]]
    assert float(final["val_bpb"]) == float(parse_line(recipe_run, mode)["val_bpb"])


def test_the_recipe_learns(recipe_run, tiny_dataset):
    roundtrip = float(parse_line(recipe_run, "final_roundtrip_exact")["val_loss"])
    assert roundtrip < math.log(tiny_dataset.vocab_size) - 1.0  # 20 steps learn well past the uniform guess


def test_the_recipe_unrolls_the_records_recurrence_at_its_fraction(recipe_run):
    # Blocks 3,4,5 three times in all (the #1855 record's form): 17 entries, the first 8 the U-Net encoder.
    line = parse_line(recipe_run, "recurrence_enabled")
    assert (line["step"], line["order"], line["encoder"]) == ("7", "0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10", "8")
