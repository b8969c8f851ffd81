"""The frontier techniques: gated U-Net skips, the attention output gate, the asymmetric soft-cap, a
growing training context, AWQ-style salient columns, LQER error factors, and the fit ladder."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import plain_hp, parse_line, randomised, run_train, small_hp, tiny_env
from test_gptq import correlated_layer




def logits(model, x):
    with torch.no_grad():
        return model.logits(x)


X = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------


def test_a_fully_open_skip_gate_ignores_the_skip_and_a_closed_one_takes_only_the_skip():
    no_skip = randomised(tg.GPT(small_hp()))
    gated = tg.GPT(small_hp(skip_gates=True)).eval()
    gated.load_state_dict({**no_skip.state_dict(), "skip_gates": gated.skip_gates.detach()})
    with torch.no_grad():
        gated.skip_gates.fill_(40.0)  # sigmoid = 1: x stays as it is
        no_skip.skip_weights.zero_()
    assert torch.allclose(logits(gated, X), logits(no_skip, X), atol=1e-5)
    with torch.no_grad():
        gated.skip_gates.fill_(-40.0)  # sigmoid = 0: x becomes the weighted skip
    assert not torch.allclose(logits(gated, X), logits(no_skip, X), atol=1e-3)


def test_skip_gates_start_as_an_even_mix_and_learn():
    model = tg.GPT(small_hp(skip_gates=True))
    assert torch.equal(model.skip_gates, torch.zeros(2, 32))
    model(X, X).backward()
    assert model.skip_gates.grad is not None


def test_the_attention_gate_starts_at_half_of_each_heads_output():
    gated, plain = tg.GPT(small_hp(attn_gate=True)), tg.GPT(small_hp())
    randomised(plain)
    state = {**plain.state_dict(), **{k: v for k, v in gated.state_dict().items() if k.endswith(".attn.gate")}}
    gated.load_state_dict(state)
    halved = {k: v * 0.5 if k.endswith("attn.proj.weight") else v for k, v in plain.state_dict().items()}
    plain.load_state_dict(halved)  # the output projection is linear: halving it is halving every head
    assert torch.allclose(logits(gated.eval(), X), logits(plain, X), atol=1e-6)


def test_the_attention_gate_scale_multiplies_the_gate_logit():
    a, b = (randomised(tg.GPT(small_hp(attn_gate=True, attn_gate_scale=s))) for s in (0.5, 1.0))
    with torch.no_grad():
        for block_a, block_b in zip(a.blocks, b.blocks):
            block_a.attn.gate.copy_(2 * block_b.attn.gate)
    assert not torch.allclose(a.blocks[0].attn.gate, b.blocks[0].attn.gate)
    assert torch.allclose(logits(a, X), logits(b, X), atol=1e-5)


def test_the_attention_gate_reads_the_current_token_only_and_learns():
    model = randomised(tg.GPT(small_hp(attn_gate=True)))
    x2 = X.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 97
    assert torch.allclose(logits(model, X)[:, :10], logits(model, x2)[:, :10], atol=1e-6)  # still causal
    model.train()
    model(X, X).backward()
    assert all(block.attn.gate.grad.abs().sum() > 0 for block in model.blocks)


def test_the_asymmetric_soft_cap_bounds_each_sign_by_its_own_cap():
    model = tg.GPT(small_hp(logit_softcap=3.0, logit_softcap_neg=1.5))
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e4)  # saturate both signs
    out = logits(model.eval(), X)
    assert out.max() <= 3.0 and out.min() >= -1.5 and out.max() > 2.9 and out.min() < -1.45


def test_learnable_caps_start_as_the_fixed_ones_and_only_a_global_ttt_phase_moves_them():
    fixed = randomised(tg.GPT(small_hp(logit_softcap=3.0, logit_softcap_neg=1.5)))
    learnable = tg.GPT(small_hp(logit_softcap=3.0, logit_softcap_neg=1.5, asym_logit=True))
    learnable.load_state_dict({**fixed.state_dict(), "softcaps": torch.tensor([3.0, 1.5])})
    assert torch.equal(logits(learnable.eval(), X), logits(fixed, X))
    learnable.train()
    learnable(X, X).backward()  # training: the caps take no gradient
    assert learnable.softcaps.grad is None and learnable.softcaps.tolist() == [3.0, 1.5]
    tokens = torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, 97, (200,))])
    starts, counts = tg.document_spans(tokens.numpy())
    hp = small_hp(logit_softcap=3.0, logit_softcap_neg=1.5, asym_logit=True, eval_seq_len=32, ttt_phase_lr=0.5)
    tg.train_on_scored(learnable.eval(), learnable, tokens, starts, counts, hp, 0, 1)
    assert learnable.softcaps.tolist() != [3.0, 1.5] and not learnable.softcaps.requires_grad


def test_equal_caps_are_the_symmetric_soft_cap():
    a, b = randomised(tg.GPT(small_hp())), randomised(tg.GPT(small_hp(logit_softcap_neg=30.0)))
    assert torch.equal(logits(a, X), logits(b, X))


@pytest.mark.parametrize("schedule", ["", "64@0,128@0.3", "32@0,64@0.2,128@0.7"])
def test_a_valid_context_schedule_ends_at_the_training_length(schedule):
    stages = plain_hp(train_seq_len=128, train_seq_schedule=schedule).seq_schedule()
    assert stages[0][1] == 0.0 and stages[-1][0] == 128


@pytest.mark.parametrize("schedule", ["64@0.1,128@0.5", "64@0,128@0.5,256@0.9", "128@0,64@0.5", "64@0,128@0",
                                      "64:0,128:0.5", "64@0,128@1.5"])
def test_a_malformed_context_schedule_is_one_user_error(schedule):
    with pytest.raises(tg.UserError, match="TRAIN_SEQ_SCHEDULE"):
        plain_hp(train_seq_len=128, train_seq_schedule=schedule).validate(1)


def test_every_stretch_of_training_is_a_state_compiled_before_the_clock():
    """Context 64 then 128 at 40%, recurrence from 30%, QAT from 85%: five stretches, five training graphs."""
    hp = small_hp(train_seq_len=128, train_seq_schedule="64@0,128@0.4", recur_layers="1,2", recur_start_frac=0.3,
                  qat_start_frac=0.85)
    trainer = type("T", (), {"hp": hp, "schedule": hp.seq_schedule(), "model": tg.GPT(hp)})()
    assert tg.Trainer.training_states(trainer) == [(64, False, False), (64, True, False), (128, True, False),
                                                   (128, True, True)]


def test_after_a_context_switch_the_learning_rate_ramps_back_over_the_rewarm_steps():
    hp = tg.Hyperparameters(seq_change_warmup_steps=4)
    assert [tg.rewarm(step, 10, hp) for step in range(10, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert tg.rewarm(3, 0, hp) == 1.0  # the first length is no switch
    assert tg.rewarm(10, 10, tg.Hyperparameters()) == 1.0  # off by default


@pytest.mark.slow
def test_a_run_with_a_growing_context_switches_at_its_fraction(tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "grow", TRAIN_SEQ_SCHEDULE="32@0,64@0.5", ITERATIONS=20, EVAL_STRIDE=0,
                   WARMUP_STEPS=2, SEQ_CHANGE_WARMUP_STEPS=3)
    result = run_train(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    switch = parse_line(result.stdout, "seq_len_changed")
    assert (switch["step"], switch["seq_len"], switch["rewarm_steps"]) == ("10", "64", "3")


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def layer_with_a_loud_group(rows=48, cols=256):
    """Correlated inputs with one 64-column group far louder than the rest, as activation outliers are."""
    x, _ = correlated_layer(rows, cols)
    x[:, 128:192] *= 8
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2)) * 0.05
    return x, w, x.T @ x / len(x)


def test_the_salient_group_is_the_loudest_aligned_column_group():
    _, w, h = layer_with_a_loud_group()
    assert tg.salient_group(w, h, 64) == 128


def test_awq_keeps_the_salient_group_at_8_bits_and_lowers_the_output_error():
    x, w, h = layer_with_a_loud_group()
    hp = plain_hp(gptq=True)
    plain = tg.quantize_tensor("blocks.0.mlp.fc.weight", w, 4, hp, h)
    awq = tg.quantize_tensor("blocks.0.mlp.fc.weight", w, 4, plain_hp(gptq=True, awq_group=True), h)
    assert awq.group == 128 and awq.codes[:, 128:192].abs().max() > 7  # beyond the 4-bit range
    err = lambda t: (x @ (w - t.dequantize()).T).norm()  # noqa: E731
    assert err(awq) < 0.8 * err(plain)


def test_lqer_corrects_the_worst_matrices_and_lowers_their_error():
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                  qat_bits_mlp=4, lqer_rank=4, lqer_tensors=2)
    state = randomised(tg.GPT(hp)).state_dict()
    tensors = tg.quantize_state(state, plain_hp(**{**hp.__dict__, "lqer_rank": 0}))
    error = {t.name: float((state[t.name] - t.dequantize()).norm()) for t in tensors if t.bits < 16}
    chosen = tg.add_lqer(tensors, state, hp)
    assert sorted(chosen) == sorted(sorted(error, key=error.get)[-2:])
    for t in tensors:
        if t.name in chosen:
            assert (state[t.name] - t.dequantize()).norm() < error[t.name]


def test_lqer_factors_are_2_and_4_bit_on_the_records_grids_and_still_correct():
    torch.manual_seed(0)
    error = torch.randn(48, 8) @ torch.randn(8, 96) * 0.01  # a quantisation error of rank 8
    a_codes, a_scale, b_codes, b_scale = tg.lqer_factors(error, 4)
    assert a_scale.numel() == 1 and b_scale.numel() == 4 * 96 // tg.LQER_ASYM_GROUP
    assert a_codes.min() >= -2 and a_codes.max() <= 1 and b_codes.min() >= -8 and b_codes.max() <= 7
    corrected = (error - tg.dequantize_groups(a_codes, a_scale).T @ tg.dequantize_groups(b_codes, b_scale)).norm()
    assert corrected < 0.9 * error.norm()


def test_lqer_factors_too_small_for_the_groups_are_8_bit_rows():
    error = torch.randn(8, 40) * 0.01  # rank 2 x 40 values: no multiple of 32
    a_codes, a_scale, b_codes, b_scale = tg.lqer_factors(error, 2)
    assert a_scale.numel() == 2 and b_scale.numel() == 2 and b_codes.abs().max() > 7


def test_lqer_picks_the_largest_absolute_error():
    torch.manual_seed(0)
    small, large = torch.randn(16, 64) * 0.01, torch.randn(16, 64)
    small[:, 0] = 0.3  # an outlier per row stretches the grid: the larger relative error, the smaller absolute one
    state = {"blocks.0.mlp.fc.weight": small, "blocks.1.mlp.fc.weight": large}
    hp = plain_hp(qat_bits_mlp=4, lqer_rank=2, lqer_tensors=1)
    tensors = [tg.quantize_tensor(name, w, 4, hp) for name, w in state.items()]
    assert tg.add_lqer(tensors, state, hp) == ["blocks.1.mlp.fc.weight"]


def test_lqer_and_awq_survive_the_artifact_and_are_never_pruned():
    x, w, h = layer_with_a_loud_group()
    hp = plain_hp(gptq=True, awq_group=True, lqer_rank=4, lqer_tensors=1)
    t = tg.quantize_tensor("blocks.0.mlp.fc.weight", w, 5, hp, h)
    tg.add_lqer([t], {t.name: w}, hp)
    packed = tg.pack([t])
    restored = tg.unpack_state(tg.serialize(packed))[t.name]
    assert torch.equal(restored, t.dequantize())
    factors = t.lqer[0].numel() + t.lqer[2].numel()
    assert np.isinf(packed.cost[-factors:]).all() and not np.isinf(packed.cost[:-factors]).any()


def test_lqer_asym_is_retired_with_a_message_that_says_what_to_do(monkeypatch):
    monkeypatch.setenv("LQER_ASYM", "0")
    with pytest.raises(tg.UserError, match="LQER_ASYM is no longer read: LQER always takes the records"):
        tg.Hyperparameters.from_env()


def test_the_fit_ladder_lowers_bits_when_pruning_cannot_fit_and_logs_each_step():
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=4,
                            compressor="zlib")
    state = randomised(tg.GPT(hp)).state_dict()
    tensors = tg.quantize_state(state, hp)
    full = len(tg.encode_artifact(tg.pack(tensors), "zlib"))
    budget = int(full * 0.8)  # out of pruning's reach on near-Gaussian codes
    lines = []
    blob = tg.fit_artifact(tensors, state, {}, hp, budget, lines.append)
    assert len(blob) <= budget
    lowered = [parse_line(line, "fit_lower") for line in lines if line.startswith("fit_lower ")]
    assert lowered and all(int(step["bits"][-1]) == int(step["bits"].split("->")[0]) - 1 for step in lowered)
    assert tg.unpack_state(tg.serialize(tg.pack(tensors))).keys() == state.keys()


def test_the_ladder_goes_below_four_bits_when_nothing_else_fits():
    """A nearly untrained 11 x 512 model did not fit 16 MB with every matrix at 4 bits: the ladder goes on down."""
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=4,
                  compressor="zlib")
    state = randomised(tg.GPT(hp)).state_dict()
    tensors = tg.quantize_state(state, hp)
    budget = int(len(tg.encode_artifact(tg.pack(tensors), "zlib")) * 0.45)
    blob = tg.fit_artifact(tensors, state, {}, hp, budget, lambda line: None)
    assert len(blob) <= budget and min(t.bits for t in tensors) < 4


@pytest.mark.slow
def test_a_run_whose_model_cannot_fit_by_pruning_still_ends_with_a_score(tiny_dataset, tmp_path):
    """The ladder makes the artifact fit a limit 20% below its natural size: no oversize stop, a final score."""
    env = tiny_env(tiny_dataset, "ladder", ITERATIONS=6, EVAL_STRIDE=0, COMPRESSOR="zlib")
    natural = int(parse_line(run_train(tmp_path, env).stdout, "artifact")["bytes_model"])
    source = Path(tg.__file__).read_text()
    copy = tmp_path / "train_gpt.py"
    limit = len(source.encode()) + int(0.8 * natural)
    copy.write_text(source.replace("SIZE_LIMIT = 16_000_000", f"SIZE_LIMIT = {limit:_}"))
    result = subprocess.run([sys.executable, str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    artifact = parse_line(result.stdout, "artifact")
    assert int(artifact["bytes_total"]) <= int(artifact["limit"]) and "fit_lower " in result.stdout
    assert float(parse_line(result.stdout, "final_submission")["val_bpb"]) > 0


def test_orthogonal_init_gives_the_input_maps_unit_singular_values_and_keeps_outputs_zero():
    torch.manual_seed(0)
    block = tg.GPT(small_hp(ortho_init=True)).blocks[0]
    for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.fc.weight):
        assert torch.allclose(torch.linalg.svdvals(w), torch.ones(min(w.shape)), atol=1e-5)
    assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    plain = tg.GPT(small_hp()).blocks[0].attn.c_q.weight
    assert torch.linalg.svdvals(plain).std() > 0.05  # the default init is not already orthogonal


@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_scalar_weight_decay_shrinks_control_parameters_by_lr_times_wd(wd):
    model = tg.GPT(small_hp(scalar_wd=wd, skip_gates=True))
    _, adam = tg.build_optimizers(model, small_hp(scalar_wd=wd), 0, 1, fused=False)
    with torch.no_grad():
        model.skip_gates.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()  # no gradient: only the decoupled decay moves a parameter
    lr = small_hp().scalar_lr
    assert torch.allclose(model.skip_gates, torch.full_like(model.skip_gates, 1 - lr * wd))
