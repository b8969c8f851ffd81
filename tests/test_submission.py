"""tools/submission.py on logs from real tiny CPU runs of train_gpt.py, and on doctored copies of them.

The three runs (one per seed) are made once per pytest session by the `real_runs` fixture; every failure case is a
copy of one of those logs edited in the test (a truncated log, an oversize artifact, a log whose code differs,
mismatched configs, ...). The cross-checks of a log's scores against each other run on a synthetic log, written
line by line in the format train_gpt.py logs, so that they need no training run. The t-test (scipy.stats) is checked
against the closed forms of Student's t for df=1 (0.5 - atan(t)/pi) and df=2 (0.5 - t / (2 sqrt(2 + t^2))), and
against the values the tool's hand-written Student t gave before scipy replaced it.
"""
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_env

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "submission.py"
TRAIN = REPO / "train_gpt.py"
RUN_SEEDS = REPO / "scripts" / "run_seeds.sh"
SEEDS = (1337, 42, 2025)
ITERATIONS = 12

_spec = importlib.util.spec_from_file_location("submission_tool", TOOL)
sub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sub)
sys.path.insert(0, str(TOOL.parent))
from submit import checks, logfile, record_folder, stats  # noqa: E402  (the tool's modules, beside it)


# ----------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_runs(tiny_dataset, tmp_path_factory):
    """Three real CPU runs of train_gpt.py (seeds 1337, 42, 2025), run side by side, one thread each."""
    if not TRAIN.exists():
        pytest.skip("train_gpt.py does not exist yet: no real logs to test the submission tool on")
    work = tmp_path_factory.mktemp("seed_runs")
    procs = []
    for seed in SEEDS:
        env = tiny_env(tiny_dataset, f"demo_s{seed}", SEED=seed, ITERATIONS=ITERATIONS, TRAIN_LOG_EVERY=4,
                       VAL_LOSS_EVERY=6, WARMDOWN_FRAC=0.33)
        procs.append(subprocess.Popen([sys.executable, str(TRAIN)], cwd=work, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for seed, proc in zip(SEEDS, procs):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"train_gpt.py seed {seed} exited {proc.returncode}:\n{out[-3000:]}")
    logs = [work / "logs" / f"demo_s{seed}.txt" for seed in SEEDS]
    return type("RealRuns", (), {"dir": work, "logs": logs, "val_data": val_data_line(tiny_dataset)})


def val_data_line(dataset) -> str:
    """What train_gpt.py logs about the val split: tokens, scored targets, their bytes (counted like its bpb)."""
    import train_gpt as tg
    import sentencepiece as spm
    tokens = np.concatenate([tg.read_shard(str(p), dataset.vocab_size)
                             for p in sorted(dataset.path.glob("fineweb_val_*.bin"))]).astype(np.int64)
    sp = spm.SentencePieceProcessor(model_file=str(dataset.tokenizer))
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, dataset.vocab_size))
    t = torch.from_numpy(tokens)
    nbytes = int(tg.count_target_bytes(t[:-1], t[1:], tables).sum())
    return (f"val_data tokens:{t.numel()} targets:{t.numel() - 1} bytes:{nbytes} "
            f"targets_per_byte:{(t.numel() - 1) / nbytes:.10f}")


