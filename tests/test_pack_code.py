"""tools/pack_code.py: a smaller self-extracting train_gpt.py that trains, exports and scores exactly the same."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, parse_line, tiny_env

TOOL = REPO / "tools" / "pack_code.py"
TRAIN = REPO / "train_gpt.py"
RUN_SEEDS = REPO / "scripts" / "run_seeds.sh"


def pack(src, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(src), "-o", str(out)], capture_output=True, text=True)


def code_block(log_bytes: bytes) -> bytes:
    """The source a log embeds, cut by the byte count on its code_begin line."""
    header, rest = log_bytes.split(b"\n", 1)
    return rest[:int(parse_line(header.decode(), "code_begin")["bytes"])]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "train_gpt.py"
    res = pack(TRAIN, out)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def plain_and_packed_runs(packed, tiny_dataset, tmp_path_factory):
    """The same tiny CPU run of train_gpt.py and of its packed copy, side by side (one thread each)."""
    runs = {}
    for name, script in (("plain", TRAIN), ("packed", packed)):
        cwd = tmp_path_factory.mktemp(f"run_{name}")
        env = tiny_env(tiny_dataset, name, ITERATIONS=6, WARMDOWN_FRAC=0.33, EVAL_STRIDE=0, COMPILE=0)
        runs[name] = (script, cwd, subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (script, cwd, proc) in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} run exited {proc.returncode}:\n{out[-3000:]}"
        results[name] = (script, cwd / "logs" / f"{name}.txt", parse_line(out, "final_submission"))
    return results


def test_packed_copy_is_at_least_2_5_times_smaller(packed):
    assert TRAIN.stat().st_size >= 2.5 * packed.stat().st_size


def test_packing_is_deterministic(packed, tmp_path):
    assert pack(TRAIN, tmp_path / "again.py").returncode == 0
    assert (tmp_path / "again.py").read_bytes() == packed.read_bytes()


def test_summary_line_gives_both_sizes_and_the_ratio(tmp_path):
    res = pack(TRAIN, tmp_path / "p.py")
    size = (tmp_path / "p.py").stat().st_size
    ratio = TRAIN.stat().st_size / size
    assert res.stdout.splitlines() == [f"pack_code: {TRAIN} {TRAIN.stat().st_size} bytes -> {tmp_path / 'p.py'} "
                                       f"{size} bytes ({ratio:.2f}x smaller)"]


@pytest.mark.slow
def test_packed_run_scores_and_exports_exactly_like_the_plain_run(plain_and_packed_runs):
    keys = ("val_loss", "val_bpb", "bytes_model")
    plain, packed = plain_and_packed_runs["plain"][2], plain_and_packed_runs["packed"][2]
    assert {k: packed[k] for k in keys} == {k: plain[k] for k in keys}


def test_each_run_counts_the_size_of_the_file_that_ran(plain_and_packed_runs):
    for script, _, final in plain_and_packed_runs.values():
        assert int(final["bytes_code"]) == script.stat().st_size


def test_packed_run_embeds_the_packed_file_in_its_log(plain_and_packed_runs):
    script, log, _ = plain_and_packed_runs["packed"]
    assert code_block(log.read_bytes()) == script.read_bytes()


@pytest.mark.slow
def test_packed_copy_runs_under_torch_distributed_run_and_counts_its_own_size(packed, tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "tworank", ITERATIONS=6, WARMDOWN_FRAC=0.33, EVAL_STRIDE=0, COMPILE=0)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(packed)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert int(parse_line(res.stdout, "final_submission")["bytes_code"]) == packed.stat().st_size


def test_future_annotations_dataclasses_and_the_main_guard_survive_packing(tmp_path):
    (tmp_path / "prog.py").write_text(
        '"""Module docstring."""\nfrom __future__ import annotations\nimport dataclasses, os\n\n\n'
        "@dataclasses.dataclass\nclass C:\n    \"\"\"Only a docstring before the fields.\"\"\"\n"
        "    x: int = 1  # a comment\n    y: list[int] = dataclasses.field(default_factory=list)\n\n\n"
        "def f():\n    \"\"\"Only a docstring.\"\"\"\n\n\n"
        'if __name__ == "__main__":\n'
        "    print(C(2).x, C.__annotations__['x'], f(), os.path.getsize(__file__))\n")
    assert pack(tmp_path / "prog.py", tmp_path / "out.py").returncode == 0
    res = subprocess.run([sys.executable, str(tmp_path / "out.py")], capture_output=True, text=True)
    assert res.stdout.split() == ["2", "int", "None", str((tmp_path / "out.py").stat().st_size)]


@pytest.mark.parametrize("content", [None, "def broken(:\n"], ids=["missing file", "not python"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, content):
    src = tmp_path / "in.py"
    if content is not None:
        src.write_text(content)
    res = pack(src, tmp_path / "out.py")
    assert (res.returncode, res.stdout, len(res.stderr.splitlines())) == (2, "", 1)
    assert res.stderr.startswith("error: ") and not (tmp_path / "out.py").exists()


STUB = """import os, sys
os.makedirs("logs", exist_ok=True)
open(os.path.join("logs", os.environ["RUN_ID"] + ".txt"), "w").write("ran")
open("ran.txt", "a").write(os.path.relpath(__file__) + " " + str(os.path.getsize(__file__)) + "\\n")
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_seeds_runs_the_packed_copy_and_submits_it_as_the_code(tmp_path):
    (tmp_path / "stub.py").write_text(STUB)
    env = dict(os.environ, SEEDS="7 8", RUN_ID_PREFIX="t", LAUNCH=sys.executable, TRAIN="stub.py")
    res = subprocess.run(["bash", str(RUN_SEEDS)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    size = (tmp_path / "build" / "stub.py").stat().st_size
    assert (tmp_path / "ran.txt").read_text().splitlines() == [f"build/stub.py {size}"] * 2
    assert "logs/t_s7.txt logs/t_s8.txt --code build/stub.py" in res.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_seeds_with_pack_0_runs_the_plain_file(tmp_path):
    (tmp_path / "stub.py").write_text(STUB)
    env = dict(os.environ, SEEDS="7", RUN_ID_PREFIX="t", LAUNCH=sys.executable, TRAIN="stub.py", PACK="0")
    res = subprocess.run(["bash", str(RUN_SEEDS)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ran.txt").read_text().split()[0] == "stub.py" and not (tmp_path / "build").exists()
    assert "logs/t_s7.txt --code stub.py" in res.stdout
