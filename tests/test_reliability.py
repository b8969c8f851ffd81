"""Careless or hostile input: no run exits 0 with a broken artifact, no file is lost, every user error is one line."""
import errno
import json
import lzma
import hashlib
import math
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import train_gpt as tg
from conftest import plain_hp, parse_line, run_train, tiny_env

REPO = Path(tg.__file__).resolve().parent


def error_lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]


def assert_one_line_error(result, message: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], lines


# ----------------------------------------------------------------------------------------------------------
# Training that diverges
# ----------------------------------------------------------------------------------------------------------

DIVERGING = dict(MATRIX_LR="1e9", SCALAR_LR="1e9", TIED_EMBED_LR="1e9", GRAD_CLIP_NORM="0")


@pytest.mark.slow
def test_divergence_between_log_steps_stops_a_wallclock_run_without_an_artifact(tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "nan", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3, TRAIN_LOG_EVERY=100000,
                   **DIVERGING)
    result = run_train(tmp_path, env)
    assert_one_line_error(result, "training diverged")
    assert "final_submission" not in result.stdout and not list(tmp_path.glob("artifacts/*"))


@pytest.mark.slow
def test_short_runs_export_what_they_trained_with_the_default_ema(tiny_dataset, tmp_path):
    """EMA_DECAY 0.997 after 30 steps would keep ~91% of the initial weights; the warmed-up decay does not."""
    result = run_train(tmp_path, tiny_env(tiny_dataset, "ema", ITERATIONS=30, EMA_DECAY=0.997, EVAL_STRIDE=0))
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(parse_line(result.stdout, "pre_export_exact")["val_loss"]) < math.log(512) - 1.5


# ----------------------------------------------------------------------------------------------------------
# Output locations: checked before any data is read
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    (dict(ARTIFACT_DIR="a_file"), "ARTIFACT_DIR=a_file is not a writable folder"),
    (dict(ARTIFACT_DIR="/proc/no_such_place"), "ARTIFACT_DIR=/proc/no_such_place is not a writable folder"),
    (dict(RUN_ID="../escape"), "RUN_ID='../escape' may hold only"),
    (dict(MLP_MULT="0"), "MLP_MULT must be positive"),
])
@pytest.mark.slow
def test_bad_output_locations_and_settings_fail_at_start_up(tiny_dataset, tmp_path, override, message):
    (tmp_path / "a_file").write_text("x")
    result = run_train(tmp_path, tiny_env(tiny_dataset, "early", **override))
    assert_one_line_error(result, message)
    assert "val_data" not in result.stdout  # nothing was read or trained


@pytest.mark.slow
def test_a_rerun_with_the_same_run_id_keeps_the_earlier_log(tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "twice", ITERATIONS=2, EVAL_STRIDE=0)
    first = run_train(tmp_path, env)
    earlier = (tmp_path / "logs/twice.txt").read_bytes()
    second = run_train(tmp_path, env)
    assert first.returncode == second.returncode == 0
    assert (tmp_path / "logs/twice.txt.1").read_bytes() == earlier
    assert parse_line(second.stdout, "log_kept")["previous"] == "logs/twice.txt.1"


# ----------------------------------------------------------------------------------------------------------
# Inputs that are not what they claim
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [(b"", "is not a readable SentencePiece model"),
                                             (b"not a model", "is not a readable SentencePiece model"),
                                             (None, "is not a readable SentencePiece model")])
@pytest.mark.slow
def test_an_empty_unreadable_or_foreign_tokenizer_is_one_line(tiny_dataset, tmp_path, content, message):
    path = tmp_path / "tok.model"
    if content is None:
        path.mkdir()  # a folder where the file should be
    else:
        path.write_bytes(content)
    assert_one_line_error(run_train(tmp_path, tiny_env(tiny_dataset, "tok", TOKENIZER_PATH=path)), message)