def run_tool(*args):
    """The tool in this process: (exit code, stdout)."""
    out = io.StringIO()
    rc = sub.main([str(a) for a in args], stdout=out)
    return rc, out.getvalue()


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(TOOL)] + [str(a) for a in args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def split_log(data: bytes):
    """(source bytes, everything after them) of a log; the source is cut by its byte count."""
    nl = data.index(b"\n")
    n = int(re.search(rb"bytes:(\d+)", data[:nl]).group(1))
    return data[nl + 1:nl + 1 + n], data[nl + 1 + n:]


def join_log(code: bytes, tail: bytes) -> bytes:
    header = b"code_begin bytes:%d sha256:%s\n" % (len(code), hashlib.sha256(code).hexdigest().encode())
    return header + code + tail


def doctor(src: Path, dst: Path, edit_tail=None, code=None) -> Path:
    """Copy a log, editing only the lines after the source block (never the source, which contains the same
    words), and/or replacing the source (the header is rewritten to match)."""
    old_code, tail = split_log(src.read_bytes())
    if edit_tail is not None:
        tail = edit_tail(tail.decode()).encode()
    dst.write_bytes(join_log(old_code if code is None else code, tail))
    return dst


def sub_field(text: str, event: str, key: str, value) -> str:
    """Set key:value on every line of the given event."""
    def fix(m):
        return re.sub(rf"(?<=\s){key}:\S+", f"{key}:{value}", m.group(0))
    new = re.sub(rf"(?m)^{event}\s.*$", fix, text)
    assert new != text, f"{event} {key} not found"
    return new


def cut_after(text: str, event: str) -> str:
    """Keep the lines up to and including the first line of `event`."""
    i = text.index("\n" + event + " ")
    return text[:text.index("\n", i + 1) + 1]


def fail_lines(out: str):
    return [line for line in out.splitlines() if line.startswith("FAIL ")]


def table_row(out: str, run_id: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(run_id + " "))


# ----------------------------------------------------------------------------------------------------------
# The three real runs
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_parse_real_logs(real_runs):
    code = TRAIN.read_bytes()
    for seed, log in zip(SEEDS, real_runs.logs):
        run = logfile.parse_log(log)
        assert run.status == "complete", run.problem
        assert (run.run_id, run.seed) == (f"demo_s{seed}", seed)
        assert run.steps == ITERATIONS and run.total_steps == ITERATIONS
        assert run.hparams["MODEL_DIM"] == "64" and run.hparams["SEED"] == str(seed)
        assert run.env["device_name"] == "cpu" and run.env["world_size"] == "1"
        assert run.code == code and run.code_sha == hashlib.sha256(code).hexdigest() == run.code_sha_declared
        assert run.bytes_field("bytes_code") == len(code)
        assert run.bytes_field("bytes_total") == run.bytes_field("bytes_model") + len(code)
        assert [p[0] for p in run.train_points] == [4, 8, 12]
        assert [p[0] for p in run.val_points][-1] == ITERATIONS and len(run.val_points) >= 2
        assert run.step_avg_ms > 0 and run.train_time_ms > 0 and run.eval_time_ms > 0
        for section in ("pre_export", "roundtrip", "sliding"):
            assert math.isfinite(run.field(section, "val_bpb")), section
        assert math.isfinite(run.val_loss) and run.val_bpb > 0
        # The source block holds the words "final_submission" too; the score must come from the real line.
        last = log.read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
        assert last.startswith("final_submission ") and f"val_loss:{run.val_loss:.8f}" in last


def test_three_seeds_pass_with_stats_and_submission_json(real_runs, tmp_path):
    runs = [logfile.parse_log(p) for p in real_runs.logs]
    losses = [r.val_loss for r in runs]
    m, s = stats.mean_std(losses)
    ref = m + 0.005 + 20 * s / math.sqrt(3)          # t = 20 by construction: p < 0.01 with df = 2
    out_json = tmp_path / "submission.json"
    rc, out = run_tool(*real_runs.logs, "--code", TRAIN, "--against", f"val_loss={ref!r}", "--write", out_json,
                       "--author", "Test Author", "--github-id", "tester", "--name", "Tiny CPU demo")
    print(out)
    assert rc == 0, out
    assert not fail_lines(out)
    for seed in SEEDS:
        row = table_row(out, f"demo_s{seed}")
        assert row.split()[-1] == "PASS" and "FAIL" not in row
    assert "statistics over 3 complete run(s)" in out
    assert re.search(r"t = 20\.0000, df = 2", out)
    assert "p < 0.01: YES" in out
    assert "record: NO (not run on 8x H100)" in out           # significant, but CPU runs are never a record

    data = json.loads(out_json.read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total",
                "bytes_code", "seed_results", "val_loss_std", "p_value", "hardware", "dataset"):
        assert key in data, key
    assert data["author"] == "Test Author" and data["github_id"] == "tester"
    assert data["val_loss"] == pytest.approx(m, abs=1e-8)
    assert data["val_loss_std"] == pytest.approx(s, abs=1e-8)
    assert data["bytes_code"] == len(TRAIN.read_bytes())
    assert data["bytes_total"] == max(r.bytes_field("bytes_total") for r in runs)
    assert sorted(data["seeds"]) == sorted(SEEDS) and len(data["seed_results"]) == 3
    assert data["p_value"] == pytest.approx(0.5 - 20 / (2 * math.sqrt(2 + 20 ** 2)), rel=1e-5)  # Student t, df 2
    assert data["compliant"] is True
    assert data["hardware"] == "1x cpu"
    assert "not FineWeb" in data["dataset"] and not data["dataset"].startswith("FineWeb")

    # Metadata given once is kept on the next write.
    rc, _ = run_tool(*real_runs.logs, "--code", TRAIN, "--write", out_json)
    assert rc == 0 and json.loads(out_json.read_text())["author"] == "Test Author"


def test_record_needs_8xh100_logs(real_runs, tmp_path):
    def h100(t):
        t = sub_field(t, "env", "device_name", "NVIDIA_H100_80GB_HBM3")
        return sub_field(t, "env", "world_size", 8)
    logs = [doctor(p, tmp_path / p.name, h100) for p in real_runs.logs]
    m, s = stats.mean_std([logfile.parse_log(p).val_loss for p in logs])
    rc, out = run_tool(*logs, "--code", TRAIN, "--against", f"val_loss={m + 0.005 + 20 * s / math.sqrt(3)!r}",
                       "--require-record")
    assert rc == 0, out
    assert "hardware: 8x NVIDIA H100 80GB HBM3" in out and "record: YES" in out


def test_not_significant_and_require_record(real_runs):
    m, _ = stats.mean_std([logfile.parse_log(p).val_loss for p in real_runs.logs])
    args = [*real_runs.logs, "--code", TRAIN, "--against", f"val_loss={m + 0.005!r}"]
    rc, out = run_tool(*args)
    assert rc == 0 and "p < 0.01: NO" in out and "record: NO" in out     # compliant, just not a record
    rc, _ = run_tool(*args, "--require-record")
    assert rc == 1


def test_against_val_bpb_and_submission_json(real_runs, tmp_path):
    runs = [logfile.parse_log(p) for p in real_runs.logs]
    ratio = sum(r.val_loss / r.val_bpb for r in runs) / 3
    bpb = stats.mean_std([r.val_bpb for r in runs])[0] + 0.1
    _, by_loss = run_tool(*real_runs.logs, "--code", TRAIN, "--against", f"val_loss={bpb * ratio!r}")
    _, by_bpb = run_tool(*real_runs.logs, "--code", TRAIN, "--against", f"val_bpb={bpb!r}")
    _, bare = run_tool(*real_runs.logs, "--code", TRAIN, "--against", repr(bpb))
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"name": "old record", "val_loss": bpb * ratio, "val_bpb": 1.0}))
    _, by_json = run_tool(*real_runs.logs, "--code", TRAIN, "--against", record)
    p_line = [line for line in by_loss.splitlines() if "one-sided t-test" in line]
    assert p_line and all(p_line[0] in o for o in (by_bpb, bare, by_json))
    assert "nats/bpb" in by_bpb and "read as val_bpb" in bare and "old record" in by_json


