"""bench/minigolf.py: the pure parts (val cut, run order, log parsers, statistics, the size-limit rewrite)."""
import math
import multiprocessing
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import minigolf as mg  # noqa: E402

# Real lines of both scripts (an 8-step run of each on the proxy), trimmed to what the parsers read or must skip.
OURS_LOG = """\
hparam NUM_LAYERS:4
hparam SIZE_LIMIT_IS_NOT_A_SETTING:0
model params:723216 layers:4 dim:128 heads:4 kv_heads:2 grad_accum:8 local_batch_tokens:1024 val_tokens:31891 compile:False
qat_enabled step:7 train_time:5155ms
step:8/8 train_loss:6.0062 train_time:5979ms step_avg:747.40ms tok_s:10961 eta:0s
train_done step:8 train_time:5980ms peak_mem_mib:0
pre_export_exact val_loss:6.88848923 val_bpb:3.95352508
artifact path:artifacts/ours_s1337.pgz bytes_model:524709 bytes_code:73453 bytes_total:598162 limit:1000000 compressor:zstd export_ms:111
final_roundtrip_exact val_loss:6.88849643 val_bpb:3.95352921 eval_time_ms:5213
final_sliding_exact val_loss:6.88849681 val_bpb:3.95352943 stride:128 eval_time_ms:14563
compliance bytes_total:598162 bytes_limit:1000000 bytes_ok:1 train_s:6.0 train_ok:1 eval_s:14.6 eval_ok:1 ttt:off val_tokens:31891 val_sha256:8761217c9767cd58
final_submission val_loss:6.88849681 val_bpb:3.95352943 bytes_total:598162 bytes_model:524709 bytes_code:73453 train_time_ms:5980 eval_time_ms:14563
"""

BASELINE_LOG = """\
logs/baseline_s1337.txt
val_loader:shards pattern=/w/sp1024_smoke/fineweb_val_*.bin tokens:31744
model_params:592144
step:1/8 train_loss:6.9251 train_time:612ms step_avg:612.21ms
step:8/8 train_loss:6.0347 train_time:4545ms step_avg:568.10ms
step:8/8 val_loss:5.8413 val_bpb:3.3528 train_time:4545ms step_avg:568.12ms
peak memory allocated: 0 MiB reserved: 0 MiB
Serialized model: 2121637 bytes
Code size: 47237 bytes
Total submission size: 2168874 bytes
Serialized model int8+zlib: 953110 bytes (payload:1059904 raw_torch:1073378 payload_ratio:1.99x)
Total submission size int8+zlib: 1000347 bytes
final_int8_zlib_roundtrip val_loss:5.8410 val_bpb:3.3526 eval_time:839ms
final_int8_zlib_roundtrip_exact val_loss:5.84095716 val_bpb:3.35256486
"""

# The record's console log (its own formats; numbers of a short run), trimmed to what the parser reads or must skip.
RECORD_LOG = """\
Hyperparameters:
  train_batch_tokens: 8192
  ttt_enabled: False
val_tokens: 31891
1/8 train_loss: 9.0110 train_time: 0.0m tok/s: 1024
8/8 train_loss: 8.1234 train_time: 0.9m tok/s: 1200
peak memory allocated: 0 MiB reserved: 0 MiB
diagnostic pre-quantization post-ema val_loss:7.10000000 val_bpb:4.10000000 eval_time:5100ms
Serialized model: 2200000 bytes
Code size (uncompressed): 158429 bytes
Code size (compressed): 33411 bytes
Serialized model quantized+brotli: 1199484 bytes
Total submission size quantized+brotli: 1232895 bytes
diagnostic quantized val_loss:7.12000000 val_bpb:4.11000000 eval_time:4800ms
quantized_sliding_window val_loss:7.09000000 val_bpb:4.09500000 eval_time:9000ms
"""


def docs(*lengths: int) -> np.ndarray:
    """Documents of the given lengths, each [BOS] + tokens that are never BOS."""
    return np.concatenate([[mg.BOS] + [7] * (n - 1) for n in lengths]).astype(np.uint16)


# ---------------------------------------------------------------------------- val cut


def test_cut_keeps_whole_documents_and_ends_at_a_boundary(tmp_path):
    shard = tmp_path / "fineweb_val_000000.bin"
    mg.write_shard(shard, docs(5, 3, 8, 4, 6))
    tokens = mg.read_shard(shard)
    assert mg.whole_docs_within(tokens, 16) == 3  # 5 + 3 + 8 = 16 fits exactly
    assert mg.whole_docs_within(tokens, 15) == 2  # the third document may not be cut in half
    cut = mg.cut_docs(tokens, 3)
    assert cut.size == 16 and tokens[cut.size] == mg.BOS
    assert np.array_equal(cut, tokens[:16]) and np.count_nonzero(cut == mg.BOS) == 3
    assert mg.cut_docs(tokens, 5).size == tokens.size  # all documents: the whole shard, tail included


