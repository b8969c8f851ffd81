"""Configuration: environment variables are read once, and bad values stop with a line naming the variable."""
import pytest

import train_gpt as tg


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
    assert (hp.train_seq_len, hp.train_batch_tokens, hp.eval_stride, hp.eval_seq_len) == (2048, 786432, 64, 2048)
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
])
def test_invalid_values_name_the_variable(monkeypatch, env, world, names):
    with pytest.raises(tg.UserError, match=names):
        from_env(monkeypatch, **env).validate(world)


def test_one_gpu_accumulates_gradients_to_keep_the_global_batch(monkeypatch):
    hp = from_env(monkeypatch)
    assert hp.accum_steps(1) == 8 and hp.accum_steps(8) == 1 and hp.accum_steps(2) == 4


def test_lr_warms_up_then_warms_down_to_zero_at_the_wall_clock(monkeypatch):
    hp = from_env(monkeypatch, LR_WARMUP_STEPS="10", WARMDOWN_ITERS="100", ITERATIONS="100000",
                  MAX_WALLCLOCK_SECONDS="100", MIN_LR_FRAC="0", GPTQ="0")  # GPTQ=1 would reserve 12 s of it
    assert tg.lr_multiplier(0, 0.0, hp) == pytest.approx(0.1)
    # 10 ms per step: 100 s allow 10,000 steps; warm-down covers the last 100 of them (the last second).
    assert tg.lr_multiplier(5000, 50_000.0, hp) == 1.0
    assert tg.lr_multiplier(9950, 99_500.0, hp) == pytest.approx(0.5)
    assert tg.lr_multiplier(10000, 100_000.0, hp) == 0.0


def test_lr_warms_down_by_steps_without_a_wall_clock(monkeypatch):
    hp = from_env(monkeypatch, WARMDOWN_ITERS="100", ITERATIONS="1000", MAX_WALLCLOCK_SECONDS="0", MIN_LR_FRAC="0")
    assert tg.lr_multiplier(850, 1e9, hp) == 1.0
    assert tg.lr_multiplier(950, 1e9, hp) == pytest.approx(0.5)
    assert tg.training_progress(500, 1e9, hp) == 0.5


def test_warm_down_ends_at_the_lr_floor(monkeypatch):
    hp = from_env(monkeypatch, WARMDOWN_ITERS="100", ITERATIONS="1000", MAX_WALLCLOCK_SECONDS="0", MIN_LR_FRAC="0.1")
    assert tg.lr_multiplier(850, 1e9, hp) == 1.0
    assert tg.lr_multiplier(950, 1e9, hp) == pytest.approx(0.55)
    assert tg.lr_multiplier(1000, 1e9, hp) == pytest.approx(0.1)