def test_fineweb_label_only_for_a_fineweb_data_path(real_runs, tmp_path):
    logs = [doctor(p, tmp_path / p.name, lambda t: sub_field(t, "hparam", "DATA_PATH",
                                                              "./data/datasets/fineweb10B_sp1024"))
            for p in real_runs.logs]
    assert checks.dataset_label([logfile.parse_log(p) for p in logs]) == "FineWeb (fineweb10B_sp1024)"
    assert "not FineWeb" in checks.dataset_label([logfile.parse_log(p) for p in real_runs.logs])
    # A folder named like the export but whose data/prepare.py manifest says otherwise is not FineWeb.
    fake = tmp_path / "fineweb10B_sp1024"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"source": "demo: docstrings of the Python stdlib"}))
    logs = [doctor(p, tmp_path / p.name, lambda t: sub_field(t, "hparam", "DATA_PATH", fake))
            for p in real_runs.logs]
    label = checks.dataset_label([logfile.parse_log(p) for p in logs])
    assert label == "fineweb10B_sp1024 (not FineWeb: demo: docstrings of the Python stdlib)"
    (fake / "manifest.json").write_text(json.dumps({"source": "hf://datasets/x/fineweb10B_sp1024"}))
    assert checks.dataset_label([logfile.parse_log(p) for p in logs]).startswith("FineWeb (fineweb10B_sp1024;")

    out_json = tmp_path / "s.json"
    run_tool(*real_runs.logs, "--code", TRAIN, "--write", out_json, "--dataset", "my proxy", "--hardware", "x")
    data = json.loads(out_json.read_text())
    assert (data["dataset"], data["hardware"]) == ("my proxy", "x")


