"""The GPU path rehearsed on a CPU: torch.compile (inductor, fullgraph, static shapes) with bf16 autocast and a bf16
residual stream, with every architecture option on, on one rank and on two under DDP.

Compiling on a CPU is slow: a cold inductor cache spends seconds of C++ compilation on every kernel, so one compiled
run serves every test here, and the two-rank run comes after it in the same file: with the same per-rank shapes it
finds every graph in the inductor cache the one-rank run just filled. Each flag compiled graphs guard on (recurrence,
QAT) is checked switch by switch in test_arch.py and test_model.py on a cheap backend; here all switches fall on one
step, so training builds two graphs instead of one per switch."""
import pytest

import train_gpt as tg
from conftest import parse_line, run_train, tiny_env

pytestmark = pytest.mark.slow  # runs train_gpt.py end to end (README: the quick tier)

# Two layers keep compilation affordable; MLP_MULT=1 and BIGRAM_DIM=64 make every matrix but the GQA key/value
# projections 64 x 64, so Muon's Newton-Schulz compiles for two shapes only.
EVERY_OPTION = dict(NUM_LAYERS=2, MLP_MULT=1, ROPE_DIMS=8, LN_SCALE=1, QK_GAIN_INIT=5, XSA_LAST_N=2,
                    PARALLEL_START=1, RECUR_LAYERS=1, RECUR_START_FRAC=0.3, SMEAR=1, BIGRAM_BUCKETS=256, BIGRAM_DIM=64,
                    SKIP_GATES=1, ATTN_GATE=1, DOC_ATTENTION=1, LOGIT_SOFTCAP_NEG=20, TRAIN_SEQ_SCHEDULE="32@0,64@0.3",
                    QAT_START_FRAC=0.3, MUON_NS="polar", MUON_ROW_NORM=1, GPTQ=1, GPTQ_CALIB_BATCHES=2,
                    GPTQ_RESERVE_SECONDS=0, CLIP_MODE="std", AWQ_GROUP=1, LQER_RANK=2, TTT=1, TTT_LORA_RANK=4,
                    TTT_CHUNK_TOKENS=16, TTT_BATCH_DOCS=8, TTT_PREFIX_DOCS=16, TTT_PHASES=1, WARMUP_STEPS=2,
                    ITERATIONS=30, TRAIN_LOG_EVERY=10)
# Training: forward+backward for each stretch of training, (context, recurrence, QAT) = (32, off, off) and
# (64, on, on). Scoring: the in-memory model as training ends, and the model reloaded from the artifact, with
# dynamic shapes: scoring, adapting LoRA (with and without gradients: a document's last chunk only scores) and the
# global TTT phase: 5 in all, measured, every one built by the evaluation's warm-up, on any number of ranks.
# Newton-Schulz: one graph per matrix shape.
TRAIN_GRAPHS, NS_GRAPHS, SCORE_GRAPHS = 2, 2, 5
BF16_LOSS_TOLERANCE = 0.05  # nats: bf16 matmuls over 30 steps of a tiny model drift by a few hundredths at most