def test_cut_refuses_what_it_cannot_do():
    with pytest.raises(mg.HarnessError, match="cannot keep 6 documents"):
        mg.cut_docs(docs(5, 3, 8, 4, 6), 6)
    with pytest.raises(mg.HarnessError, match="does not start with BOS"):
        mg.cut_docs(docs(5, 3)[1:], 1)


def test_shard_round_trip_and_bad_header(tmp_path):
    path = tmp_path / "s.bin"
    mg.write_shard(path, docs(3, 2))
    assert mg.read_shard(path).tolist() == [1, 7, 7, 1, 7]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(mg.HarnessError, match="size does not match"):
        mg.read_shard(path)


def _prepare_data_repeatedly(shared: Path, work: Path, val_docs: int) -> None:
    mg.VAL_DOCS = val_docs  # the fake proxy's split; the real one is checked against 713
    for _ in range(25):
        mg.ensure_data(shared, work, "sp1024", True, 1)


def test_runs_started_side_by_side_prepare_the_same_data_folder_without_a_race(tmp_path):
    shared = tmp_path / "shared"
    (shared / "anchors").mkdir(parents=True)
    proxy = shared / "data" / "proxy" / "sp1024"
    proxy.mkdir(parents=True)
    mg.write_shard(proxy / "fineweb_train_000000.bin", docs(*[50] * 40))
    val_lengths = range(2, 2 + mg.SMOKE_VAL_DOCS + 10)
    mg.write_shard(proxy / "fineweb_val_000000.bin", docs(*val_lengths))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_prepare_data_repeatedly, args=(shared, tmp_path / "work", len(val_lengths)))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    folder = mg.data_dir(tmp_path / "work", "sp1024", True)
    assert sorted(p.name for p in folder.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert mg.read_shard(folder / "fineweb_val_000000.bin").tolist() == docs(*range(2, 2 + mg.SMOKE_VAL_DOCS)).tolist()


def test_a_caseops_val_cut_keeps_its_byte_sidecar_parallel_and_its_tokenizer_beside_it(tmp_path):
    shared, work = tmp_path / "shared", tmp_path / "work"
    (shared / "anchors").mkdir(parents=True)
    built = work / "proxy8192_caseops_build"  # as data/prepare.py leaves it: complete, so it is not rebuilt
    built.mkdir(parents=True)
    (built / "manifest.json").write_text('{"complete": true}')
    (built / "tokenizer.model").write_bytes(b"model")
    val = docs(*range(2, 2 + mg.SMOKE_VAL_DOCS + 10))
    mg.write_shard(built / "fineweb_val_000000.bin", val)
    mg.write_shard(built / "fineweb_val_bytes_000000.bin", np.arange(val.size) % 7)
    mg.write_shard(built / "fineweb_train_000000.bin", docs(*[50] * 40))
    info = mg.ensure_data(shared, work, "proxy8192_caseops", True, 1)
    folder = Path(info["path"])
    cut = mg.read_shard(folder / "fineweb_val_000000.bin")
    assert cut.tolist() == docs(*range(2, 2 + mg.SMOKE_VAL_DOCS)).tolist()
    assert mg.read_shard(folder / "fineweb_val_bytes_000000.bin").tolist() == (np.arange(cut.size) % 7).tolist()
    assert (folder / "tokenizer.model").read_bytes() == b"model"


# ---------------------------------------------------------------------------- plan


def test_interleaving_runs_seed_by_seed_with_baseline_rows_first():
    rows = [mg.ROWS["ours"], mg.ROWS["xsa"], mg.ROWS["baseline"]]
    plan = [(r.name, seed) for r, seed in mg.schedule(rows, [1337, 42])]
    assert plan == [("baseline", 1337), ("ours", 1337), ("xsa", 1337), ("baseline", 42), ("ours", 42), ("xsa", 42)]


def env_args(tmp_path, **changes) -> dict:
    """row_env's keyword arguments for a full steps run: 2 threads, eager, no warm-up, unless changed."""
    return dict(run_id="r", data=tmp_path, shared=tmp_path, threads=2, compile_=0, warmup=0, smoke=False,
                iterations=None, wallclock=None) | changes


def test_row_env_budgets_and_per_script_settings(tmp_path):
    kw = env_args(tmp_path)
    base = mg.row_env(mg.ROWS["baseline"], 1, **kw)
    assert "EVAL_STRIDE" not in base and "COMPILE" not in base and "MLP_MULT" not in base
    assert base["ITERATIONS"] == "600" and base["MAX_WALLCLOCK_SECONDS"] == "0" and base["OMP_NUM_THREADS"] == "2"
    timed = mg.row_env(mg.ROWS["ours_time"], 1, **{**kw, "wallclock": 287.04})
    assert timed["MAX_WALLCLOCK_SECONDS"] == "287.0"
    assert int(timed["ITERATIONS"]) >= 100_000 and timed["COMPILE"] == "0"
    sp = mg.row_env(mg.ROWS["sp8192"], 1, **kw)
    assert sp["VOCAB_SIZE"] == "8192" and sp["TOKENIZER_PATH"].endswith("fineweb_8192_bpe.model")


def test_ours_runs_the_defaults_and_technique_rows_run_plain_plus_one_change(tmp_path):
    kw = env_args(tmp_path)
    ours, plain, smear = (mg.row_env(mg.ROWS[n], 1, **kw) for n in ("ours", "plain", "smear"))
    assert "SMEAR" not in ours and ours["TTT"] == "0" and ours["VOCAB_SIZE"] == "8192"
    assert plain["SMEAR"] == "0" and plain["MLP_MULT"] == "3" and plain["VOCAB_SIZE"] == "1024"
    assert {k: v for k, v in smear.items() if plain.get(k) != v and k != "RUN_ID"} == {"SMEAR": "1"}


def test_the_caseops_pair_differs_only_in_its_data_and_tokenizer(tmp_path):
    kw = env_args(tmp_path)
    plain, caseops = (mg.row_env(mg.ROWS[n], 1, **kw) for n in ("proxy8192", "caseops"))
    assert mg.ROWS["caseops"].base == "proxy8192" and mg.ROWS["caseops"].data == "proxy8192_caseops"
    assert plain == caseops  # given the same data folder: the data is the whole difference
    assert plain["TOKENIZER_PATH"] == str(tmp_path / "tokenizer.model") and plain["VOCAB_SIZE"] == "8192"


def test_at_regime_every_row_runs_at_4x64_on_sp1024_for_3000_steps(tmp_path):
    kw = env_args(tmp_path, shape=mg.SHAPES["regime"])
    ours, plain, smear = (mg.row_env(mg.ROWS[n], 1, **kw) for n in ("ours", "plain", "smear"))
    for env in (ours, plain, smear):
        assert (env["MODEL_DIM"], env["ITERATIONS"], env["VOCAB_SIZE"]) == ("64", "3000", "1024")
        assert env["TOKENIZER_PATH"].endswith("fineweb_1024_bpe.model")
    assert "EMBED_BITS" not in ours  # the 6-bit embedding fitted sp8192 into mini's cap: ours keeps its default
    assert {k: v for k, v in smear.items() if plain.get(k) != v and k != "RUN_ID"} == {"SMEAR": "1"}


def test_at_regime_context_and_scoring_keep_the_records_proportions_and_rows_keep_their_meaning(tmp_path):
    kw = env_args(tmp_path, shape=mg.SHAPES["regime"])
    plain, no_sliding, rope, record = (mg.row_env(mg.ROWS[n], 1, **kw)
                                       for n in ("plain", "no_sliding", "rope_ln", "record"))
    for env in (plain, record):  # 4 tokens of context per unit of width, as 2,048 at 512; stride half the context
        assert (env["TRAIN_SEQ_LEN"], env["EVAL_SEQ_LEN"], env["EVAL_STRIDE"]) == ("256", "256", "128")
    assert no_sliding["EVAL_STRIDE"] == "0"  # a row's own scoring wins over the shape's
    assert rope["ROPE_DIMS"] == record["ROPE_DIMS"] == "4"  # a quarter of the 16-dim head, as 8 of 32 at mini
    assert mg.row_env(mg.ROWS["rope_ln"], 1, **env_args(tmp_path))["ROPE_DIMS"] == "8"


def test_the_record_at_regime_takes_the_shape_and_its_own_row_settings_win(tmp_path):
    kw = env_args(tmp_path, shape=mg.SHAPES["regime"])
    record, rope = (mg.row_env(mg.ROWS[n], 1, **kw) for n in ("record", "record_rope_ln_qk"))
    assert (record["MODEL_DIM"], record["VOCAB_SIZE"], record["ROPE_DIMS"]) == ("64", "1024", "4")
    assert record["TOKENIZER_PATH"].endswith("fineweb_1024_bpe.model")
    assert rope["ROPE_DIMS"] == "0"


def test_rows_whose_point_is_their_data_or_size_are_refused_at_regime_only():
    regime, mini = mg.SHAPES["regime"], mg.SHAPES["mini"]
    refused = {n for n, r in mg.ROWS.items() if mg.shape_refusal(r, regime)}
    assert refused == {"sp8192", "proxy8192", "caseops", "shape_6x96", "shape_8x96"}
    assert not any(mg.shape_refusal(r, mini) for r in mg.ROWS.values())
    assert mg.main(["run", "--shape", "regime", "sp8192", "--dry-run"]) == 2


def test_regime_trains_about_100_tokens_a_weight_and_its_cap_binds_like_16_mb(tmp_path, monkeypatch):
    """The #2135 run: 5,001 steps of 786,432 tokens on 35,945,673 weights; 15,947,490 bytes."""
    sys.path.insert(0, str(mg.REPO))
    import train_gpt as tg
    env = mg.row_env(mg.ROWS["ours"], 1, **env_args(tmp_path, shape=mg.SHAPES["regime"]))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    weights = sum(p.numel() for p in tg.GPT(tg.Hyperparameters.from_env(), bf16=False).parameters())
    record_tokens_per_weight = 5001 * 786432 / 35945673
    assert 0.85 < int(env["ITERATIONS"]) * int(env["TRAIN_BATCH_TOKENS"]) / weights / record_tokens_per_weight < 1.1
    code_allowance = 40_000
    assert mg.SHAPES["regime"].cap - code_allowance == pytest.approx(15947490 / 35945673 * weights, rel=0.01)


def test_every_row_is_well_formed():
    for r in mg.ROWS.values():
        assert r.script in mg.PARSERS and r.budget in ("steps", "time") and r.data in mg.VOCABS, r.name
        assert all(k.isupper() for k in r.env), r.name


def test_caller_settings_are_stripped_from_the_inherited_environment():
    names = mg.setting_names(None)
    assert {"NUM_LAYERS", "EVAL_STRIDE", "MAX_WALLCLOCK_SECONDS", "TTT_CHUNK_TOKENS"} <= names
    assert "PATH" not in names and "RANK" not in names


# ---------------------------------------------------------------------------- size limit


def test_size_limit_is_rewritten_exactly_once():
    source = (mg.REPO / "train_gpt.py").read_text()
    capped = mg.cap_source(source)
    assert "\nSIZE_LIMIT = 1_000_000\n" in capped and mg.LIMIT_LINE not in capped
    assert len(capped) == len(source) - 1


def test_size_limit_rewrite_fails_loudly_when_the_line_is_gone():
    with pytest.raises(mg.HarnessError, match="found 0"):
        mg.cap_source("SIZE_LIMIT = 16000000\n")
    with pytest.raises(mg.HarnessError, match="found 2"):
        mg.cap_source(f"{mg.LIMIT_LINE}\n{mg.LIMIT_LINE}\n")


# ---------------------------------------------------------------------------- parsers


def test_parse_ours_takes_the_submission_line():
    p = mg.parse_ours(OURS_LOG)
    assert p["val_bpb"] == 3.95352943 and p["val_loss"] == 6.88849681  # the sliding score, not pre-export
    assert (p["bytes_code"], p["bytes_model"], p["bytes_total"]) == (73453, 524709, 598162)
    assert p["steps"] == 8 and p["train_s"] == 5.98 and p["eval_s"] == 14.563
    assert p["val_tokens"] == 31891 and p["val_sha256"] == "8761217c9767cd58"
    assert mg.error_line(OURS_LOG, 0, p) is None


def test_parse_ours_keeps_the_bytes_of_an_oversize_run_and_its_error():
    text = OURS_LOG.split("final_roundtrip")[0] + "error: artifact total 1100000 bytes is over the 1000000-byte limit\n"
    p = mg.parse_ours(text)
    assert p["val_bpb"] is None and p["bytes_total"] == 598162 and p["steps"] == 8
    assert mg.error_line(text, 2, p).startswith("error: artifact total")


def test_parse_record_takes_its_own_final_score_with_ttt_off():
    parsed = mg.parse_record(RECORD_LOG)
    assert parsed["val_bpb"] == 4.11 and parsed["val_loss"] == 7.12 and parsed["eval_s"] == 4.8
    assert (parsed["bytes_model"], parsed["bytes_code"], parsed["bytes_total"]) == (1_199_484, 33_411, 1_232_895)
    # 8 steps of 8,192 tokens at 1,200 tokens/s: 54.6 s, where its own minutes say only 0.9.
    assert parsed["steps"] == 8 and parsed["train_s"] == pytest.approx(8 * 8192 / 1200)
    assert parsed["val_tokens"] == 31891


def test_parse_record_of_a_crash_has_no_score():
    crashed = mg.parse_record(RECORD_LOG.split("Serialized model:")[0] + "Traceback (most recent call last):\n")
    assert crashed["val_bpb"] is None and crashed["bytes_total"] is None and crashed["steps"] == 8


def test_record_paired_measures_are_its_export_penalty_and_the_sliding_add_on():
    m = mg.paired_measures(RECORD_LOG)
    assert m["pre_export"] == 4.1 and m["export_penalty"] == pytest.approx(0.01)
    assert m["eval_gain"] == pytest.approx(-0.015) and m["eval_mode"] == "sliding_xdoc"


def test_record_rows_pass_their_settings_to_the_runner_and_nothing_of_ours(tmp_path):
    kw = env_args(tmp_path, threads=1, compile_=1, warmup=2)
    env = mg.row_env(mg.ROWS["record"], 1, **kw)
    assert env == {**{k: str(v) for k, v in mg.RECORD_BASE.items()}, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert "NUM_LAYERS" not in env and "COMPILE" not in env and env["SMEAR_GATE_ENABLED"] == "1"
    smoke = mg.row_env(mg.ROWS["record"], 1, **{**kw, "smoke": True, "iterations": 6})
    assert smoke["ITERATIONS"] == "6" and smoke["RECORD_FP32"] == "1"
    fp32 = mg.row_env(mg.ROWS["ours_fp32"], 1, **kw)
    assert fp32["COMPILE"] == "0" and fp32["WARMUP_STEPS"] == "0" and mg.ROWS["ours_fp32"].base == "record"


def test_each_ours_parity_row_changes_only_its_own_settings_against_its_base(tmp_path):
    kw = env_args(tmp_path, threads=1)
    for name, _, _, ours_env in mg.PARITY:
        row = mg.ROWS[f"ours_fp32_{name}"]
        env, base = mg.row_env(row, 1, **kw), mg.row_env(mg.ROWS[row.base], 1, **kw)
        changed = {k: v for k, v in env.items() if base.get(k) != v}
        assert changed == {k: str(v) for k, v in ours_env.items()}, name


def test_parse_baseline():
    p = mg.parse_baseline(BASELINE_LOG)
    assert p["val_bpb"] == 3.35256486 and p["val_loss"] == 5.84095716  # the _exact roundtrip line
    assert (p["bytes_code"], p["bytes_model"], p["bytes_total"]) == (47237, 953110, 1000347)
    assert p["steps"] == 8 and p["train_s"] == 4.545 and p["eval_s"] == 0.839 and p["val_tokens"] == 31744


def test_parse_baseline_wallclock_stop_and_crash():
    text = BASELINE_LOG.replace("step:8/8 val_loss", "stopping_early: wallclock_cap train_time:4545ms step:8/600\n"
                                "step:8/8 val_loss")
    assert mg.parse_baseline(text)["steps"] == 8
    crashed = "step:1/8 train_loss:6.9 train_time:612ms step_avg:612.21ms\nTraceback (most recent call last):\n" \
              "RuntimeError: boom\n"
    p = mg.parse_baseline(crashed)
    assert p["val_bpb"] is None and mg.error_line(crashed, 1, p) == "RuntimeError: boom"


# ---------------------------------------------------------------------------- statistics and table


def record(row, bpb, script="ours", **kw):
    rec = dict(row=row, script=script, budget="steps", data="sp1024", exit_code=0, val_bpb=bpb, bytes_total=900_000,
               fits=True, s_per_step=0.5, train_s=300.0, eval_s=60.0, threads=2,
               machine=dict(cpu="cpu", cores=2, hostname="vm", boot_id="b"))
    rec.update(kw)
    return rec


def test_a_relabelled_row_is_compared_with_the_base_its_runs_recorded():
    records = [record("plain_old", 2.00, seed=1), record("plain_old", 2.02, seed=2),
               record("xsa_old", 1.97, seed=1, base="plain_old"), record("xsa_old", 1.99, seed=2, base="plain_old")]
    lines = {s["row"]: s for s in mg.summarize(records)}
    assert lines["xsa_old"]["base"] == "plain_old" and lines["xsa_old"]["vs_base"][0] == pytest.approx(-0.03)
    assert lines["xsa_old"]["vs_base_seeds"][0] == pytest.approx(-0.03) and lines["plain_old"]["base"] is None


def test_mean_std_and_delta_noise():
    assert mg.mean_std([2.0]) == (2.0, None)
    m, s = mg.mean_std([2.0, 2.2, 2.4])
    assert m == pytest.approx(2.2) and s == pytest.approx(0.2)  # ddof = 1
    d, noise = mg.delta([2.0, 2.2, 2.4], [2.3, 2.5])
    assert d == pytest.approx(-0.2)
    assert noise == pytest.approx(math.sqrt(0.2 ** 2 / 3 + statistics.stdev([2.3, 2.5]) ** 2 / 2))
    assert mg.delta([2.0], [2.3, 2.5])[1] is None


def test_summary_rows_deltas_and_failures():
    records = [record("baseline", 2.12, "baseline", bytes_total=988_291), record("baseline", 2.10, "baseline"),
               record("plain", 2.00), record("plain", 2.02), record("xsa", 1.99), record("xsa", 1.97),
               record("xsa", None, exit_code=2, error="error: x"),
               record("shape_6x96", 1.9, bytes_total=1_000_001, fits=False)]
    lines = {s["row"]: s for s in mg.summarize(records)}
    assert list(lines) == ["baseline", "plain", "xsa", "shape_6x96"]  # registry order
    assert lines["xsa"]["n"] == 2 and lines["xsa"]["failed"] == 1
    assert lines["xsa"]["vs_base"][0] == pytest.approx(-0.03) and lines["xsa"]["vs_baseline"][0] == pytest.approx(-0.13)
    assert lines["plain"]["vs_base"] is None and lines["baseline"]["vs_baseline"] is None
    assert lines["baseline"]["bytes_total"] == 988_291 and lines["shape_6x96"]["fits"] is False
    table = mg.render_table(mg.summarize(records), records)
    assert "| xsa | ours | steps | sp1024 | 2 (+1 failed) | 1.9800 ± 0.0141 | -0.0300 ± 0.0141 (plain) |  | -0.1300 ± 0.0141 | " in table
    assert "1,000,001 OVER" in table


def test_runs_of_cpus_with_and_without_native_bf16_are_never_compared(tmp_path, capsys):
    native, emulated = (dict(cpu="cpu", cores=2, hostname="vm", boot_id="b", bf16=flag) for flag in (True, False))
    runs = [record("plain", 2.00, machine=native), record("plain", 2.02, machine=native),
            record("xsa", 1.99, machine=emulated), record("xsa", 1.97, machine=emulated)]
    results = tmp_path / "runs.jsonl"
    results.write_text("".join(mg.json.dumps(r) + "\n" for r in runs))
    assert mg.main(["table", "--results", str(results), "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "CPU with native bf16:" in out and "CPU with no native bf16:" in out
    assert "(plain)" not in out  # xsa's base ran on the other kind of CPU: no delta


def test_same_seed_delta_sees_a_shift_that_the_seed_spread_hides():
    plain = [record("plain", b, seed=k) for k, b in ((1, 2.00), (2, 2.10), (3, 2.05))]
    row = [record("smear", b - 0.004 + j * 0.001, seed=k) for j, (k, b) in enumerate(((1, 2.00), (2, 2.10), (3, 2.05)))]
    d, noise = mg.paired_delta(row, plain)
    assert d == pytest.approx(-0.003) and noise == pytest.approx(0.001 / math.sqrt(3))
    assert mg.delta([r["val_bpb"] for r in row], [r["val_bpb"] for r in plain])[1] > 0.02  # hidden by the spread
    assert mg.paired_delta([record("smear", 2.0, seed=9)], plain) is None  # no seed in common
    line = {s["row"]: s for s in mg.summarize(plain + row)}["smear"]
    assert line["vs_base_seeds"][0] == pytest.approx(-0.003)


def test_a_parity_pair_on_one_seed_is_read_against_the_same_seed_of_its_base():
    records = [record("record", b, script="record", seed=k) for k, b in ((1337, 1.954), (42, 1.943), (2025, 1.946))]
    records.append(record("record_momentum", 1.950, script="record", seed=1337))
    table = mg.parity_table(mg.summarize(records))
    assert "+0.0023 (n=1); same seeds -0.0040 |" in table  # the seed's offset flips the sign of the mean difference


def test_the_default_timeout_outlasts_every_recorded_run_twice():
    runs = [mg.json.loads(line) for line in (mg.REPO / "results" / "minigolf" / "runs.jsonl").read_text().splitlines()]
    slowest = max(r["wall_s"] for r in runs if r.get("wall_s"))
    assert mg.build_parser().parse_args(["run", "ours"]).timeout >= 2 * slowest


def test_table_section_is_replaced_between_markers_only():
    doc = f"# Title\n\nintro\n\n{mg.TABLE_BEGIN}\nold\n{mg.TABLE_END}\n\nnotes stay\n"
    new = mg.replace_section(doc, "| new |")
    assert new == f"# Title\n\nintro\n\n{mg.TABLE_BEGIN}\n| new |\n{mg.TABLE_END}\n\nnotes stay\n"
    assert mg.replace_section("# T\n", "| t |") == f"# T\n\n{mg.TABLE_BEGIN}\n| t |\n{mg.TABLE_END}\n"


def test_table_writes_the_standings_first_and_the_figure(tmp_path):
    def run(row, bpb, seed, commit, script="ours"):
        return record(row, bpb, script, seed=seed, commit=commit * 40, date=f"2026-12-0{seed % 7 + 1}T10:00:00+00:00",
                      machine=dict(cpu="cpu", cores=2, hostname="vm", boot_id="b", bf16=True))
    runs = [run("baseline", b, k, "a", "baseline") for k, b in ((1337, 2.11), (42, 2.12), (2025, 2.13))]
    runs += [run("ours", b, k, "b" if k == 1337 else "c") for k, b in ((1337, 1.90), (42, 1.92), (2025, 1.94))]
    runs += [run("record", b, k, "d", "record") for k, b in ((1337, 1.95), (42, 1.97))]
    runs += [run("plain", b, k, "e") for k, b in ((1337, 2.00), (42, 2.02))]
    runs += [run("smear", 1.99, 1337, "e"), run("xsa", 2.01, 1337, "e"), run("xsa", 2.00, 42, "e")]
    results, doc, figure = tmp_path / "runs.jsonl", tmp_path / "MINIGOLF.md", tmp_path / "minigolf" / "standings.png"
    results.write_text("".join(mg.json.dumps(r) + "\n" for r in runs))
    doc.write_text(f"# Mini-golf\n\nintro\n\n## Decision table\n\n| t |\n\n{mg.TABLE_BEGIN}\nold\n{mg.TABLE_END}\n")
    argv = ["table", "--results", str(results), "--doc", str(doc), "--figure", str(figure)]
    assert mg.main(argv) == 0

    text = doc.read_text()
    assert text.index(mg.STANDINGS_BEGIN) < text.index("## Decision table") < text.index(mg.TABLE_BEGIN)
    standings = text.split(mg.STANDINGS_BEGIN)[1].split(mg.STANDINGS_END)[0]
    assert "![standings and technique deltas](minigolf/standings.png)" in standings
    # mean ± standard error (0.02 / sqrt 3), the difference of means against the baseline and the record, the commits
    assert ("| 1337, 42, 2025 | 1.9200 ± 0.0115 | -0.2000 ± 0.0129 | -0.0400 ± 0.0153 | 900,000 | 0.500 | "
            "bbbbbbb, ccccccc |") in standings
    assert "| baseline |" in standings and "| ours_fp32 |" in standings and "not run" in standings
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20_000
    assert mg.main(argv) == 0 and doc.read_text() == text  # regenerating changes nothing


def test_a_cpu_kind_that_ran_no_standings_or_parity_row_gets_its_own_tables_but_no_empty_ones(tmp_path):
    def run(row, bpb, seed, bf16):
        return record(row, bpb, seed=seed, commit="a" * 40, date="2026-12-07T10:00:00+00:00",
                      machine=dict(cpu="cpu", cores=2, hostname="vm", boot_id="b", bf16=bf16))
    runs = [run("ours", 1.92, 1337, True), run("ours", 1.93, 42, True), run("record", 1.90, 1337, True)]
    runs += [run("proxy8192", 1.91, 1337, False), run("caseops", 1.92, 1337, False)]
    results, doc, figure = tmp_path / "runs.jsonl", tmp_path / "MINIGOLF.md", tmp_path / "minigolf" / "standings.png"
    results.write_text("".join(mg.json.dumps(r) + "\n" for r in runs))
    doc.write_text(f"# Mini-golf\n\nintro\n\n## Decision table\n\n| t |\n\n{mg.TABLE_BEGIN}\nold\n{mg.TABLE_END}\n")
    assert mg.main(["table", "--results", str(results), "--doc", str(doc), "--figure", str(figure)]) == 0
    text = doc.read_text()
    standings = text.split(mg.STANDINGS_BEGIN)[1].split(mg.STANDINGS_END)[0]
    assert "CPU with" not in standings and "(minigolf/standings.png)" in standings and figure.is_file()
    tables = text.split(mg.TABLE_BEGIN)[1]
    assert "CPU with native bf16:" in tables and "CPU with no native bf16:" in tables and "| caseops |" in tables
    parity = text.split(mg.PARITY_BEGIN)[1].split(mg.PARITY_END)[0]
    assert "CPU with" not in parity and "| momentum:" in parity


def test_the_committed_results_open_with_the_standings_that_runs_jsonl_gives():
    text = (mg.REPO / "results" / "MINIGOLF.md").read_text()
    first_section = text.split("\n## ", 2)[1]
    assert first_section.startswith("Standings\n") and mg.STANDINGS_BEGIN in first_section
    committed = text.split(mg.STANDINGS_BEGIN)[1].split(mg.STANDINGS_END)[0]
    records = [r for r in mg.read_results(mg.DEFAULT_RESULTS) if not r.get("smoke")]
    assert mg.standings_table(records) in committed  # every number of the standings is the data's
    assert "(minigolf/standings.png)" in committed and mg.FIGURE.is_file()


def test_paired_measures_come_from_one_runs_own_log():
    m = mg.paired_measures(OURS_LOG)
    assert m["pre_export"] == pytest.approx(3.95352508)
    assert m["export_penalty"] == pytest.approx(3.95352921 - 3.95352508, abs=1e-9)
    assert m["eval_gain"] == pytest.approx(3.95352943 - 3.95352921, abs=1e-9)
    assert m["eval_mode"] == "sliding"  # a log from before compliance named its mode
    assert mg.paired_measures(BASELINE_LOG) is None


def test_paired_table_averages_seeds_and_compares_with_the_base():
    def log(pre, roundtrip, final, mode="doc"):
        return (f"pre_export_exact val_loss:1 val_bpb:{pre}\nfinal_roundtrip_exact val_loss:1 val_bpb:{roundtrip}\n"
                f"compliance eval_mode:{mode}\nfinal_submission val_loss:1 val_bpb:{final}\n")
    logs = {"p1": log(2.0, 2.001, 1.996), "p2": log(2.1, 2.101, 2.096), "g": log(2.0, 1.9995, 1.9945),
            "b": BASELINE_LOG, "gone": None}
    records = [record("plain", 1.996, log="p1"), record("plain", 2.096, log="p2"), record("gptq", 1.9945, log="g"),
               record("baseline", 2.1, "baseline", log="b"), record("xsa", None, exit_code=2, log="p1"),
               record("gptq", 1.9, log="gone")]
    table = mg.paired_table(records, read_log=lambda rec: logs[rec["log"]])
    # Seeds 0.1 apart in score agree to the 5th decimal on what export costs them.
    assert "| plain | 2 | 2.05000 ± 0.07071 | +0.00100 ± 0.00000 |  | -0.00500 ± 0.00000 |  | doc |" in table
    assert "| gptq | 1 | 2.00000 | -0.00050 | -0.00150 (plain) | -0.00500 | +0.00000 (plain) | doc |" in table
    assert "| baseline |" not in table and "| xsa |" not in table


def test_paired_section_has_its_own_markers():
    doc = f"{mg.TABLE_BEGIN}\nold\n{mg.TABLE_END}\ntext\n{mg.PAIRED_BEGIN}\nold\n{mg.PAIRED_END}\n"
    new = mg.replace_section(doc, "| p |", mg.PAIRED_BEGIN, mg.PAIRED_END)
    assert new == f"{mg.TABLE_BEGIN}\nold\n{mg.TABLE_END}\ntext\n{mg.PAIRED_BEGIN}\n| p |\n{mg.PAIRED_END}\n"


def test_auto_wallclock_uses_this_sitting_only():
    here = dict(cpu="cpu", cores=2, hostname="vm", boot_id="b")
    records = [record("baseline", 2.1, "baseline", train_s=300.0, machine=here),
               record("baseline", 2.1, "baseline", train_s=310.0, machine=here),
               record("baseline", 2.1, "baseline", train_s=900.0, machine={**here, "boot_id": "other"}),
               record("baseline", None, "baseline", train_s=10.0, machine=here, exit_code=1),
               record("ours", 2.0, train_s=1.0, machine=here)]
    assert mg.baseline_seconds(records, here, 2) == 305.0
    assert mg.baseline_seconds(records, here, 1) is None


# ---------------------------------------------------------------------------- command line


def test_bad_input_is_one_error_line_and_exit_2(capsys):
    assert mg.main(["run", "no_such_row", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown row(s) no_such_row") and err.count("\n") == 1
    assert mg.main(["run", "ours", "--wallclock", "soon"]) == 2
    assert capsys.readouterr().err.startswith("error: --wallclock must be seconds or auto")
    with pytest.raises(SystemExit) as stop:
        mg.main(["run", "ours", "--seeds", "x"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_missing_shared_folder_is_an_error(tmp_path, capsys):
    assert mg.main(["prepare", "--shared", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "w").exists()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat")
def test_other_cores_is_a_share_of_the_machine():
    import time
    busy = mg.other_cores(lambda: time.sleep(0.2))
    assert 0.0 <= busy <= (mg.os.cpu_count() or 1) + 0.5