def test_plot_is_a_png(real_runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    rc, out = run_tool(*real_runs.logs, "--code", TRAIN, "--plot", png)
    assert rc == 0, out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install(real_runs, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    res = run_cli(*real_runs.logs, "--code", TRAIN, "--plot", tmp_path / "x.png", env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "pip install matplotlib" in res.stderr


# ----------------------------------------------------------------------------------------------------------
# Failure cases: doctored copies of the real logs
# ----------------------------------------------------------------------------------------------------------

def with_replaced(real_runs, i, doctored):
    logs = list(real_runs.logs)
    logs[i] = doctored
    return logs


def test_truncated_log_is_reported_and_not_counted(real_runs, tmp_path):
    bad = doctor(real_runs.logs[1], tmp_path / "demo_s42.txt", lambda t: cut_after(t, "train_done"))
    rc, out = run_tool(*with_replaced(real_runs, 1, bad), "--code", TRAIN, "--against", "val_loss=9")
    print(out)
    assert rc == 1
    assert "FAIL truncated" in table_row(out, "demo_s42")
    assert any("demo_s42: status: truncated: no final_submission line" in line for line in fail_lines(out))
    assert "statistics over 2 complete run(s) (seeds: 1337 2025)" in out
    assert "not counted: demo_s42 (truncated)" in out

    # Cut inside the source block: still reported, by file name since no hparam was reached.
    data = real_runs.logs[1].read_bytes()
    (tmp_path / "cut.txt").write_bytes(data[:500])
    rc, out = run_tool(real_runs.logs[0], tmp_path / "cut.txt", "--code", TRAIN)
    assert rc == 1 and "cut: status: truncated: log ends inside the source block" in out


def test_crashed_log(real_runs, tmp_path):
    bad = doctor(real_runs.logs[0], tmp_path / "a.txt",
                 lambda t: cut_after(t, "train_done") + "error: something went wrong\n")
    rc, out = run_tool(*with_replaced(real_runs, 0, bad), "--code", TRAIN)
    assert rc == 1 and "FAIL crashed" in table_row(out, "demo_s1337")
    assert "error: something went wrong" in out and "statistics over 2 complete" in out


def test_oversize_artifact(real_runs, tmp_path):
    n_code = len(TRAIN.read_bytes())

    def grow(t):
        for event in ("artifact", "final_submission"):
            t = sub_field(t, event, "bytes_model", 16_000_001 - n_code)
            t = sub_field(t, event, "bytes_total", 16_000_001)
        return sub_field(t, "compliance", "bytes_total", 16_000_001)
    bad = doctor(real_runs.logs[2], tmp_path / "big.txt", grow)
    rc, out = run_tool(*with_replaced(real_runs, 2, bad), "--code", TRAIN)
    print(out)
    assert rc == 1
    assert "FAIL 16000001" in table_row(out, "demo_s2025")
    assert fail_lines(out) == ["FAIL demo_s2025: bytes<=16e6: bytes_total 16000001 > 16000000"]

    # Totals that do not add up are caught too.
    bad = doctor(real_runs.logs[2], tmp_path / "sum.txt", lambda t: sub_field(t, "final_submission",
                                                                              "bytes_total", 1000))
    rc, out = run_tool(*with_replaced(real_runs, 2, bad), "--code", TRAIN)
    assert rc == 1 and "bytes_total 1000 != bytes_model" in out


def test_code_differs(real_runs, tmp_path):
    code = TRAIN.read_bytes()
    bad = doctor(real_runs.logs[0], tmp_path / "edited.txt", code=code + b"# one more line\n")
    rc, out = run_tool(*with_replaced(real_runs, 0, bad), "--code", TRAIN)
    print(out)
    assert rc == 1
    assert any(line.startswith("FAIL demo_s1337: code==--code: logged source") for line in fail_lines(out))
    assert "differs from --code" in out

    # A log whose source block does not match its own sha256 is corrupt.
    data = bytearray(real_runs.logs[0].read_bytes())
    i = data.index(b"\n") + 10
    data[i] = ord("#") if data[i] != ord("#") else ord("!")
    (tmp_path / "corrupt.txt").write_bytes(bytes(data))
    rc, out = run_tool(*with_replaced(real_runs, 0, tmp_path / "corrupt.txt"), "--code", TRAIN)
    assert rc == 1 and "does not match its own sha256" in out

    # Submitting a different train_gpt.py than the one that ran fails every run.
    other = tmp_path / "train_gpt.py"
    other.write_bytes(code.replace(b"\n", b"\n\n", 1))
    rc, out = run_tool(*real_runs.logs, "--code", other)
    assert rc == 1 and sum("code==--code" in line for line in fail_lines(out)) == 3


def test_mismatched_configs(real_runs, tmp_path):
    bad = doctor(real_runs.logs[1], tmp_path / "cfg.txt", lambda t: sub_field(t, "hparam", "MLP_MULT", "3.0"))
    rc, out = run_tool(*with_replaced(real_runs, 1, bad), "--code", TRAIN)
    print(out)
    assert rc == 1
    assert fail_lines(out) == ["FAIL demo_s42: config: differs: MLP_MULT=3.0 (others 2.0)"]
    assert "FAIL" not in table_row(out, "demo_s1337")


def test_duplicate_seed(real_runs, tmp_path):
    copy = doctor(real_runs.logs[0], tmp_path / "again.txt", lambda t: sub_field(t, "hparam", "RUN_ID", "again"))
    rc, out = run_tool(*real_runs.logs, copy, "--code", TRAIN)
    assert rc == 1
    assert {line.split(":")[0] for line in fail_lines(out)} == {"FAIL demo_s1337", "FAIL again"}
    assert "seed 1337 used by 2 logs" in out


def test_time_limits(real_runs, tmp_path):
    slow = doctor(real_runs.logs[0], tmp_path / "slow.txt",
                  lambda t: sub_field(t, "final_submission", "train_time_ms", 600_001))
    slow_eval = doctor(real_runs.logs[1], tmp_path / "slow_eval.txt",
                       lambda t: sub_field(t, "final_submission", "eval_time_ms", 612_345))
    rc, out = run_tool(slow, slow_eval, real_runs.logs[2], "--code", TRAIN)
    assert rc == 1
    assert "FAIL demo_s1337: train<=600s: train time 600.001 s > 600 s" in out
    assert "FAIL demo_s42: eval<=600s: eval time 612.345 s > 600 s" in out


def test_appended_runs_and_odd_source(real_runs, tmp_path):
    twice = tmp_path / "twice.txt"
    twice.write_bytes(real_runs.logs[0].read_bytes() + real_runs.logs[0].read_bytes())
    assert "more than one run" in logfile.parse_log(twice).problem
    # A source without a final newline, holding lines that look like log events, is cut by byte count.
    odd = b"x = 1\ncode_end\nfinal_submission val_loss:0.1 val_bpb:0.1\nerror: no"
    run = logfile.parse_log(doctor(real_runs.logs[0], tmp_path / "odd.txt", code=odd))
    ref = logfile.parse_log(real_runs.logs[0])
    assert run.status == "complete" and run.code == odd and run.val_loss == ref.val_loss


def test_val_data_line_describes_the_val_split(real_runs):
    for log in real_runs.logs:
        got = logfile.parse_log(log).val_data
        want = logfile.kv(real_runs.val_data.split()[1:])
        assert {k: int(got[k]) for k in ("tokens", "targets", "bytes")} == {k: int(want[k]) for k in
                                                                            ("tokens", "targets", "bytes")}
        assert float(got["targets_per_byte"]) == pytest.approx(float(want["targets_per_byte"]), abs=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Cross-checks of the scores a log carries, on a synthetic log
# ----------------------------------------------------------------------------------------------------------

VAL_TOKENS, VAL_BYTES = 100_001, 237_000
RATIO = f"{(VAL_TOKENS - 1) / VAL_BYTES:.10f}"


def bpb(loss: float) -> str:
    return f"{loss * float(RATIO) / math.log(2):.8f}"


def synthetic_log(path: Path, extra_exact: str = "") -> Path:
    """An honest, complete log in train_gpt.py's format, with --code train_gpt.py as its source block: every
    score consistent with the others and with its val_data line. `extra_exact` lines go after the last
    final_*_exact line."""
    lines = ["code_end",
             "env python:3.11 device:cpu device_name:cpu world_size:1",
             *[f"hparam {k}:{v}" for k, v in (("SEED", 7), ("RUN_ID", "syn"), ("DATA_PATH", "./data/demo"),
                                               ("TOKENIZER_PATH", "./data/demo/tokenizer.model"),
                                               ("VOCAB_SIZE", 1024))],
             f"model params:1000 val_tokens:{VAL_TOKENS}",
             f"val_data tokens:{VAL_TOKENS} targets:{VAL_TOKENS - 1} bytes:{VAL_BYTES} targets_per_byte:{RATIO}",
             "step:10/10 train_loss:5.0 train_time:1000ms step_avg:100.00ms",
             "train_done step:10 train_time:1000ms peak_mem_mib:0",
             f"pre_export_exact val_loss:4.60000000 val_bpb:{bpb(4.6)}",
             "artifact path:artifacts/syn.pgz bytes_model:100000 bytes_code:{c} bytes_total:{t} limit:16000000",
             f"final_roundtrip_exact val_loss:4.61000000 val_bpb:{bpb(4.61)} eval_time_ms:2000",
             f"final_sliding_exact val_loss:4.55000000 val_bpb:{bpb(4.55)} stride:64 eval_time_ms:3000",
             *([extra_exact] if extra_exact else []),
             "compliance bytes_total:{t} bytes_limit:16000000 bytes_ok:1 val_tokens:%d" % VAL_TOKENS,
             "final_submission val_loss:{loss} val_bpb:{bpb} bytes_total:{t} bytes_model:100000 bytes_code:{c} "
             "train_time_ms:1000 eval_time_ms:3000"]
    code = TRAIN.read_bytes()
    last = extra_exact.split() if extra_exact else ["", "val_loss:4.55000000", f"val_bpb:{bpb(4.55)}"]
    fields = logfile.kv(last)
    tail = "\n".join(lines).replace("{c}", str(len(code))).replace("{t}", str(100_000 + len(code)))
    tail = tail.replace("{loss}", fields["val_loss"]).replace("{bpb}", fields["val_bpb"])
    path.write_bytes(join_log(code, ("\n" + tail + "\n").encode()))
    return path


def test_an_honest_log_passes_every_cross_check(tmp_path):
    rc, out = run_tool(synthetic_log(tmp_path / "syn.txt"), "--code", TRAIN)
    assert rc == 0 and not fail_lines(out), out
    assert table_row(out, "syn").split()[-1] == "PASS"


@pytest.mark.parametrize("key, value", [("val_bpb", "2.00000000"), ("val_loss", "4.50000000")])
def test_an_edited_final_score_fails_and_is_not_written(tmp_path, key, value):
    log = doctor(synthetic_log(tmp_path / "syn.txt"), tmp_path / "edited.txt",
                 lambda t: sub_field(t, "final_submission", key, value))
    rc, out = run_tool(log, "--code", TRAIN, "--write", tmp_path / "submission.json")
    assert rc == 1
    assert [line for line in fail_lines(out) if "final_sliding_exact" in line] == [
        f"FAIL syn: scores: final_submission {key} {value} != "
        f"{logfile.parse_log(log).final_exact[1][key]} of final_sliding_exact"]
    assert not (tmp_path / "submission.json").exists()


@pytest.mark.parametrize("event", ["pre_export_exact", "final_roundtrip_exact"])
def test_an_exact_line_whose_bpb_is_not_its_loss_in_bits_per_byte_fails(tmp_path, event):
    # 1e-5 relative: ten times the tolerance, a thousand times the rounding of 8 printed decimals.
    loss = logfile.parse_log(synthetic_log(tmp_path / "syn.txt")).field(
        {"pre_export_exact": "pre_export", "final_roundtrip_exact": "roundtrip"}[event], "val_loss")
    off = f"{float(bpb(loss)) * (1 + 1e-5):.8f}"
    log = doctor(tmp_path / "syn.txt", tmp_path / "edited.txt", lambda t: sub_field(t, event, "val_bpb", off))
    rc, out = run_tool(log, "--code", TRAIN)
    assert rc == 1
    assert [line.split(" != ")[0] for line in fail_lines(out)] == [f"FAIL syn: scores: {event} val_bpb {off}"]


@pytest.mark.parametrize("event, key", [("artifact", "bytes_model"), ("artifact", "bytes_total"),
                                        ("compliance", "bytes_total")])
def test_sizes_that_disagree_between_lines_fail(tmp_path, event, key):
    log = doctor(synthetic_log(tmp_path / "syn.txt"), tmp_path / "edited.txt",
                 lambda t: sub_field(t, event, key, 12345))
    rc, out = run_tool(log, "--code", TRAIN)
    assert rc == 1
    assert any(line.startswith("FAIL syn: bytes<=16e6: ") and f"final_submission {key} " in line
               and f"!= {event} 12345" in line for line in fail_lines(out)), out


def test_a_log_without_val_data_fails_as_unverifiable(tmp_path):
    log = doctor(synthetic_log(tmp_path / "syn.txt"), tmp_path / "old.txt",
                 lambda t: re.sub(r"(?m)^val_data .*\n", "", t))
    rc, out = run_tool(log, "--code", TRAIN)
    assert rc == 1
    assert fail_lines(out) == ["FAIL syn: scores: no val_data line: scores cannot be cross-checked"]


def test_a_val_data_line_that_contradicts_itself_fails(tmp_path):
    log = doctor(synthetic_log(tmp_path / "syn.txt"), tmp_path / "edited.txt",
                 lambda t: sub_field(t, "val_data", "targets_per_byte", "0.5000000000"))
    rc, out = run_tool(log, "--code", TRAIN)
    assert rc == 1 and "val_data targets_per_byte 0.5000000000 != targets/bytes" in out


def test_final_score_is_matched_against_the_last_final_exact_line_whatever_its_name(tmp_path):
    doc = f"final_doc_exact val_loss:4.52000000 val_bpb:{bpb(4.52)} eval_time_ms:3000"
    rc, out = run_tool(synthetic_log(tmp_path / "syn.txt", extra_exact=doc), "--code", TRAIN)
    assert rc == 0 and not fail_lines(out), out
    # The same log claiming the sliding score, which is not the last evaluation, fails.
    log = doctor(tmp_path / "syn.txt", tmp_path / "edited.txt", lambda t: sub_field(
        sub_field(t, "final_submission", "val_loss", "4.55000000"), "final_submission", "val_bpb", bpb(4.55)))
    rc, out = run_tool(log, "--code", TRAIN)
    assert rc == 1 and "final_submission val_loss 4.55000000 != 4.52000000 of final_doc_exact" in out


# ----------------------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line, no traceback
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["missing.txt"],
    ["{log}", "--against", "banana"],
    ["{log}", "--against", "val_loss=abc"],
    ["{log}", "--code", "no_such_train_gpt.py"],
    ["{log}", "{log}"],
    [],
])
def test_usage_errors(args, tmp_path):
    log = tmp_path / "x.txt"
    log.write_text("code_begin bytes:0 sha256:e3b0\n\ncode_end\n")
    (tmp_path / "train_gpt.py").write_text("")
    res = run_cli(*[a.format(log=log) for a in args], cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [[0.010, 0.012], [0.006, 0.004, 0.0051], [0.02, -0.01, 0.03], [0.0049, 0.0052]])
def test_t_test_p_is_the_closed_form_tail_for_one_and_two_degrees_of_freedom(d):
    got = stats.one_sided_ttest(d, 0.005)
    t = (statistics.mean(d) - 0.005) / (statistics.stdev(d) / math.sqrt(len(d)))
    tail = 0.5 - math.atan(t) / math.pi if len(d) == 2 else 0.5 - t / (2 * math.sqrt(2 + t * t))
    assert got["df"] == len(d) - 1 and got["t"] == pytest.approx(t, rel=1e-12)
    assert got["p"] == pytest.approx(tail, rel=1e-9)


# The tool's t-test as the hand-written Student t (a continued fraction for the incomplete beta function) computed
# it before scipy replaced it, recorded at commit 42f57d3: (d, t, p) for the sets of improvements above, and
# (--against, t, p) for the committed logs/cpu_demo_s*.txt (submission.json: p_value 0.017396, t 5.220262).
RECORDED_TTESTS = [
    ([0.010, 0.012, 0.009], 6.047431568147633, 0.013135504439852343),
    ([0.006, 0.004, 0.0051, 0.007], 0.8209557939927525, 0.23591569413386565),
    ([0.02, -0.01, 0.03, 0.0, 0.011], 0.735097072389308, 0.2515263590287671),
    ([0.0049, 0.0052], 0.3333333333333315, 0.3975836176504339),
]
RECORDED_COMMITTED = [
    ("val_loss=4.70", 5.220262440168167, 0.017395970721558438),
    ("val_bpb=2.98", 4.9215815731569394, 0.019446135716681398),
]


@pytest.mark.parametrize("d, t, p", RECORDED_TTESTS)
def test_t_test_repeats_the_recorded_values(d, t, p):
    got = stats.one_sided_ttest(d, 0.005)
    assert got["t"] == pytest.approx(t, rel=1e-9) and got["p"] == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("against, t, p", RECORDED_COMMITTED)
def test_t_test_of_the_committed_logs_repeats_the_recorded_values(against, t, p):
    st = stats.compute_stats([logfile.parse_log(path) for path in COMMITTED], stats.parse_against(against))
    assert st["test"]["t"] == pytest.approx(t, rel=1e-9) and st["test"]["p"] == pytest.approx(p, rel=1e-9)


def test_ttest_edge_cases():
    assert stats.one_sided_ttest([0.1])["p"] is None                   # one run: no test
    assert stats.one_sided_ttest([0.1, 0.1])["p"] == 0.0               # no spread, above the margin
    assert stats.one_sided_ttest([0.001, 0.001])["p"] == 1.0           # no spread, below the margin


def test_parse_against_forms(tmp_path):
    assert stats.parse_against("val_loss=2.0")[:2] == ("val_loss", 2.0)
    assert stats.parse_against("val_bpb=1.2244")[:2] == ("val_bpb", 1.2244)
    kind, value, desc = stats.parse_against("1.2244")
    assert (kind, value) == ("val_bpb", 1.2244) and "bare number" in desc
    p = tmp_path / "submission.json"
    p.write_text(json.dumps({"val_bpb": 1.22}))
    assert stats.parse_against(str(p))[:2] == ("val_bpb", 1.22)
    for bad in ("val_loss=x", "nope", str(tmp_path)):
        with pytest.raises(sub.UsageError):
            stats.parse_against(bad)


# ----------------------------------------------------------------------------------------------------------
# scripts/run_seeds.sh, with a stand-in for train_gpt.py
# ----------------------------------------------------------------------------------------------------------

STUB = """import os, sys
os.makedirs("logs", exist_ok=True)
open(os.path.join("logs", os.environ["RUN_ID"] + ".txt"), "w").write("seed " + os.environ["SEED"] + "\\n")
open("order.txt", "a").write(os.environ["SEED"] + " " + " ".join(sys.argv[1:]) + "\\n")
sys.exit(1 if os.environ["SEED"] == os.environ.get("FAIL_SEED") else 0)
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_seeds_script(tmp_path):
    (tmp_path / "stub.py").write_text(STUB)
    env = dict(os.environ, SEEDS="7 8 9", RUN_ID_PREFIX="t", LAUNCH=f"{sys.executable}", TRAIN="stub.py",
               PACK="0")
    res = subprocess.run(["bash", str(RUN_SEEDS)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "order.txt").read_text().split() == ["7", "8", "9"]
    assert "tools/submission.py logs/t_s7.txt logs/t_s8.txt logs/t_s9.txt --code stub.py" in res.stdout

    # Stops at the first failing seed, and refuses to overwrite a log.
    shutil.rmtree(tmp_path / "logs")
    (tmp_path / "order.txt").unlink()
    res = subprocess.run(["bash", str(RUN_SEEDS)], cwd=tmp_path, env=dict(env, FAIL_SEED="8"),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "seed 8 failed" in res.stderr
    assert (tmp_path / "order.txt").read_text().split() == ["7", "8"]
    res = subprocess.run(["bash", str(RUN_SEEDS)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "already exists" in res.stderr


def test_ttt_score_and_compliance_line_are_parsed(real_runs, tmp_path):
    def add_ttt(text):
        head, final = text.rstrip("\n").rsplit("\n", 1)
        return (head + "\nfinal_ttt_exact val_loss:4.10000000 val_bpb:2.50000000 stride:32 chunk_tokens:4096 "
                "chunks_adapted:3 eval_time_ms:999\ncompliance bytes_total:1 bytes_limit:16000000 bytes_ok:1 "
                "train_s:1.0 train_ok:1 eval_s:1.0 eval_ok:1 ttt:score_first val_tokens:9 val_sha256:abc\n"
                + final + "\n")
    run = logfile.parse_log(doctor(real_runs.logs[0], tmp_path / "demo_s1337.txt", add_ttt))
    assert run.status == "complete" and run.field("ttt", "val_bpb") == 2.5
    assert run.compliance["val_sha256"] == "abc"


# ----------------------------------------------------------------------------------------------------------
# --record-dir: the folder a record PR adds, built from the committed CPU logs
# ----------------------------------------------------------------------------------------------------------

COMMITTED = [REPO / "logs" / f"cpu_demo_s{seed}.txt" for seed in SEEDS]
FOLDER_FILES = ["README.md", "submission.json", "train_gpt.py"] + [f"train_seed{seed}.log" for seed in SEEDS]


@pytest.fixture()
def committed(tmp_path):
    """The committed logs/cpu_demo_s*.txt and, as --code, the packed train_gpt.py they embed."""
    code = split_log(COMMITTED[0].read_bytes())[0]
    assert all(split_log(p.read_bytes())[0] == code for p in COMMITTED)
    (tmp_path / "train_gpt.py").write_bytes(code)
    return tmp_path / "train_gpt.py"


def log_numbers(path: Path) -> dict:
    """The numbers a record README reports, read from a log with regexes only (not with the tool's parser)."""
    tail = split_log(path.read_bytes())[1].decode()

    def field(event, key):
        return re.findall(rf"(?m)^{event} .*?\b{key}:(\S+)", tail)[-1]
    return {"seed": field("hparam", "SEED"), "steps": field("train_done", "step"),
            "pre": field("pre_export_exact", "val_bpb"), "quant": field("final_roundtrip_exact", "val_bpb"),
            "bpb": field("final_submission", "val_bpb"), "loss": field("final_submission", "val_loss"),
            "model": field("final_submission", "bytes_model"), "total": field("final_submission", "bytes_total"),
            "code": field("final_submission", "bytes_code"),
            "train_ms": field("final_submission", "train_time_ms"),
            "eval_ms": field("final_submission", "eval_time_ms")}


def readme_table(text: str) -> list:
    """The cells of the per-seed results table, one list per row (header, separator and mean row left out)."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    start = next(i for i, r in enumerate(rows) if r[0].strip() == "Seed")
    out = []
    for r in rows[start + 2:]:
        if not r[0].strip().isdigit():
            break
        out.append([c.strip() for c in r])
    return out


def test_record_dir_from_the_committed_logs(committed, tmp_path):
    records = tmp_path / "records"
    written = tmp_path / "submission.json"
    rc, out = run_tool(*COMMITTED, "--code", committed, "--record-dir", records, "--name", "CPU_demo",
                       "--date", "2026-11-29T15:49:00Z", "--author", "Test Author", "--github-id", "tester",
                       "--against", "val_loss=4.70", "--write", written)
    assert rc == 0, out
    folder = records / "track_10min_16mb" / "2026-11-29_CPU_demo"
    assert f"record folder written: {folder}" in out and "date 2026-11-29: from --date" in out
    assert sorted(os.listdir(records / "track_10min_16mb")) == ["2026-11-29_CPU_demo"]   # no temporary left
    assert sorted(os.listdir(folder)) == sorted(FOLDER_FILES)

    # Byte copies: the code every log embeds, and each seed's log under train_seed<N>.log.
    assert (folder / "train_gpt.py").read_bytes() == committed.read_bytes()
    for seed, log in zip(SEEDS, COMMITTED):
        assert (folder / f"train_seed{seed}.log").read_bytes() == log.read_bytes()

    # submission.json: what --write writes, but naming the logs beside it.
    data = json.loads((folder / "submission.json").read_text())
    same = json.loads(written.read_text())
    assert [e.pop("log") for e in data["seed_results"]] == [f"train_seed{s}.log" for s in SEEDS]
    assert [e.pop("log") for e in same["seed_results"]] == [p.name for p in COMMITTED]
    assert data == same
    assert data["name"] == "CPU_demo" and data["date"] == "2026-11-29T15:49:00Z" and data["compliant"] is True

    # Every number of the README's table is the one its seed's log carries.
    readme = (folder / "README.md").read_text()
    nums = [log_numbers(p) for p in COMMITTED]
    rows = readme_table(readme)
    assert len(rows) == 3
    for row, n in zip(rows, nums):
        seed, steps, pre, quant, bpb, loss, model, total, train_s, eval_s = row
        assert (seed, steps, pre, quant, bpb, loss, model, total) == (
            n["seed"], n["steps"], n["pre"], n["quant"], n["bpb"], n["loss"], n["model"], n["total"])
        assert round(float(train_s) * 1000) == int(n["train_ms"])
        assert round(float(eval_s) * 1000) == int(n["eval_ms"])
    mean_row = next(line for line in readme.splitlines() if line.startswith("| mean ± std |"))
    for key in ("pre", "quant", "bpb", "loss"):
        xs = [float(n[key]) for n in nums]
        assert f"{np.mean(xs):.8f} ± {np.std(xs, ddof=1):.8f}" in mean_row, key
    assert f"max {max(int(n['total']) for n in nums)} |" in mean_row
    assert f"**val_bpb {np.mean([float(n['bpb']) for n in nums]):.8f}**" in readme

    # Compliance, with the logs' numbers; the command, with the settings that differ from the script's defaults.
    compliance = readme.split("## Compliance", 1)[1].split("\n## ", 1)[0]
    biggest = max(nums, key=lambda n: int(n["total"]))
    assert f"at most {int(biggest['total']):,} bytes (seed {biggest['seed']}: model {int(biggest['model']):,} + " \
           f"code {int(biggest['code']):,}) <= 16,000,000" in compliance
    assert f"at most {max(int(n['train_ms']) for n in nums) / 1000:.3f} s <= 600 s" in compliance
    assert f"at most {max(int(n['eval_ms']) for n in nums) / 1000:.3f} s <= 600 s" in compliance
    val = re.search(r"(?m)^val_data tokens:(\d+)", split_log(COMMITTED[0].read_bytes())[1].decode()).group(1)
    sha = re.search(r"val_sha256:(\S+)", COMMITTED[0].read_text()).group(1)
    assert f"counts {int(val):,} tokens" in compliance and f"fingerprint `{sha}` on every seed" in compliance
    assert "Score-first test-time training" in compliance and "No validation tokens in training" in compliance
    assert hashlib.sha256(committed.read_bytes()).hexdigest() in compliance
    command = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert command.startswith("for SEED in 1337 42 2025; do\n  SEED=$SEED ")
    assert "DATA_PATH=data/demo" in command and "NUM_LAYERS=2" in command and "COMPILE=0" in command
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in command
    assert "MLP_MULT" not in command and "RUN_ID" not in command                   # default; per seed
    assert "| `NUM_LAYERS` | `2` | `11` |" in readme and "**AUTHOR: replace this line**" in readme
    assert "p = 0.017396" in readme


@pytest.mark.slow
def test_record_dir_refuses_and_leaves_no_half_written_folder(committed, tmp_path, monkeypatch):
    records = tmp_path / "records"
    base = [*COMMITTED, "--code", committed, "--record-dir", records, "--date", "2026-11-29"]
    folder = records / "track_10min_16mb" / "2026-11-29_mine"
    for bad in ([], ["--name", "my record"], ["--name", "../up"], ["--name", "x", "--track", "records"],
                ["--name", "x", "--date", "29/11/2026"]):
        res = run_cli(*base, *bad)          # a second --date replaces the first
        assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, bad
    assert not records.exists()

    # A run that fails a check: nothing is written (--force is for --write only).
    big = doctor(COMMITTED[2], tmp_path / "cpu_demo_s2025.txt",
                 lambda t: sub_field(t, "final_submission", "train_time_ms", 600_001))
    rc, out = run_tool(*COMMITTED[:2], big, *base[3:], "--name", "mine", "--force")
    assert rc == 1 and "record folder NOT written" in out and not records.exists()
    # ... unless the track has no time limit.
    rc, out = run_tool(*COMMITTED[:2], big, *base[3:], "--name", "mine", "--track", "track_non_record_16mb")
    assert rc == 0, out
    other = records / "track_non_record_16mb" / "2026-11-29_mine"
    assert "PASS 600.0 " in table_row(out, "cpu_demo_s2025") and "track track_non_record_16mb)" in out
    assert "at most 600.001 s (`final_submission` train_time_ms); track_non_record_16mb has no time limit" in \
        (other / "README.md").read_text()

    # An existing folder is kept unless --overwrite; a failure while writing leaves the old one whole.
    rc, _ = run_tool(*base, "--name", "mine")
    assert rc == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = run_cli(*base, "--name", "mine")
    assert res.returncode == 2 and "already exists" in res.stderr and res.stderr.count("\n") == 1
    calls = []

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return shutil.copyfile(src, dst)
    monkeypatch.setattr(record_folder.shutil, "copyfile", failing_copy)
    with pytest.raises(sub.UsageError, match="No space left on device"):
        run_tool(*base, "--name", "mine", "--overwrite", "--blurb", "new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(os.listdir(folder.parent)) == ["2026-11-29_mine"]                # no temporary left
    rc, _ = run_tool(*base, "--name", "mine", "--overwrite", "--blurb", "Smaller model.")
    assert rc == 0 and "Smaller model." in (folder / "README.md").read_text()
    assert sorted(os.listdir(folder.parent)) == ["2026-11-29_mine"]
