"""The GPU path rehearsed on a CPU under DDP: two ranks of the compiled model (inductor, bf16 where the CPU has it)
with every architecture option on, against the one-rank eager fp32 run. Its own file, so the test runner's second
worker builds it while the first builds test_compiled.py's one-rank runs."""
import pytest

import train_gpt as tg
from conftest import parse_line, run_train, tiny_env
from test_compiled import BF16_LOSS_TOLERANCE, EVERY_OPTION, SCORE_GRAPHS, TRAIN_GRAPHS


def test_two_rank_compiled_run_trains_the_compiled_model_under_ddp(tiny_dataset, tmp_path, monkeypatch):
    # Same per-rank shapes as the one-rank run: micro-batches of 256 tokens, 128 scoring windows per rank.
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
    (tmp_path / "eager").mkdir()
    eager = run_train(tmp_path / "eager", tiny_env(tiny_dataset, "eager1", COMPILE=0, **EVERY_OPTION))
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    for event in ("pre_export_exact", "final_ttt_exact"):
        assert float(parse_line(out, event)["val_loss"]) == pytest.approx(
            float(parse_line(eager.stdout, event)["val_loss"]), abs=BF16_LOSS_TOLERANCE)