def losses(out: str) -> dict:
    return {int(line.split()[0].split(":")[1].split("/")[0]): float(line.split("train_loss:")[1].split()[0])
            for line in out.splitlines() if "train_loss:" in line}


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    out = {}
    for name, compile_on in (("compiled", 1), ("eager", 0)):
        result = run_train(tmp_path_factory.mktemp(name), tiny_env(tiny_dataset, name, COMPILE=compile_on,
                                                                     **EVERY_OPTION), timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[name] = result.stdout
    return out


def test_compiled_run_builds_exactly_the_expected_graphs_and_breaks_none(runs):
    out = runs["compiled"]
    # bf16 where the CPU has it natively (tests/test_precision.py covers the fp32 fallback).
    expected = dict(autocast="bf16") if tg.cpu_has_bf16() else dict(autocast="fp32", reason="no_native_bf16")
    assert parse_line(out, "runtime") == dict(compile="1", **expected, attention="sdpa_mask")
    # Everything training needs is compiled before the clock starts.
    assert int(parse_line(out, "warmup_done")["compiled_graphs"]) == TRAIN_GRAPHS + NS_GRAPHS + 1
    assert parse_line(out, "compile") == dict(graphs=str(TRAIN_GRAPHS + NS_GRAPHS + SCORE_GRAPHS), graph_breaks="0")


def test_every_evaluation_graph_is_built_before_the_evaluation_scores_anything(runs):
    # A graph built on the evaluation's clock is time the TTT budget cannot foresee (a CPU run once lost 20 s so).
    assert parse_line(runs["compiled"], "eval_warmup_done")["compiled_graphs"] == parse_line(
        runs["compiled"], "compile")["graphs"]


def test_compiled_run_switches_recurrence_and_qat_on_and_scores_the_artifact(runs):
    out = runs["compiled"]
    assert 0 < int(parse_line(out, "seq_len_changed")["step"]) == int(parse_line(out, "recurrence_enabled")["step"]) \
        == int(parse_line(out, "qat_enabled")["step"]) < 30
    assert parse_line(out, "pre_export_exact")["fake_quant"] == "1"
    assert float(parse_line(out, "final_submission")["val_bpb"]) == float(parse_line(out, "final_ttt_exact")["val_bpb"])
    assert parse_line(out, "seq_len_changed")["seq_len"] == "64" and "fit_lower" not in out


def test_eager_run_stays_fp32_and_compiles_nothing(runs):
    out = runs["eager"]
    assert parse_line(out, "runtime") == dict(compile="0", autocast="fp32", reason="compile_0", attention="sdpa_mask")
    assert parse_line(out, "compile") == dict(graphs="0", graph_breaks="0")


def test_compiled_bf16_losses_match_the_eager_fp32_run(runs):
    compiled, eager = losses(runs["compiled"]), losses(runs["eager"])
    assert compiled.keys() == eager.keys() == {10, 20, 30}
    for step in compiled:
        assert compiled[step] == pytest.approx(eager[step], abs=BF16_LOSS_TOLERANCE)
    for event in ("pre_export_exact", "final_roundtrip_exact", "final_ttt_exact"):
        assert float(parse_line(runs["compiled"], event)["val_loss"]) == pytest.approx(
            float(parse_line(runs["eager"], event)["val_loss"]), abs=BF16_LOSS_TOLERANCE)


def test_two_rank_compiled_run_trains_the_compiled_model_under_ddp(runs, tiny_dataset, tmp_path, monkeypatch):
    # Same per-rank shapes as the one-rank run (micro-batches of 256 tokens, 128 scoring windows per rank), so
    # its graphs come from the inductor cache that run filled.
    env = tiny_env(tiny_dataset, "compiled2", COMPILE=1, VAL_BATCH_SIZE=16384, **EVERY_OPTION)
    result = run_train(tmp_path, env, nproc=2, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "world_size:2" in out and parse_line(out, "compile")["graph_breaks"] == "0"
    # Rank 0 orthogonalises only the matrices it owns, one batch (and one graph) per shape among them.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    hp = tg.Hyperparameters.from_env()
    rank0_muon = tg.build_optimizers(tg.GPT(hp), hp, 0, 2, fused=False)[0]
    assert int(parse_line(out, "compile")["graphs"]) == TRAIN_GRAPHS + len(rank0_muon.owned) + SCORE_GRAPHS
    assert parse_line(out, "eval_warmup_done")["compiled_graphs"] == parse_line(out, "compile")["graphs"]
    # Same global batches, so the same model as the one-rank eager fp32 run up to bf16 and reduction order
    # (train_loss is rank 0's half: not comparable).
    for event in ("pre_export_exact", "final_ttt_exact"):
        assert float(parse_line(out, event)["val_loss"]) == pytest.approx(
            float(parse_line(runs["eager"], event)["val_loss"]), abs=BF16_LOSS_TOLERANCE)
