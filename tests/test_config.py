"""Configuration: environment variables are read once, and bad values stop with a line naming the variable."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import tiny_env, write_shard

DEPTH_SETTINGS = ("xsa_last_n", "parallel_start", "recur_layers")


def from_env(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return tg.Hyperparameters.from_env()


def test_defaults_are_the_8xh100_frontier_recipe(monkeypatch):
    hp = from_env(monkeypatch)
    assert (hp.vocab_size, hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == \
        (8192, 11, 512, 8, 4, 4.0)
    assert "sp8192" in hp.data_path and "8192" in hp.tokenizer_path
    assert (hp.xsa_last_n, hp.parallel_start, hp.recur_span()) == (11, 8, range(3, 6))
    assert hp.block_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]  # the record's 3 passes
    assert (hp.train_seq_len, hp.train_batch_tokens, hp.eval_stride, hp.eval_seq_len) == (2048, 786432, 64, 2560)
    # The #1855 and #2135 runs' forms: warm-down over 85% to a 0.1 floor, scalar decay 0.02, gate scale 0.5.
    assert (hp.warmdown_frac, hp.min_lr_frac, hp.scalar_wd, hp.attn_gate_scale, hp.ortho_init) == \
        (0.85, 0.1, 0.02, 0.5, True)
    hp.validate(8)
    hp.validate(1)


def test_values_are_cast_to_the_field_type(monkeypatch):
    hp = from_env(monkeypatch, NUM_LAYERS="9", MATRIX_LR="0.05", TIE_EMBEDDINGS="0", COMPRESSOR="lzma")
    assert (hp.num_layers, hp.matrix_lr, hp.tie_embeddings, hp.compressor) == (9, 0.05, False, "lzma")


def test_an_empty_text_setting_is_off_and_an_empty_number_keeps_its_default(monkeypatch):
    hp = from_env(monkeypatch, RECUR_LAYERS="", NUM_LAYERS="")
    assert hp.recur_span() == range(0) and hp.num_layers == 11


@pytest.mark.parametrize("env,world,names", [
    (dict(NUM_LAYERS="eleven"), 1, "NUM_LAYERS"),
    (dict(TIE_EMBEDDINGS="maybe"), 1, "TIE_EMBEDDINGS"),
    (dict(TRAIN_BATCH_TOKENS="1000"), 8, "TRAIN_BATCH_TOKENS"),
    (dict(TRAIN_BATCH_TOKENS="786432"), 5, "TRAIN_BATCH_TOKENS"),
    (dict(NUM_HEADS="7"), 1, "NUM_HEADS"),
    (dict(NUM_KV_HEADS="3"), 1, "NUM_KV_HEADS"),
    (dict(QAT_BITS_MLP="3"), 1, "QAT_BITS_MLP"),
    (dict(EMBED_BITS="12"), 1, "EMBED_BITS"),
    (dict(COMPRESSOR="gzip"), 1, "COMPRESSOR"),
    (dict(CLIP_MODE="mean"), 1, "CLIP_MODE"),
    (dict(QAT_CLIP_K="0"), 1, "QAT_CLIP_K"),
    (dict(GPTQ="1", GPTQ_CALIB_BATCHES="0"), 1, "GPTQ_CALIB_BATCHES"),
    (dict(GPTQ="1", MAX_WALLCLOCK_SECONDS="10", GPTQ_RESERVE_SECONDS="10"), 1, "GPTQ_RESERVE_SECONDS"),
    (dict(EVAL_STRIDE="4096"), 1, "EVAL_STRIDE"),
    (dict(EMA_DECAY="1.5"), 1, "EMA_DECAY"),
    (dict(NUM_LAYERS="4", XSA_LAST_N="5"), 1, "XSA_LAST_N"),
    (dict(NUM_LAYERS="4", PARALLEL_START="4"), 1, "PARALLEL_START"),
    (dict(NUM_LAYERS="4", RECUR_LAYERS="3,4"), 1, "RECUR_LAYERS"),
    (dict(WARMDOWN_FRAC="1.5"), 1, "WARMDOWN_FRAC"),
    (dict(SCALAR_WD="-0.1"), 1, "SCALAR_WD"),
    (dict(RECUR_PASSES="0"), 1, "RECUR_PASSES"),
])
def test_invalid_values_name_the_variable(monkeypatch, env, world, names):
    with pytest.raises(tg.UserError, match=names):
        from_env(monkeypatch, **env).validate(world)


def test_block_indexed_defaults_follow_the_depth_and_give_the_recipe_at_11(monkeypatch):
    assert tg.depth_defaults(11) == {name: getattr(tg.Hyperparameters, name) for name in DEPTH_SETTINGS} == \
        dict(xsa_last_n=11, parallel_start=8, recur_layers="3,4,5")
    for n in range(1, 13):
        hp = from_env(monkeypatch, NUM_LAYERS=n)
        hp.validate(1)
        recur = hp.recur_span()
        assert hp.xsa_last_n == n and recur.stop == (n + 1) // 2 and len(recur) == min(3, recur.stop)
        # Parallel lanes: the top 3 blocks, all above the recurrence (no block is left at depth 1).
        assert (hp.parallel_start == -1) == (n == 1)
        assert n == 1 or (recur.stop <= hp.parallel_start and n - hp.parallel_start == min(3, n - recur.stop))


def test_explicit_block_indexed_settings_win_over_the_depth_defaults(monkeypatch):
    hp = from_env(monkeypatch, NUM_LAYERS=4, XSA_LAST_N=1, PARALLEL_START=-1, RECUR_LAYERS="")
    assert (hp.xsa_last_n, hp.parallel_start, hp.recur_span()) == (1, -1, range(0))
    hp = from_env(monkeypatch, NUM_LAYERS=6, XSA_LAST_N="", PARALLEL_START="", RECUR_LAYERS="2,3")
    assert (hp.xsa_last_n, hp.parallel_start, hp.recur_span()) == (6, 3, range(2, 4))  # empty number: its default


def test_partial_rope_default_is_a_quarter_of_the_head_unless_set(monkeypatch):
    assert tg.Hyperparameters.rope_dims == from_env(monkeypatch).rope_dims == 16  # 512 / 8 heads: 16 of 64
    assert from_env(monkeypatch, MODEL_DIM=96, NUM_HEADS=4).rope_dims == 6  # the record's mini shape: 6 of 24
    assert from_env(monkeypatch, MODEL_DIM=32, NUM_HEADS=4).rope_dims == 2
    assert from_env(monkeypatch, MODEL_DIM=96, NUM_HEADS=4, ROPE_DIMS=0).rope_dims == 0  # 0 = the whole head


@pytest.mark.slow
def test_every_depth_from_1_to_12_runs_on_the_default_block_indices(tiny_dataset, tmp_path, monkeypatch, capsys):
    # The tiny corpus with a 2k-token validation shard: each run is 2 steps, an export and two scoring passes.
    write_shard(tmp_path / "fineweb_val_000000.bin",
                np.fromfile(tiny_dataset.path / "fineweb_val_000000.bin", "<u2", offset=1024)[:2048])
    (tmp_path / "fineweb_train_000000.bin").symlink_to(tiny_dataset.path / "fineweb_train_000000.bin")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in range(1, 13):
            env = tiny_env(tiny_dataset, f"depth{n}", DATA_PATH=tmp_path, NUM_LAYERS=n, MODEL_DIM=16, NUM_HEADS=2,
                           NUM_KV_HEADS=1, ITERATIONS=2, TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=1, EVAL_STRIDE=0,
                           VAL_BATCH_SIZE=2048, SKIP_GATES=1, SMEAR=1, ATTN_GATE=1)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            for name in DEPTH_SETTINGS:
                monkeypatch.delenv(name.upper())  # only NUM_LAYERS says where the blocks are
            tg.main()
            lines = capsys.readouterr().out.strip().splitlines()
            assert {f"hparam {k.upper()}:{v}" for k, v in tg.depth_defaults(n).items()} <= set(lines), n
            assert lines[-1].startswith("final_submission "), n
    finally:
        torch.set_num_threads(threads)


def test_one_gpu_accumulates_gradients_to_keep_the_global_batch(monkeypatch):
    hp = from_env(monkeypatch)
    assert hp.accum_steps(1) == 8 and hp.accum_steps(8) == 1 and hp.accum_steps(2) == 4


def test_lr_warms_up_then_warms_down_to_zero_at_the_wall_clock(monkeypatch):
    hp = from_env(monkeypatch, LR_WARMUP_STEPS="10", WARMDOWN_FRAC="0.2", ITERATIONS="100000",
                  MAX_WALLCLOCK_SECONDS="100", MIN_LR_FRAC="0", GPTQ="0")  # GPTQ=1 would reserve 12 s of it
    assert tg.lr_multiplier(0, 0.0, hp) == pytest.approx(0.1)
    # The clock is further on than the steps: the warm-down covers its last 20 s.
    assert tg.lr_multiplier(5000, 70_000.0, hp) == 1.0
    assert tg.lr_multiplier(5000, 90_000.0, hp) == pytest.approx(0.5)
    assert tg.lr_multiplier(5000, 100_000.0, hp) == 0.0


def test_lr_warms_down_by_steps_without_a_wall_clock(monkeypatch):
    hp = from_env(monkeypatch, WARMDOWN_FRAC="0.1", ITERATIONS="1000", MAX_WALLCLOCK_SECONDS="0", MIN_LR_FRAC="0")
    assert tg.lr_multiplier(850, 1e9, hp) == 1.0
    assert tg.lr_multiplier(950, 1e9, hp) == pytest.approx(0.5)
    assert tg.training_progress(500, 1e9, hp) == 0.5


def test_warm_down_heads_for_zero_and_holds_at_the_lr_floor(monkeypatch):
    hp = from_env(monkeypatch, WARMDOWN_FRAC="0.1", ITERATIONS="1000", MAX_WALLCLOCK_SECONDS="0", MIN_LR_FRAC="0.1")
    assert tg.lr_multiplier(890, 1e9, hp) == 1.0
    assert tg.lr_multiplier(950, 1e9, hp) == pytest.approx(0.5)  # the line towards zero, not towards the floor
    assert tg.lr_multiplier(985, 1e9, hp) == pytest.approx(0.15)
    assert tg.lr_multiplier(995, 1e9, hp) == pytest.approx(0.1) == tg.lr_multiplier(1000, 1e9, hp)


def test_warmdown_frac_0_keeps_the_lr_flat(monkeypatch):
    hp = from_env(monkeypatch, WARMDOWN_FRAC="0", ITERATIONS="1000", MAX_WALLCLOCK_SECONDS="0")
    assert tg.lr_multiplier(999, 1e9, hp) == 1.0


def test_a_retired_setting_is_named_not_ignored(monkeypatch):
    with pytest.raises(tg.UserError, match="WARMDOWN_ITERS.*WARMDOWN_FRAC"):
        from_env(monkeypatch, WARMDOWN_ITERS="3500")
