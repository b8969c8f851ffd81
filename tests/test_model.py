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


def document_stream() -> torch.Tensor:
    """Two rows of 33 tokens (inputs and targets of 32): row 0 opens inside a document begun in an earlier row, then
    a document of 8 tokens, one of a lone BOS, and one to the end; row 1 is a single document. Ids 2..96 are no BOS."""
    stream = torch.randint(2, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    stream[0, [7, 15, 16]] = stream[1, 0] = tg.BOS_ID
    return stream


def losses_after_each_edit(model: tg.GPT, stream: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Per-token losses of the stream and of every variant with one non-BOS token changed (all in one batch), with
    (row, changed position) of each variant."""
    edits = [(r, p) for r in range(stream.size(0)) for p in range(1, stream.size(1)) if stream[r, p] != tg.BOS_ID]
    variants = stream[[r for r, _ in edits]].clone()
    for v, (r, p) in enumerate(edits):
        variants[v, p] = 2 + (variants[v, p] - 1) % 95  # another non-BOS id
    with torch.no_grad():
        base = model(stream[:, :-1], stream[:, 1:], per_token=True)
        edited = model(variants[:, :-1], variants[:, 1:], per_token=True)
    return edited - base[[r for r, _ in edits]], edits


def every_option(**overrides) -> tg.GPT:
    """Every path a token could leak through: smear, bigram, XSA, attention gate, skips, parallel lanes, recurrence."""
    hp = small_hp(smear=True, bigram_buckets=64, xsa_last_n=5, attn_gate=True, skip_gates=True, parallel_start=3,
                  recur_layers="1,2", **overrides)
    model = randomised(tg.GPT(hp))
    model.recur_on = True
    return model


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["sdpa_mask", "flex"])
def test_with_doc_attention_editing_one_document_leaves_every_other_documents_losses_unchanged(kernel, monkeypatch):
    monkeypatch.setattr(tg, "attention_kernel", lambda device, documents=False: kernel)
    stream = document_stream()
    changes, edits = losses_after_each_edit(every_option(doc_attention=True), stream)
    docs = (stream[:, :-1] == tg.BOS_ID).cumsum(1)
    for change, (r, p) in zip(changes, edits):
        # The edited token is the target at p - 1 and the input at p: both positions are in its document.
        other = docs[r] != docs[r, p - 1]
        assert (change[other].abs() <= 1e-6).all(), (kernel, r, p)
        assert change[~other].abs().max() > 1e-4  # the edit did reach its own document


def test_without_doc_attention_later_documents_see_earlier_ones():
    stream = document_stream()
    changes, edits = losses_after_each_edit(every_option(doc_attention=False), stream)
    (v,) = [v for v, e in enumerate(edits) if e == (0, 10)]  # inside the document at 7..14
    assert changes[v, 16:].abs().max() > 1e-4  # the document from 16 on reads it
