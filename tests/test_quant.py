"""Quantise -> pack -> compress -> load -> dequantise, the straight-through estimator, and a safe loader."""
import pickle

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import plain_hp


def trained_like(rows=64, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different scale


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_quantisation_error_is_at_most_half_a_step_inside_the_clip(bits):
    w = trained_like()
    codes, scale = tg.quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax
    step = scale.float()[:, None]
    inside = w.abs() <= qmax * step
    err = (tg.dequantize_rows(codes, scale) - w).abs()
    assert torch.all(err[inside] <= step.expand_as(w)[inside] / 2 + 1e-6)


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_clip_search_never_loses_to_plain_max_scaling(bits):
    w = torch.cat([trained_like(), torch.randn(4, 96) * 8])  # a few heavy-tailed rows
    qmax = 2 ** (bits - 1) - 1
    codes, scale = tg.quantize_rows(w, bits)
    searched = (tg.dequantize_rows(codes, scale) - w).square().sum(dim=1)
    max_scale = tg.fp16_scale(w.abs().amax(dim=1, keepdim=True), qmax)
    plain = ((w / max_scale).round().clamp(-qmax, qmax) * max_scale - w).square().sum(dim=1)
    assert torch.all(searched <= plain + 1e-9)


@pytest.mark.parametrize("bits,rel_rmse", [(8, 0.01), (6, 0.04), (5, 0.08), (4, 0.16)])
def test_relative_reconstruction_error_shrinks_with_bits(bits, rel_rmse):
    w = torch.randn(256, 256)
    codes, scale = tg.quantize_rows(w, bits)
    err = (tg.dequantize_rows(codes, scale) - w).square().mean().sqrt() / w.square().mean().sqrt()
    assert err < rel_rmse


def small_state():
    hp = plain_hp(vocab_size=128, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                            qat_bits_attn=6, qat_bits_mlp=5, embed_bits=8)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return hp, model.state_dict()


def test_packing_is_lossless_for_codes_scales_and_fp16_tensors():
    hp, state = small_state()
    restored = tg.unpack_state(tg.serialize(tg.pack(tg.quantize_state(state, hp))))
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        bits = tg.export_bits(name, tensor, hp)
        expected = tg.dequantize_rows(*tg.quantize_rows(tensor, bits)) if bits < 16 else tensor.half().float()
        assert torch.equal(restored[name], expected), name


def test_bit_widths_follow_the_tensor_class():
    hp, state = small_state()
    assert tg.export_bits("blocks.0.attn.c_q.weight", state["blocks.0.attn.c_q.weight"], hp) == 6
    assert tg.export_bits("blocks.0.mlp.fc.weight", state["blocks.0.mlp.fc.weight"], hp) == 5
    assert tg.export_bits("tok_emb.weight", state["tok_emb.weight"], hp) == 8
    assert tg.export_bits("blocks.0.resid_mix", state["blocks.0.resid_mix"], hp) == 16


@pytest.mark.parametrize("compressor", sorted(tg.COMPRESSORS))
def test_artifact_roundtrip_through_disk(tmp_path, compressor):
    if compressor == "brotli":
        pytest.importorskip("brotli")
    hp, state = small_state()
    hp.compressor = compressor
    path = tmp_path / "model.pgz"
    packed = tg.pack(tg.quantize_state(state, hp))
    size = tg.write_artifact(str(path), tg.encode_artifact(packed, compressor))
    assert size == path.stat().st_size
    assert not list(tmp_path.glob("*.tmp*")), "temporary file left behind"
    loaded = tg.read_artifact(str(path))
    direct = tg.unpack_state(tg.serialize(packed))
    assert tg.method_name(path.read_bytes()) == compressor
    assert all(torch.equal(loaded[k], direct[k]) for k in state)


def rans_payload() -> bytes:
    """Three code blocks of different widths and spreads, like an embedding, a matrix and an LQER factor."""
    g = np.random.default_rng(0)
    blocks = [np.clip(np.round(g.standard_t(4, n) * k), -lim, lim).astype(np.int8)
              for n, k, lim in ((200_000, 9.0, 63), (300_000, 5.0, 31), (4_000, 30.0, 127))]
    table, at = [], 0
    for i, b in enumerate(blocks):
        table.append(dict(name=f"t{i}", shape=[b.size], bits=8, codes=[at, b.size], scale=[0, 0]))
        at += b.size
    return tg.serialize(tg.Packed(table, np.concatenate(blocks), np.zeros(0, np.float16), np.zeros(at)), True)


def order0_bytes(codes: np.ndarray) -> float:
    p = np.bincount(codes.astype(np.int64) + 128) / codes.size
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum() * codes.size / 8)


def test_rans_codes_within_a_fifth_of_a_percent_of_each_blocks_order0_entropy():
    payload = rans_payload()
    blob = tg.rans_encode(payload)
    tid, tables = tg.code_tables(tg.payload_header(payload), [])  # no matrices: one table per block
    codes = np.frombuffer(payload, np.int8, tid.size, 4)
    entropy = sum(order0_bytes(codes[tid == t]) for t in range(1, tables))
    coded = len(blob) - 4 - int.from_bytes(blob[:4], "little")  # rANS words and lane states, without the lzma part
    assert tg.rans_decode(blob, len(payload)) == payload
    assert tables == 4 and entropy < coded < 1.002 * entropy


