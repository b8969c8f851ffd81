"""Whole runs of train_gpt.py on CPU: the real launcher, a real artifact on disk, a parsable score."""
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg
from conftest import parse_line, run_train, tiny_env

pytestmark = pytest.mark.slow  # runs train_gpt.py end to end (README: the quick tier)

ROUNDTRIP_TOLERANCE_BPB = 0.02  # int6 blocks + int8 embedding after QAT, on a 150k-parameter model


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two_rank")
    # Score-first TTT is on so its distributed path (batches dealt to ranks, averaged phase gradients) runs too.
    result = run_train(cwd, tiny_env(tiny_dataset, "tworank", WARMUP_STEPS=2, TTT=1, TTT_LORA_RANK=4,
                                     TTT_CHUNK_TOKENS=16, TTT_BATCH_DOCS=8, TTT_PREFIX_DOCS=24, TTT_PHASES=2), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result.stdout


def test_two_rank_run_ends_with_a_parsable_final_submission_line(two_rank_run):
    _, out = two_rank_run
    last = out.strip().splitlines()[-1]
    assert last.startswith("final_submission ")
    fields = parse_line(out, "final_submission")
    assert set(fields) == {"val_loss", "val_bpb", "bytes_total", "bytes_model", "bytes_code", "train_time_ms",
                           "eval_time_ms"}
    assert int(fields["bytes_total"]) == int(fields["bytes_model"]) + int(fields["bytes_code"])
    assert int(fields["bytes_code"]) == (Path(tg.__file__)).stat().st_size
    assert float(fields["val_bpb"]) == float(parse_line(out, "final_ttt_exact")["val_bpb"])


def test_ttt_adapts_every_document_runs_its_phases_and_improves_on_the_roundtrip_score(two_rank_run):
    _, out = two_rank_run
    ttt = parse_line(out, "final_ttt_exact")
    assert ttt["docs_adapted"] == ttt["docs"] and ttt["phases"] == "2/2"
    assert [int(parse_line(line, "ttt_phase")["docs"]) for line in out.splitlines() if line.startswith("ttt_phase ")] \
        == [16, 24]  # 3 prefix batches of 8 documents, split into 2 phases at batches 2 and 3
    assert 0 < float(parse_line(out, "final_roundtrip_exact")["val_bpb"]) - float(ttt["val_bpb"]) < 0.3


def test_compliance_line_reports_limits_and_the_scored_tokens(two_rank_run, tiny_dataset):
    _, out = two_rank_run
    line = parse_line(out, "compliance")
    val = np.fromfile(tiny_dataset.path / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    assert line["val_sha256"] == hashlib.sha256(val.tobytes()).hexdigest()[:16]
    assert line["bytes_ok"] == line["train_ok"] == line["eval_ok"] == "1" and line["eval_mode"] == "ttt"
    assert int(line["bytes_total"]) == int(parse_line(out, "final_submission")["bytes_total"])


def test_artifact_on_disk_is_what_was_scored(two_rank_run):
    cwd, out = two_rank_run
    artifact = parse_line(out, "artifact")
    assert (cwd / artifact["path"]).stat().st_size == int(artifact["bytes_model"])
    assert hashlib.sha256((cwd / artifact["path"]).read_bytes()).hexdigest() == artifact["sha256"]
    assert not list((cwd / "artifacts").glob("*.tmp*"))


def test_roundtrip_score_is_close_to_the_pre_export_score(two_rank_run):
    _, out = two_rank_run
    pre = float(parse_line(out, "pre_export_exact")["val_bpb"])
    post = float(parse_line(out, "final_roundtrip_exact")["val_bpb"])
    assert abs(post - pre) < ROUNDTRIP_TOLERANCE_BPB


def test_training_loss_goes_down(two_rank_run):
    _, out = two_rank_run
    losses = [float(line.split("train_loss:")[1].split()[0]) for line in out.splitlines() if "train_loss:" in line]
    untrained = math.log(512)  # uniform prediction over the tiny vocabulary
    assert len(losses) >= 3 and losses[-1] < losses[0] < untrained
    assert float(parse_line(out, "pre_export_exact")["val_loss"]) < untrained - 1.5


def test_log_file_holds_code_hparams_and_every_line(two_rank_run):
    cwd, out = two_rank_run
    log = (cwd / "logs" / "tworank.txt").read_bytes()
    code = Path(tg.__file__).read_bytes()
    assert log.startswith(f"code_begin bytes:{len(code)} ".encode()) and code in log
    text = log.decode()
    for line in out.strip().splitlines():
        assert line in text
    assert "hparam EVAL_STRIDE:32" in text and "world_size:2" in text


def test_compile_warmup_leaves_training_exactly_as_initialised(tiny_dataset, tmp_path):
    scores = []
    for warmup in (0, 3):
        env = tiny_env(tiny_dataset, f"warm{warmup}", WARMUP_STEPS=warmup, ITERATIONS=12, EVAL_STRIDE=0)
        result = run_train(tmp_path, env)
        assert result.returncode == 0, result.stderr[-2000:]
        scores.append(parse_line(result.stdout, "final_submission")["val_loss"])
    assert scores[0] == scores[1]


def test_wallclock_cap_stops_every_rank_before_the_cap(tiny_dataset, tmp_path):
    """Training ends at or before MAX_WALLCLOCK_SECONDS by its own clock, so the compliance line says train_ok:1;
    it does not stop much earlier than it must (steps here take tens of milliseconds)."""
    env = tiny_env(tiny_dataset, "capped", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3, EVAL_STRIDE=0,
                   TRAIN_LOG_EVERY=1000)
    result = run_train(tmp_path, env, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    stop = parse_line(result.stdout, "stopping_early")
    train_ms = float(parse_line(result.stdout, "final_submission")["train_time_ms"])
    assert 2000 <= float(stop["train_time"].rstrip("ms")) <= train_ms <= 3000
    assert parse_line(result.stdout, "compliance")["train_s"] == f"{train_ms / 1000:.1f}"


@pytest.mark.parametrize("override,message", [
    (dict(DATA_PATH="/nonexistent"), "no val shards match /nonexistent"),
    (dict(VOCAB_SIZE="1024"), "VOCAB_SIZE=1024 but"),
    (dict(TRAIN_BATCH_TOKENS="1000"), "TRAIN_BATCH_TOKENS=1000 must be divisible"),
    (dict(MATRIX_LR="1e9", SCALAR_LR="1e9", TIED_EMBED_LR="1e9", GRAD_CLIP_NORM="0", ITERATIONS="20",
          TRAIN_LOG_EVERY="1"), "training diverged"),
])
def test_user_errors_are_one_line_without_traceback(tiny_dataset, tmp_path, override, message):
    result = run_train(tmp_path, tiny_env(tiny_dataset, "bad", **override))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0]


@pytest.fixture()
def script_with_tiny_limit(tmp_path):
    """The 16,000,000-byte limit is the challenge's constant, not a setting: test it on a copy with a small one."""
    copy = tmp_path / "train_gpt.py"
    copy.write_text(Path(tg.__file__).read_text().replace("SIZE_LIMIT = 16_000_000", "SIZE_LIMIT = 1_000"))
    return copy


def run_copy(script, cwd, env):
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_oversize_artifact_exits_non_zero_after_reporting(tiny_dataset, tmp_path, script_with_tiny_limit):
    result = run_copy(script_with_tiny_limit, tmp_path, tiny_env(tiny_dataset, "big", ITERATIONS=2))
    assert result.returncode == 2
    assert "artifact path:" in result.stdout and "over the 1000-byte limit" in result.stdout
    assert "final_submission" not in result.stdout


def test_allow_oversize_continues_to_the_score(tiny_dataset, tmp_path, script_with_tiny_limit):
    env = tiny_env(tiny_dataset, "big", ITERATIONS=2, ALLOW_OVERSIZE=1, EVAL_STRIDE=0)
    result = run_copy(script_with_tiny_limit, tmp_path, env)
    assert result.returncode == 0 and "final_submission" in result.stdout


def test_train_gpt_trains_on_the_data_tools_demo_dataset(tiny_dataset, tmp_path):
    demo = tmp_path / "demo"
    built = subprocess.run([sys.executable, str(Path(tg.__file__).parent / "data/prepare.py"), "--out", str(demo)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    env = tiny_env(tiny_dataset, "ondemo", DATA_PATH=demo, TOKENIZER_PATH=demo / "tokenizer.model", VOCAB_SIZE=1024,
                   NUM_LAYERS=2, ITERATIONS=6, EVAL_STRIDE=0, VAL_BATCH_SIZE=65536)
    result = run_train(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(parse_line(result.stdout, "final_submission")["val_bpb"]) > 0
