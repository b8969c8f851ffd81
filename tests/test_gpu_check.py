"""bench/gpu_check.py reads figures off train_gpt.py's log lines: its parsing, on lines in the script's format."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402

LOG = """runtime compile:1 autocast:bf16 attention:fa3
warmup_done steps:20 time_ms:95000 compiled_graphs:7
step:10/100000 train_loss:6.1 train_time:2000ms step_avg:200.00ms tok_s:3932160 eta:58s
step:20/100000 train_loss:5.2 train_time:3200ms step_avg:160.00ms tok_s:4915200 eta:57s
step:30/100000 train_loss:4.9 train_time:4400ms step_avg:146.67ms tok_s:5362000 eta:56s
train_done step:30 train_time:4500ms peak_mem_mib:41000
compile graphs:9 graph_breaks:0
compliance bytes_total:1 bytes_limit:16000000 bytes_ok:1 train_s:4.5 train_ok:1 eval_s:3.0 eval_ok:1 eval_mode:ttt
final_submission val_loss:3.1 val_bpb:1.9 bytes_total:1 bytes_model:1 bytes_code:1 train_time_ms:4500 eval_time_ms:3000
"""


def test_steady_step_time_comes_from_the_last_two_progress_lines():
    assert gpu_check.steady_ms_per_step(LOG) == 120.0  # (4400 - 3200) ms over 10 steps


def test_step_time_needs_two_progress_lines():
    assert gpu_check.steady_ms_per_step(LOG.split("step:20")[0]) is None


def test_fields_of_the_last_line_of_an_event():
    assert gpu_check.fields(LOG, "compile") == dict(graphs="9", graph_breaks="0")
    assert gpu_check.fields(LOG, "runtime")["attention"] == "fa3"
    assert gpu_check.fields(LOG, "no_such_event") == {}


RECORD_LOG = """  train_batch_tokens: 786432
10/100000 train_loss: 7.1000 train_time: 0.0m tok/s: 6000000
20/100000 train_loss: 6.5000 train_time: 0.0m tok/s: 6400000
peak memory allocated: 41000 MiB reserved: 42000 MiB
"""


def test_record_progress_takes_its_time_from_tokens_per_second():
    points = gpu_check.record_progress(RECORD_LOG, 786432)
    assert [(s, round(ms, 3), loss) for s, ms, loss in points] == [(10, 1310.72, 7.1), (20, 2457.6, 6.5)]
    assert gpu_check.steady_ms(points) == pytest.approx((2457.6 - 1310.72) / 10)
