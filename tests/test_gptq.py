"""GPTQ, Hessians from training tokens, std clipping, byte-planed fp16, the best compressor, and pruning to fit."""
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import plain_hp, parse_line, run_train, tiny_env
from test_quant import small_state


def correlated_layer(rows=48, cols=96, tokens=4096, seed=0):
    """Inputs living near a 12-dimensional subspace (as activations do), and weights of a trained-like scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 12, generator=g) @ torch.randn(12, cols, generator=g) + 0.1 * torch.randn(tokens, cols,
                                                                                                      generator=g)
    return x, torch.randn(rows, cols, generator=g) * 0.05


def output_error(x, w, codes, scale):
    return (x @ w.T - x @ tg.dequantize_rows(codes, scale).T).norm()


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_moves_the_layer_output_much_less_than_rounding_on_correlated_inputs(bits):
    x, w = correlated_layer()
    rtn, scale = tg.quantize_rows(w, bits)
    gptq = tg.gptq_quantize(w, x.T @ x / len(x), bits, scale)
    assert output_error(x, w, gptq, scale) < 0.5 * output_error(x, w, rtn, scale)


def test_act_order_rounds_the_loudest_inputs_first_and_moves_the_output_less():
    x, w = correlated_layer()
    x = x * torch.linspace(0.2, 3.0, x.size(1))  # inputs of very different loudness, quietest first
    h = x.T @ x / len(x)
    _, scale = tg.quantize_rows(w, 4)
    natural, ordered = (tg.gptq_quantize(w, h, 4, scale, act_order=a) for a in (False, True))
    assert not torch.equal(natural, ordered)
    assert output_error(x, w, ordered, scale) < 0.5 * output_error(x, w, natural, scale)


def test_act_order_keeps_the_salient_group_on_its_own_grid():
    x, w = correlated_layer(cols=256)
    h = x.T @ x / len(x)
    _, scale = tg.quantize_rows(w, 4)
    group_scale = tg.fp16_scale(w[:, 64:128].abs().amax(dim=1), 127)
    codes = tg.gptq_quantize(w, h, 4, scale, (64, 64, group_scale), act_order=True)
    assert codes[:, 64:128].abs().max() > 7 and codes[:, :64].abs().max() <= 7 and codes[:, 128:].abs().max() <= 7


def test_gptq_is_rounding_when_the_inputs_are_uncorrelated():
    _, w = correlated_layer()
    rtn, scale = tg.quantize_rows(w, 6)
    diagonal = torch.diag(torch.rand(w.size(1), generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(tg.gptq_quantize(w, diagonal, 6, scale), rtn)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_gptq_codes_stay_on_the_grid_even_when_errors_pile_onto_clipped_columns(bits):
    x, w = correlated_layer()
    w[:, :8] *= 30  # outliers far past a std clip: the propagated error keeps pushing the rounding outward
    _, scale = tg.quantize_rows(w, bits, "std", ks=(2.5,))
    codes = tg.gptq_quantize(w, x.T @ x / len(x), bits, scale)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() == qmax


def test_dead_inputs_get_zero_codes_and_no_nan():
    x, w = correlated_layer()
    x[:, [3, 50]] = 0.0  # features never active during calibration
    _, scale = tg.quantize_rows(w, 6)
    codes = tg.gptq_quantize(w, x.T @ x / len(x), 6, scale)
    assert codes[:, [3, 50]].abs().sum() == 0
    assert output_error(x, w, codes, scale).isfinite()


def tiny_model():
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    torch.manual_seed(0)
    return hp, tg.GPT(hp)


def test_hessians_are_the_mean_outer_product_of_each_quantised_layers_input():
    hp, model = tiny_model()
    batches = [torch.randint(0, hp.vocab_size, (2, 16)) for _ in range(3)]
    seen = []
    handle = model.blocks[1].mlp.proj.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].flatten(0, 1)))
    hessians = tg.collect_hessians(model, batches)
    handle.remove()
    block_matrices = {n for n, p in model.state_dict().items() if tg.export_bits(n, p, hp) < 16} - {"tok_emb.weight"}
    assert set(hessians) == block_matrices
    x = torch.cat(seen)
    assert torch.allclose(hessians["blocks.1.mlp.proj.weight"], x.T @ x / 96, rtol=1e-4, atol=1e-7)
    assert not any(m._forward_hooks for m in model.modules()), "collection must remove its hooks"


def test_gptq_embed_adds_the_tied_heads_input_hessian_under_the_embeddings_name():
    hp, model = tiny_model()
    batches = [torch.randint(0, hp.vocab_size, (2, 16)) for _ in range(3)]
    seen = []
    handle = model.final_norm.register_forward_hook(lambda m, inputs, out: seen.append(out.flatten(0, 1)))
    hessians = tg.collect_hessians(model, batches, embed=True)
    handle.remove()
    x = torch.cat(seen)
    assert torch.allclose(hessians["tok_emb.weight"], x.T @ x / 96, rtol=1e-4, atol=1e-7)
    assert "tok_emb.weight" not in tg.collect_hessians(model, batches)  # GPTQ_EMBED=0: the embedding rounds
    assert not any(m._forward_hooks for m in model.modules()), "collection must remove its hooks"


def test_gptq_on_the_embedding_moves_the_heads_output_less_than_rounding():
    x, w = correlated_layer(rows=64, cols=32)  # vocab x dim, the head's inputs near a subspace
    hp = plain_hp(gptq=True, embed_bits=6)
    rounded = tg.quantize_tensor("tok_emb.weight", w, 6, hp)
    solved = tg.quantize_tensor("tok_emb.weight", w, 6, hp, x.T @ x / len(x))
    assert solved.group < 0  # the AWQ group stays a block-matrix technique
    assert output_error(x, w, solved.codes, solved.scale) < 0.7 * output_error(x, w, rounded.codes, rounded.scale)


def test_clip_sigmas_fix_each_kinds_clip_at_k_std_without_the_cap():
    w = torch.randn(16, 64) * 0.05
    hp = plain_hp(clip_sigmas="mlp:11.5,attn:13")
    ones = torch.ones(64)
    for name, k in (("blocks.0.mlp.fc.weight", 11.5), ("blocks.0.attn.c_q.weight", 13.0)):
        _, scale = tg.row_grid(name, w, 6, hp, ones)
        assert torch.equal(scale.float(), tg.fp16_scale(k * w.std(dim=1, keepdim=True), 31).squeeze(1))
    assert (13 * w.std(dim=1) > w.abs().amax(dim=1)).all()  # uncapped: the clip lies past every row's max
    # A kind CLIP_SIGMAS leaves out searches as before.
    assert torch.equal(tg.row_grid("tok_emb.weight", w, 6, hp, ones)[1],
                       tg.row_grid("tok_emb.weight", w, 6, plain_hp(), ones)[1])


@pytest.mark.parametrize("value", ["mlp", "ffn:11", "mlp:-1", "attn:nan", "mlp:x"])
def test_a_malformed_clip_sigmas_is_a_user_error(value):
    with pytest.raises(tg.UserError, match="CLIP_SIGMAS"):
        plain_hp(clip_sigmas=value).validate(world_size=1)


def test_a_repeated_blocks_hessian_sums_the_inputs_of_every_pass():
    # Its weights act on every pass, so their quantisation error costs in each: the scorer runs with recurrence on.
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, recur_layers="1")
    torch.manual_seed(0)
    model = tg.GPT(hp)
    model.recur_on = True
    batches = [torch.randint(0, hp.vocab_size, (2, 16)) for _ in range(2)]
    seen = []
    model.blocks[1].mlp.fc.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].flatten(0, 1)))
    hessians = tg.collect_hessians(model, batches)
    x = torch.cat(seen)
    assert len(seen) == hp.recur_passes * len(batches) == 6
    assert torch.allclose(hessians["blocks.1.mlp.fc.weight"], x.T @ x / 64, rtol=1e-4, atol=1e-7)


def heavy_tailed(rows=64, cols=512, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def test_std_clip_picks_each_rows_clip_from_the_k_grid():
    w = heavy_tailed()
    _, scale = tg.quantize_rows(w, 6, "std")
    candidates = torch.cat([tg.fp16_scale(tg.std_clip(w, k), 31) for k in tg.STD_CLIP_KS], dim=1)
    assert torch.all((candidates == scale.float()[:, None]).any(dim=1))


@pytest.mark.parametrize("bits", [4, 6])
def test_std_clip_search_never_loses_to_a_fixed_k_on_heavy_tailed_rows(bits):
    w = heavy_tailed()
    qmax = 2 ** (bits - 1) - 1
    searched = (tg.dequantize_rows(*tg.quantize_rows(w, bits, "std")) - w).square().sum(dim=1)
    for k in (3.0, 6.0):
        scale = tg.fp16_scale(tg.std_clip(w, k), qmax)
        fixed = ((w / scale).round().clamp(-qmax, qmax) * scale - w).square().sum(dim=1)
        assert torch.all(searched <= fixed + 1e-9)


def test_hessian_weighted_clip_search_lowers_the_weighted_error():
    w = heavy_tailed()
    weight = torch.rand(w.size(1), generator=torch.Generator().manual_seed(2)) ** 4  # a few inputs dominate
    weighted_error = lambda codes, scale: ((tg.dequantize_rows(codes, scale) - w).square() * weight).sum()  # noqa: E731
    plain = weighted_error(*tg.quantize_rows(w, 4, "std"))
    assert weighted_error(*tg.quantize_rows(w, 4, "std", weight)) < plain


def test_byte_shuffle_is_lossless_and_stores_low_bytes_then_high_bytes():
    hp, state = small_state()
    packed = tg.pack(tg.quantize_state(state, hp))
    shuffled = tg.serialize(packed, shuffle=True)
    restored, plain = tg.unpack_state(shuffled), tg.unpack_state(tg.serialize(packed))
    assert all(torch.equal(restored[k], plain[k]) for k in state)
    planes = packed.halves.view(np.uint8)
    assert planes[0::2].tobytes() + planes[1::2].tobytes() in shuffled


def test_best_compressor_keeps_the_smallest_and_reads_back(tmp_path):
    hp, state = small_state()
    packed = tg.pack(tg.quantize_state(state, hp))
    best = tg.encode_artifact(packed, "best", shuffle=True)
    tried = ["rans", "zstd", "lzma"] + ["brotli"] * tg.have_brotli()
    assert len(best) == min(len(tg.encode_artifact(packed, m, shuffle=True)) for m in tried)
    tg.write_artifact(str(tmp_path / "m.pgz"), best)
    loaded, direct = tg.read_artifact(str(tmp_path / "m.pgz")), tg.unpack_state(tg.serialize(packed))
    assert all(torch.equal(loaded[k], direct[k]) for k in state)


def test_asking_for_brotli_without_the_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tg, "have_brotli", lambda: False)  # whether or not this machine has it
    with pytest.raises(tg.UserError, match="COMPRESSOR must be.*brotli"):
        plain_hp(compressor="brotli", eval_seq_len=2048).validate(1)


def codes_of(blob: bytes) -> np.ndarray:
    payload = zlib.decompress(blob[13:])
    header = json.loads(payload[len(payload) - 4 - int.from_bytes(payload[-4:], "little"):-4])
    return np.frombuffer(payload, np.int8, header["codes"], 4)


def test_pruning_fits_the_budget_by_zeroing_only_the_cheapest_unit_codes():
    hp, state = small_state()
    packed = tg.pack(tg.quantize_state(state, hp))
    unpruned = len(tg.encode_artifact(packed, "zlib"))
    blob, zeroed, before = tg.prune_to_fit(packed, unpruned - 300, "zlib")
    assert before == unpruned and len(blob) <= unpruned - 300
    changed = codes_of(blob) != packed.codes
    assert zeroed == changed.sum() > 0
    assert np.all(np.abs(packed.codes[changed]) == 1) and np.all(codes_of(blob)[changed] == 0)
    kept_unit = (np.abs(packed.codes) == 1) & ~changed
    assert packed.cost[changed].max() <= packed.cost[kept_unit].min()


def test_pruning_leaves_an_artifact_that_fits_untouched():
    hp, state = small_state()
    packed = tg.pack(tg.quantize_state(state, hp))
    blob, zeroed, before = tg.prune_to_fit(packed, 16_000_000, "zlib")
    assert zeroed == 0 and blob == tg.encode_artifact(packed, "zlib") and before == len(blob)


def test_pruning_gives_up_unpruned_when_even_every_unit_code_is_not_enough():
    hp, state = small_state()
    packed = tg.pack(tg.quantize_state(state, hp))
    blob, zeroed, _ = tg.prune_to_fit(packed, 1000, "zlib")
    assert zeroed == 0 and blob == tg.encode_artifact(packed, "zlib")


def test_the_loop_leaves_the_reserve_for_hessian_collection():
    hp = plain_hp(gptq=True, max_wallclock_seconds=100, gptq_reserve_seconds=10, iterations=10**6,
                            warmdown_frac=0.01)
    assert hp.train_seconds == 90
    assert tg.lr_multiplier(9000, 90_000.0, hp) == 0.0 and tg.training_progress(0, 90_000.0, hp) == 1.0
    assert plain_hp(max_wallclock_seconds=100, gptq_reserve_seconds=10).train_seconds == 100


ROUNDTRIP_TOLERANCE_BPB = 0.02  # as for the round-to-nearest export in test_train_e2e.py


@pytest.fixture(scope="module")
def gptq_run(tiny_dataset, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gptq")
    env = tiny_env(tiny_dataset, "gptq", GPTQ=1, GPTQ_CALIB_BATCHES=4, CLIP_MODE="std", BYTE_SHUFFLE=1,
                   COMPRESSOR="best", EVAL_STRIDE=0, ITERATIONS=16, TRAIN_LOG_EVERY=8)
    result = run_train(cwd, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env, result.stdout


@pytest.mark.slow
def test_gptq_run_logs_its_calibration_and_counts_it_as_training_time(gptq_run):
    _, out = gptq_run
    gptq = parse_line(out, "gptq")
    assert gptq["calib_batches"] == "4" and float(gptq["quant_ms"]) >= 0
    final = parse_line(out, "final_submission")
    assert float(final["train_time_ms"]) == float(parse_line(out, "train_done")["train_time"].rstrip("ms"))
    assert float(final["train_time_ms"]) >= float(gptq["hessian_ms"])


def test_gptq_run_roundtrip_score_is_close_to_the_pre_export_score(gptq_run):
    _, out = gptq_run
    pre = float(parse_line(out, "pre_export_exact")["val_bpb"])
    post = float(parse_line(out, "final_roundtrip_exact")["val_bpb"])
    assert abs(post - pre) < ROUNDTRIP_TOLERANCE_BPB


@pytest.mark.slow
def test_a_run_just_over_the_limit_prunes_to_fit_and_is_scored(gptq_run, tmp_path):
    env, out = gptq_run
    fits = int(parse_line(out, "artifact")["bytes_model"])
    source = Path(tg.__file__).read_text()
    limit_line = "SIZE_LIMIT = 16_000_000"
    copy = tmp_path / "train_gpt.py"
    copy.write_text(source.replace(limit_line, f"SIZE_LIMIT = {fits + len(source.encode()) - 1_000:_}"))
    result = subprocess.run([sys.executable, str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prune = parse_line(result.stdout, "prune")
    assert int(prune["bytes_before"]) == fits and int(prune["zeroed"]) > 0
    artifact = parse_line(result.stdout, "artifact")
    assert int(artifact["bytes_total"]) <= int(artifact["limit"])
    assert "final_submission" in result.stdout


def test_pruning_search_needs_few_real_encodes(monkeypatch):
    """A real encode is about a minute for zstd-22 at full size, so the search runs on quick_size; here the quick
    estimate is off by a curve the first real encode cannot know, and the rescaled search must still land on the
    fewest codes within a few real encodes."""
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([-1, 1, 3], np.int8), 3_000_000)
    packed = tg.Packed([], codes, np.zeros(0, np.float16), rng.random(codes.size).astype(np.float32))
    encodes = []

    def linear_size(p, method, shuffle=False):  # every zeroed code saves a quarter byte
        encodes.append(int((p.codes == 0).sum()))
        return tg.ARTIFACT_MAGIC + bytes([2]) + bytes(1_000_000 - encodes[-1] // 4)

    def curved_quick_size(p, shuffle=False):  # a third of the real size, falling a little faster
        n = int((p.codes == 0).sum())
        return (1_000_000 - n // 4) // 3 - n // 40

    monkeypatch.setattr(tg, "encode_artifact", linear_size)
    monkeypatch.setattr(tg, "quick_size", curved_quick_size)
    blob, zeroed, _ = tg.prune_to_fit(packed, 1_000_005 - 40_000 // 4, "zlib")
    assert len(blob) <= 1_000_005 - 10_000 and 40_000 <= zeroed <= 40_400
    assert len(encodes) <= 4  # unpruned, then the first estimate's count and a rescaled one or two
