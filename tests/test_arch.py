"""Optional architecture features: partial RoPE, LN scale, XSA, parallel blocks, depth recurrence, SmearGate and
BigramHash. Each is checked for the one property that defines it, and all of them together for causality, the
optimizer split, the artifact and a whole training run."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import parse_line, randomised, run_train, small_hp, tiny_env

ALL_ON = dict(rope_dims=4, ln_scale=True, xsa_last_n=2, parallel_start=3, recur_layers="1,2", smear=True,
              bigram_buckets=64, bigram_dim=16)




def test_changing_a_future_token_leaves_earlier_logits_unchanged_with_every_feature_on():
    model = randomised(tg.GPT(small_hp(**ALL_ON)))
    model.recur_on = True
    x = torch.randint(2, 97, (2, 24))
    x[:, [0, 9]] = tg.BOS_ID
    x2 = x.clone()
    x2[:, 15] = (x2[:, 15] + 1) % 97
    with torch.no_grad():
        a, b = model.logits(x), model.logits(x2)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_partial_rope_leaves_dims_beyond_rope_dims_position_free():
    attn = tg.GPT(small_hp(rope_dims=4)).blocks[0].attn  # head_dim 8: dims 0..3 rotate, 4..7 do not
    cos, sin = attn.rotary(10, torch.device("cpu"), torch.float32)
    same_vector_everywhere = torch.randn(8).expand(10, 1, 8)  # (time, heads, head_dim)
    rotated = tg.apply_rotary(same_vector_everywhere, cos, sin)[:, 0]
    assert torch.equal(rotated[:, 4:], same_vector_everywhere[:, 0, 4:])
    assert not torch.allclose(rotated[1:, :4], rotated[:1, :4].expand(9, 4))


def test_xsa_output_is_orthogonal_to_each_position_own_value_vector():
    hp = small_hp(xsa_last_n=1)
    attn = randomised(tg.GPT(hp)).blocks[-1].attn
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(32))  # the output is the concatenated heads
    values = {}
    attn.c_v.register_forward_hook(lambda m, args, out: values.__setitem__("v", out))
    with torch.no_grad():
        y = attn(torch.randn(2, 12, 32)).view(2, 12, 4, 8)
    v = values["v"].view(2, 12, 2, 8).repeat_interleave(2, dim=2)  # query head h uses kv head h // 2
    # Relative to the largest output: position 0 attends only to itself, so XSA leaves it (almost) nothing.
    relative = (y * v).sum(-1).abs() / (v.norm(dim=-1) * y.norm(dim=-1).max())
    assert attn.xsa and relative.max() < 1e-4


def test_a_parallel_block_feeds_attention_lane_0_and_the_mlp_lane_1_and_both_outputs_into_both_lanes():
    model = randomised(tg.GPT(small_hp(parallel_start=3, ln_scale=True)))
    block = model.blocks[4]
    x, lane, x0 = torch.randn(2, 10, 32), torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    with torch.no_grad():
        mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
        attn = block.attn_scale * block.attn(F.rms_norm(mixed, (32,)) / math.sqrt(5))  # LN_SCALE: 1/sqrt(4 + 1)
        mlp = block.mlp_scale * block.mlp(F.rms_norm(lane, (32,)) / math.sqrt(5))
        r, p = block.lane_resid, block.lane_post
        lane0, lane1 = block.lanes(x, lane, x0, None)
    assert block.parallel and not model.blocks[2].parallel and not hasattr(model.blocks[2], "lane_post")
    assert torch.allclose(lane0, r[0] * x + p[0, 0] * attn + p[1, 0] * mlp, atol=1e-5)
    assert torch.allclose(lane1, r[1] * lane + p[0, 1] * attn + p[1, 1] * mlp, atol=1e-5)


def test_two_lanes_start_as_the_records_lambdas_and_the_head_reads_their_mean():
    fresh = tg.GPT(small_hp(parallel_start=4)).blocks[4]
    assert fresh.lane_resid.tolist() == pytest.approx([1.1, 1.1]) and torch.equal(fresh.lane_post, torch.ones(2, 2))
    model, captured = randomised(tg.GPT(small_hp(parallel_start=4))), {}
    real = model.blocks[4].lanes  # the last block is the only parallel one
    model.blocks[4].lanes = lambda *args: captured.setdefault("lanes", real(*args))
    with torch.no_grad():
        out = model.logits(torch.randint(0, 97, (2, 12)))
        hidden = F.rms_norm(0.5 * (captured["lanes"][0] + captured["lanes"][1]), (32,))
        assert torch.allclose(out, 30 * torch.tanh(F.linear(hidden, model.tok_emb.weight) / 30), atol=1e-4)


def test_recurrence_off_gives_the_plain_model_logits_from_the_first_skip_rows():
    plain = randomised(tg.GPT(small_hp(skip_gates=True)))
    recurrent = randomised(tg.GPT(small_hp(skip_gates=True, recur_layers="1,2,3")), seed=1)
    # The rows the unrolled order adds (5 entries of 11 vs 2 of 5) keep other values: unused while it is off.
    rows = {k: torch.cat([plain.state_dict()[k], recurrent.state_dict()[k][2:]])
            for k in ("skip_weights", "skip_gates")}
    assert rows["skip_weights"].shape == (5, 32)
    recurrent.load_state_dict({**plain.state_dict(), **rows})
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain.logits(x), recurrent.logits(x))


@pytest.mark.parametrize("passes,order", [(3, [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4]), (2, [0, 1, 2, 3, 1, 2, 3, 4]),
                                          (1, [0, 1, 2, 3, 4])])
def test_recurrence_on_runs_the_span_recur_passes_times_in_all_and_every_other_block_once(passes, order):
    model = randomised(tg.GPT(small_hp(recur_layers="1,2,3", recur_passes=passes)))
    model.recur_on = True
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: ran.append(i))
    with torch.no_grad():
        model.logits(torch.randint(0, 97, (1, 8)))
    assert ran == order and model.recur == (passes > 1)


def test_one_pass_is_no_recurrence():
    plain = randomised(tg.GPT(small_hp()))
    once = tg.GPT(small_hp(recur_layers="1,2,3", recur_passes=1))
    once.load_state_dict(plain.state_dict())  # same skip rows: the order is not unrolled
    once.recur_on = True
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain.logits(x), once.logits(x))


@pytest.mark.slow
def test_compiled_model_follows_the_recurrence_switch():
    torch._dynamo.reset()
    model = randomised(tg.GPT(small_hp(recur_layers="2,3")))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        off = compiled(x, x)
        model.recur_on = True
        on, eager_on = compiled(x, x), model(x, x)
        model.recur_on = False
        off_again = compiled(x, x)
    assert not torch.allclose(off, on)
    assert torch.allclose(on, eager_on, atol=1e-6)
    assert torch.allclose(off, off_again, atol=1e-6)


@pytest.mark.parametrize("feature", [dict(smear=True), dict(bigram_buckets=64, bigram_dim=16)])
def test_a_bos_position_gets_nothing_from_the_token_before_it(feature):
    model = randomised(tg.GPT(small_hp(**feature)))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randint(2, 97, (1, 12))
    x[0, 6] = tg.BOS_ID
    changed = x.clone()
    changed[0, [5, 8]] = (changed[0, [5, 8]] + 1) % 95 + 2  # the token before the BOS, and one mid-document
    with torch.no_grad():
        model.logits(x), model.logits(changed)
    assert torch.equal(seen[0][0, 6], seen[1][0, 6])
    assert not torch.allclose(seen[0][0, 9], seen[1][0, 9])


def test_the_smear_starts_as_the_identity_and_learns_its_strength():
    smeared, plain = tg.GPT(small_hp(smear=True)), randomised(tg.GPT(small_hp()))
    smeared.load_state_dict({**plain.state_dict(), "smear_gate": torch.randn(12), "smear_lambda": torch.zeros(1)})
    x = torch.randint(2, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(smeared.eval().logits(x), plain.logits(x))
    smeared.train()
    smeared(x, x).backward()
    assert smeared.smear_lambda.grad.abs().item() > 0


def test_every_parameter_is_in_exactly_one_optimizer_group_with_every_feature_on():
    model = tg.GPT(small_hp(**ALL_ON, tie_embeddings=False))
    muon, adam = tg.build_optimizers(model, small_hp(**ALL_ON, tie_embeddings=False), 0, 1, fused=False)
    groups = [muon.param_groups[0]["params"]] + [g["params"] for g in adam.param_groups]
    placed = [id(p) for g in groups for p in g]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())
    embed, scalar = adam.param_groups[0]["params"], adam.param_groups[1]["params"]
    assert any(p is model.bigram_proj.weight for p in groups[0])
    assert any(p is model.bigram_emb.weight for p in embed) and any(p is model.smear_gate for p in scalar) and \
        any(p is model.smear_lambda for p in scalar)


def test_every_tensor_survives_the_artifact_with_every_feature_on(tmp_path):
    hp = small_hp(**ALL_ON)
    model = randomised(tg.GPT(hp))
    state = model.state_dict()
    blob = tg.encode_artifact(tg.pack(tg.quantize_state(state, hp)), hp.compressor)
    tg.write_artifact(str(tmp_path / "m.pgz"), blob)
    loaded = tg.read_artifact(str(tmp_path / "m.pgz"))
    assert list(loaded) == list(state) and {"bigram_emb.weight", "bigram_proj.weight", "smear_gate", "smear_lambda"} <= set(state)
    for name, tensor in state.items():
        step = tensor.abs().max() / (2 ** (tg.export_bits(name, tensor, hp) - 1) - 1)
        assert loaded[name].shape == tensor.shape
        assert (loaded[name] - tensor).abs().max() <= 0.3 * tensor.abs().max() + step, name
    assert tg.export_bits("bigram_emb.weight", state["bigram_emb.weight"], hp) == hp.embed_bits
    assert tg.export_bits("bigram_proj.weight", state["bigram_proj.weight"], hp) == hp.qat_bits_mlp
    tg.GPT(hp).load_state_dict(loaded, strict=True)


@pytest.mark.parametrize("field,value", [("rope_dims", 3), ("rope_dims", 10), ("xsa_last_n", 6),
                                         ("parallel_start", 5), ("recur_layers", "1,3"), ("recur_layers", "4,5"),
                                         ("recur_layers", "a"), ("recur_passes", 0), ("recur_start_frac", 1.5),
                                         ("bigram_buckets", -1), ("bigram_dim", 0)])
def test_invalid_feature_settings_name_the_variable_in_one_line(field, value):
    with pytest.raises(tg.UserError, match=field.upper()) as error:
        small_hp(**{field: value}).validate(1)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_training_with_every_feature_on_enables_recurrence_and_scores_the_artifact(tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "allfeatures", ITERATIONS=20, EVAL_STRIDE=0, WARMUP_STEPS=2, ROPE_DIMS=8,
                   LN_SCALE=1, XSA_LAST_N=2, PARALLEL_START=2, RECUR_LAYERS="1,2", RECUR_START_FRAC=0.5, SMEAR=1,
                   BIGRAM_BUCKETS=256, BIGRAM_DIM=32)
    result = run_train(tmp_path, env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    enabled = parse_line(result.stdout, "recurrence_enabled")
    assert (enabled["step"], enabled["order"], enabled["encoder"]) == ("10", "0,1,2,1,2,1,2,3", "4")
    assert math.isfinite(float(parse_line(result.stdout, "final_submission")["val_bpb"]))


def test_muon_gets_only_linear_weights_and_the_mixing_tables_go_to_adam():
    model = tg.GPT(small_hp())
    muon, adam = tg.build_optimizers(model, small_hp(), 0, 1, fused=False)
    muon_ids = {id(p) for p in muon.param_groups[0]["params"]}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, tg.CastedLinear)}
    assert muon_ids == linear_ids
    assert all(id(block.resid_mix) in {id(p) for p in adam.param_groups[1]["params"]} for block in model.blocks)