def test_rans_shifts_off_centre_columns_and_classes_rows_by_spread():
    """Columns whose codes sit far off centre and rows of four spreads, like a briefly trained embedding: the
    shifts and row classes bring rans at least 5% below the matrix's plain order-0 entropy, losslessly."""
    g = np.random.default_rng(0)
    spread = np.repeat([2.0, 4.0, 8.0, 16.0], 512)[:, None]
    codes = np.clip(np.round(g.standard_normal((2048, 256)) * spread + g.integers(-12, 13, 256)), -63, 63)
    codes = codes.astype(np.int8)
    table = [dict(name="tok_emb.weight", shape=[2048, 256], bits=7, codes=[0, codes.size], scale=[0, 0])]
    payload = tg.serialize(tg.Packed(table, codes.ravel(), np.zeros(0, np.float16), np.zeros(codes.size)), True)
    shift, rows = tg.matrix_model(codes)
    blob = tg.rans_encode(payload)
    assert np.abs(shift.astype(int) - np.round(codes.mean(0))).max() == 0 and len(set(rows.tolist())) == 4
    assert tg.rans_decode(blob, len(payload)) == payload and len(blob) < 0.95 * order0_bytes(codes.ravel())


def test_a_truncated_rans_artifact_is_one_user_error(tmp_path):
    hp, state = small_state()
    blob = tg.encode_artifact(tg.pack(tg.quantize_state(state, hp)), "rans")
    path = tmp_path / "cut.pgz"
    path.write_bytes(blob[:-200])
    with pytest.raises(tg.UserError, match="does not decompress.*truncated"):
        tg.read_artifact(str(path))


def test_loader_refuses_a_torch_pickle(tmp_path):
    hp, state = small_state()
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(tg.UserError, match="not a Parameter Golf artifact"):
        tg.read_artifact(str(path))


def test_loader_refuses_a_pickle_inside_a_valid_container(tmp_path):
    payload = pickle.dumps({"x": 1})
    path = tmp_path / "evil.pgz"
    path.write_bytes(tg.ARTIFACT_MAGIC + len(payload).to_bytes(8, "little") + bytes([2])
                     + __import__("zlib").compress(payload))
    with pytest.raises(tg.UserError, match="PGQ1"):
        tg.read_artifact(str(path))


def test_straight_through_estimator_passes_gradients_unchanged():
    w = torch.randn(16, 32, requires_grad=True)
    upstream = torch.randn(16, 32)
    (tg.fake_quantize(w, 6) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_fake_quantisation_matches_the_export_grid_for_max_clipped_rows():
    w = torch.randn(8, 64)
    fq = tg.fake_quantize(w, 6)
    qmax = 31
    scale = tg.fp16_scale(w.abs().amax(dim=1, keepdim=True), qmax)
    assert torch.allclose(fq, (w / scale).round().clamp(-qmax, qmax) * scale)
    assert (fq / scale - (fq / scale).round()).abs().max() < 1e-4  # on the integer grid


def test_zero_rows_quantise_without_nan():
    w = torch.zeros(4, 16)
    assert torch.isfinite(tg.fake_quantize(w, 6)).all()
    codes, scale = tg.quantize_rows(w, 6)
    assert torch.equal(tg.dequantize_rows(codes, scale), w)


def test_std_mode_fake_quantisation_is_the_export_grid_at_the_qat_k():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((8, 64))
    exported = tg.dequantize_rows(*tg.quantize_rows(w, 6, "std", ks=(6.0,)))
    assert torch.allclose(tg.fake_quantize(w, 6, clip_k=6.0), exported, rtol=0, atol=1e-6)


def test_std_mode_reaches_every_qat_layer():
    hp, _ = small_state()
    hp.clip_mode, hp.qat_clip_k = "std", 4.5
    ks = {m.clip_k for m in tg.GPT(hp).modules() if isinstance(m, tg.CastedLinear)}
    assert ks == {4.5}


@pytest.mark.parametrize("clip_mode, qat_k", [("std", 9.0), ("max", 0.0)])
def test_without_clip_search_every_block_row_is_exported_on_the_qat_grid(clip_mode, qat_k):
    hp, state = small_state()
    hp.clip_mode, hp.qat_clip_k, hp.clip_search = clip_mode, 9.0, False
    restored = tg.unpack_state(tg.serialize(tg.pack(tg.quantize_state(state, hp))))
    for name, w in state.items():
        if name.startswith("blocks.") and name.endswith(".weight"):
            grid = tg.fake_quantize(w, tg.export_bits(name, w, hp), clip_k=qat_k)  # max mode: the row maximum
            assert torch.allclose(restored[name], grid, rtol=0, atol=1e-6), name


def test_a_wider_fixed_clip_makes_a_smaller_artifact():
    hp, _ = small_state()
    hp.clip_mode, hp.clip_search = "std", False
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.distributions.StudentT(3.0).sample((256, 1024)) * 0.02}
    sizes = []
    for k in (3.0, 5.0, 8.0):
        hp.qat_clip_k = k
        sizes.append(len(tg.encode_artifact(tg.pack(tg.quantize_state(state, hp)), "lzma")))
    assert sizes[0] > sizes[1] > sizes[2]
