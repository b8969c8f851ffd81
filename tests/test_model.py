"""The U-Net GPT: causality, skip wiring, GQA shapes, and a QAT switch that compiled graphs cannot freeze."""
import pytest
import torch

import train_gpt as tg
from conftest import small_hp


def randomised(model):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = randomised(tg.GPT(small_hp()))
    x = torch.randint(0, 97, (2, 24))
    x2 = x.clone()
    x2[:, 15] = (x2[:, 15] + 1) % 97
    with torch.no_grad():
        a, b = model.logits(x), model.logits(x2)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("layers,recur,skips", [(11, "", 5), (10, "", 5), (9, "", 4), (2, "", 1), (1, "", 0),
                                                 (11, "3,4,5", 8), (1, "0", 1)])
def test_skip_rows_are_the_encoder_half_of_the_unrolled_block_order(layers, recur, skips):
    # 11 blocks, 3,4,5 three times: 0,1,2,3,4,5,3,4 | 5,3,4,5,6,7,8,9,10 (17 entries); 1 block, 0 thrice: 0 | 0,0.
    model = tg.GPT(small_hp(num_layers=layers, recur_layers=recur))
    assert model.skip_weights.shape == (skips, 32)


@pytest.mark.parametrize("layers,recur,recur_on,order", [
    (6, "", False, [0, 1, 2, 3, 4, 5]), (5, "1,2,3", False, [0, 1, 2, 3, 4]),
    (5, "1,2,3", True, [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4])])
def test_each_decoder_entry_of_the_block_order_receives_its_mirrored_encoder_output(layers, recur, recur_on, order):
    model = randomised(tg.GPT(small_hp(num_layers=layers, recur_layers=recur)))
    model.recur_on = recur_on
    ran, inputs, outputs = [], [], []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: ran.append(i) or inputs.append(args[0].clone()))
        block.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    with torch.no_grad():
        model.logits(torch.randint(0, 97, (1, 16)))
    half = len(order) // 2
    assert ran == order
    for k in range(half, len(order)):  # entry half + j takes entry half - 1 - j's output; an odd order's last, none
        skip = model.skip_weights[k - half] * outputs[2 * half - 1 - k] if k - half < half else 0
        assert torch.allclose(inputs[k], outputs[k - 1] + skip, atol=1e-6)


def test_gqa_projects_keys_and_values_to_fewer_heads():
    model = tg.GPT(small_hp(num_heads=4, num_kv_heads=2))
    attn = model.blocks[0].attn
    assert attn.c_q.weight.shape == (32, 32) and attn.c_k.weight.shape == (16, 32)
    assert attn.c_v.weight.shape == (16, 32)
    assert model.logits(torch.randint(0, 97, (3, 8))).shape == (3, 8, 97)


def test_output_projections_start_at_zero():
    model = tg.GPT(small_hp())
    assert all(b.attn.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0 for b in model.blocks)


def test_logits_are_soft_capped():
    model = randomised(tg.GPT(small_hp(logit_softcap=5.0)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
        assert model.logits(torch.randint(0, 97, (1, 8))).abs().max() <= 5.0


@pytest.mark.slow
def test_qat_switch_flips_a_compiled_model_without_recompiling_stale_values():
    """A published record's late QAT never ran: compile froze a Python flag. Ours is a buffer read at run time."""
    torch._dynamo.reset()
    model = randomised(tg.GPT(small_hp()))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        off = compiled(x, x)
        model.set_qat(True)
        on = compiled(x, x)
        eager_on = model(x, x)
        model.set_qat(False)
        off_again = compiled(x, x)
    assert not torch.allclose(off, on)
    assert torch.allclose(on, eager_on, atol=1e-6)
    assert torch.allclose(off, off_again, atol=1e-6)