@pytest.mark.slow
def test_a_tokenizer_other_than_the_datasets_is_refused(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for shard in tiny_dataset.path.glob("fineweb_*.bin"):
        (data / shard.name).write_bytes(shard.read_bytes())
    (data / "manifest.json").write_text(json.dumps({"tokenizer_sha256": hashlib.sha256(b"another").hexdigest()}))
    result = run_train(tmp_path, tiny_env(tiny_dataset, "mismatch", DATA_PATH=data))
    assert_one_line_error(result, "is not the tokenizer of DATA_PATH")


@pytest.mark.slow
def test_a_shard_path_that_is_a_folder_is_one_line(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    (data / "fineweb_val_000000.bin").mkdir(parents=True)
    (data / "fineweb_train_000000.bin").write_bytes((tiny_dataset.path / "fineweb_train_000000.bin").read_bytes())
    assert_one_line_error(run_train(tmp_path, tiny_env(tiny_dataset, "dir", DATA_PATH=data)), "not a file")


# ----------------------------------------------------------------------------------------------------------
# Artifacts: written whole or not at all, read within bounds
# ----------------------------------------------------------------------------------------------------------


def test_a_failed_artifact_write_leaves_no_file_behind(tmp_path, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tg, "open", lambda path, mode="r", *a, **k: FullDisk(real_open(path, mode, *a, **k)),
                        raising=False)
    with pytest.raises(tg.UserError, match="could not write the artifact .*No space left on device"):
        tg.write_artifact(str(tmp_path / "m.pgz"), b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def small_artifact() -> bytes:
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    return tg.encode_artifact(tg.pack(tg.quantize_state(tg.GPT(hp).state_dict(), hp)), "zstd")


def test_an_artifact_declaring_a_huge_payload_is_refused_before_decompressing(tmp_path):
    blob = small_artifact()
    path = tmp_path / "huge.pgz"
    path.write_bytes(blob[:4] + (1 << 30).to_bytes(8, "little") + blob[12:])
    with pytest.raises(tg.UserError, match="declares a 1073741824-byte payload, over the"):
        tg.read_artifact(str(path))


def zeros_stream(method: str, mib: int) -> bytes:
    """`mib` MiB of zeros as one stream of `method`, fed a MiB at a time so the test itself stays small."""
    chunk = bytes(1 << 20)
    if method == "zstd":
        c = zstandard.ZstdCompressor(level=3).compressobj()
        return b"".join(c.compress(chunk) for _ in range(mib)) + c.flush()
    if method == "brotli":
        c = pytest.importorskip("brotli").Compressor(quality=1)
        return b"".join(c.process(chunk) for _ in range(mib)) + c.finish()
    c = lzma.LZMACompressor(preset=0) if method == "lzma" else zlib.compressobj(1)
    return b"".join(c.compress(chunk) for _ in range(mib)) + c.flush()


def rans_claiming(codes: int) -> bytes:
    """A rANS stream whose payload header claims `codes` codes, with one valid table and no data."""
    table = np.zeros(256, "<u2")
    table[128] = 1 << tg.RANS_BITS
    header = json.dumps(dict(tensors=[], codes=codes, shuffle=False)).encode()
    meta = lzma.compress((4096).to_bytes(2, "little") + bytes(4) + table.tobytes() + tg.PAYLOAD_MAGIC + header
                         + len(header).to_bytes(4, "little"))
    return len(meta).to_bytes(4, "little") + meta


# Per method: a small stream that would inflate to far more than the 1000 bytes its artifact declares, and what the
# loader says. Half a gibibyte at least: a loader that inflated it would show in the peak memory.
BOMBS = {"zstd": (lambda: zeros_stream("zstd", 1024), "where the header declares 1000"),
         "lzma": (lambda: zeros_stream("lzma", 512), "where the header declares 1000"),
         "zlib": (lambda: zeros_stream("zlib", 512), "where the header declares 1000"),
         "brotli": (lambda: zeros_stream("brotli", 1024), "where the header declares 1000"),
         "rans": (lambda: rans_claiming(1 << 30), "1073741824 codes.*does not fit the payload")}


def test_every_compressor_has_a_bomb_test():
    assert set(BOMBS) == set(tg.COMPRESSORS)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(BOMBS))
def test_a_small_artifact_that_inflates_past_its_declared_size_is_stopped_there(tmp_path, method):
    """A stream of at least 512 MiB of zeros (or a rANS header claiming a gibibyte of codes) behind an
    honest-looking header: the loader must not allocate it."""
    build, message = BOMBS[method]
    bomb = build()
    path = tmp_path / "bomb.pgz"
    path.write_bytes(tg.ARTIFACT_MAGIC + (1000).to_bytes(8, "little") + bytes([tg.COMPRESSORS[method][0]]) + bomb)
    # VmHWM (peak resident memory of this process image) restarts at exec, unlike ru_maxrss, which a child
    # inherits from a large parent such as this pytest process.
    probe = (f"import re, sys; sys.path.insert(0, {str(REPO)!r}); import train_gpt as tg\n"
             f"try:\n    tg.read_artifact({str(path)!r})\nexcept tg.UserError as e:\n    print(e)\n"
             f"print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.split("\n")
    assert len(bomb) < 5_000_000 and re.search(message, out[0]), out
    assert int(out[1]) < 600  # MiB: torch alone is ~250; half a gibibyte of zeros would show


@pytest.mark.parametrize("damage", ["truncated", "bad_json", "impossible_shape", "bad_offset"])
def test_a_malformed_payload_is_one_user_error(tmp_path, damage):
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    packed = tg.pack(tg.quantize_state(tg.GPT(hp).state_dict(), hp))
    if damage == "impossible_shape":
        packed.table[0]["shape"] = [10 ** 6, 10 ** 6]
    if damage == "bad_offset":
        packed.table[-1]["codes" if "codes" in packed.table[-1] else "values"][0] = 10 ** 9
    payload = tg.serialize(packed)
    if damage == "truncated":
        payload = payload[:len(payload) // 2] + payload[-4:]
    if damage == "bad_json":
        payload = payload[:-30] + b"{not json" + payload[-21:]
    with pytest.raises(tg.UserError, match="malformed"):
        tg.unpack_state(payload)


def test_an_artifact_of_another_configuration_is_one_user_error(tmp_path):
    path = tmp_path / "m.pgz"
    path.write_bytes(small_artifact())
    other = plain_hp(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    with pytest.raises(tg.UserError, match="does not fit this configuration"):
        tg.load_artifact_model(other, str(path), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------
# A failure on rank 0 alone
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_export_failure_on_rank_0_ends_every_rank_with_one_error_line(tiny_dataset, tmp_path):
    script = tmp_path / "train_gpt.py"
    source = (REPO / "train_gpt.py").read_text()
    target = '            sizes["bytes_model"] = write_artifact(path, blob)'
    assert source.count(target) == 1
    script.write_text(source.replace(target, '            raise UserError("simulated export failure")'))
    env = tiny_env(tiny_dataset, "rank0", ITERATIONS=4, EVAL_STRIDE=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert error_lines(result) == ["error: simulated export failure"]
