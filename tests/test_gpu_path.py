"""What the GPU run relies on, checked on a CPU: the attention kernel choice (FlashAttention-3 through a stand-in
with its signature), the bf16 residual stream, calibration under autocast, Muon's flat-buffer update (same numbers as
the plain per-matrix update, same result on two ranks as on one), DDP without buffer broadcasts, and the shard
prefetch."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import byte_tables, plain_hp, parse_line, randomised, run_train, small_hp, tiny_env, write_shard

STANDIN = Path(__file__).parent / "fa3_standin"




@pytest.fixture()
def fa3(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    sys.modules.pop("flash_attn_interface", None)
    import flash_attn_interface
    yield flash_attn_interface
    sys.modules.pop("flash_attn_interface", None)


def test_without_flash_attention_3_the_cpu_uses_sdpa():
    assert tg.flash_attention_3() is None and tg.attention_kernel(torch.device("cpu")) == "sdpa"


def test_flash_attention_3_is_used_when_it_imports_and_matches_sdpa(fa3):
    assert tg.attention_kernel(torch.device("cpu")) == "fa3"
    hp = small_hp(xsa_last_n=2)  # GQA and XSA both see FA3's (batch, time, heads, head_dim) layout
    x = torch.randint(0, 97, (2, 16))
    with_fa3 = randomised(tg.GPT(hp))
    calls = fa3.calls
    with torch.no_grad():
        got = with_fa3.logits(x)
    assert fa3.calls - calls == hp.num_layers
    for block in with_fa3.blocks:
        block.attn.fa3 = None
    with torch.no_grad():
        assert torch.allclose(got, with_fa3.logits(x), atol=1e-5)


def attention_inputs(rows: int, time: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v in FA3's layout with GQA (4 query heads, 2 kv heads), head size 16."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, time, heads, 16, generator=g) for heads in (4, 2, 2))


def test_document_kernels_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tg.attention_kernel(cpu, True) == "sdpa_mask" and tg.attention_kernel(cuda, True) == "flex"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["flex", "sdpa_mask"])
def test_document_attention_on_rows_of_one_document_is_plain_causal_attention(kernel):
    # 200 tokens: flex attention works in blocks of 128, so the second block is partial.
    q, k, v = attention_inputs(2, 200)
    ids = torch.randint(2, 97, (2, 200))
    ids[0, 0] = tg.BOS_ID  # row 0 is a whole document, row 1 the middle of one
    with torch.no_grad():
        got = tg.causal_attention(q, k, v, None, tg.document_mask(ids, kernel))
    assert torch.allclose(got, tg.causal_attention(q, k, v, None), atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_and_dense_document_masks_attend_alike():
    q, k, v = attention_inputs(2, 200)
    ids = torch.randint(2, 97, (2, 200))
    ids[0, [0, 5, 6, 130]] = ids[1, [127, 128]] = tg.BOS_ID  # one-token documents, a document across blocks
    with torch.no_grad():
        flex = tg.causal_attention(q, k, v, None, tg.document_mask(ids, "flex"))
        dense = tg.causal_attention(q, k, v, None, tg.document_mask(ids, "sdpa_mask"))
    assert torch.allclose(flex, dense, atol=1e-5)
    assert not torch.allclose(flex, tg.causal_attention(q, k, v, None), atol=1e-3)  # the documents did matter


@pytest.mark.slow  # dynamo traces flex attention: ~40 s each on 2 cores
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_masks_trace_into_two_dynamic_shape_graphs(monkeypatch):
    """Evaluation on CUDA compiles the scorer with dynamic shapes and fullgraph (duck sizing off), and the block mask
    is built inside the graph from each window's length: windows of one 128-token block and longer ones get a graph
    each (a count of 1 is specialised), both of which the evaluation's warm-up builds (windows of 2 and of more than
    EVAL_SEQ_LEN tokens). Traced on the cheap aot_eager backend, forward only (flex attention has no CPU backward)."""
    monkeypatch.setattr(tg, "attention_kernel", lambda device, documents=False: "flex")
    monkeypatch.setattr(torch.fx.experimental._config, "use_duck_shape", False)
    torch._dynamo.reset()
    model = randomised(tg.GPT(small_hp(doc_attention=True)))
    windows = []
    for time in (40, 100, 150, 300):
        x = torch.randint(2, 97, (3, time + 1))
        x[:, 0] = x[0, 17] = x[2, time // 2] = tg.BOS_ID
        with torch.no_grad():  # eager flex attention compiles graphs of its own: counted before the scorer's
            windows.append((x[:, :-1], x[:, 1:], model(x[:, :-1], x[:, 1:], per_token=True)))
    scorer = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    graphs = tg.compiled_graphs()
    for x, y, eager in windows:
        with torch.no_grad():
            assert torch.allclose(scorer(x, y, per_token=True), eager, atol=1e-5)
    assert tg.compiled_graphs() - graphs == 2


@pytest.mark.slow  # dynamo traces flex attention: ~40 s each on 2 cores
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_evaluation_warm_up_builds_the_flex_graph_of_short_windows_too(monkeypatch):
    """Document windows of at most 128 tokens (one flex block) need a graph of their own: the warm-up must build it,
    or the evaluation compiles it on its clock. Scoring only (flex attention has no CPU backward), on aot_eager."""
    monkeypatch.setattr(tg, "attention_kernel", lambda device, documents=False: "flex")
    monkeypatch.setattr(torch.fx.experimental._config, "use_duck_shape", False)
    torch._dynamo.reset()
    hp = small_hp(doc_attention=True, compile=True, eval_seq_len=200, eval_stride=100, val_batch_size=4000)
    model = randomised(tg.GPT(hp)).requires_grad_(False)
    scorer = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    tables, cpu = byte_tables(97), torch.device("cpu")
    tg.warm_up_evaluation(model, scorer, hp, tables, 0, 1, cpu)
    graphs = tg.compiled_graphs()
    # 40 documents of 60 tokens, then one of 720: more windows than a batch holds, so the short ones that are left
    # make a batch (and a width) of their own
    stream = torch.randint(2, 97, (3120,))
    stream[:2400:60] = tg.BOS_ID
    tg.evaluate(scorer, stream, tables, 200, 100, 4000, 0, 1, documents=True)
    assert tg.compiled_graphs() == graphs


@pytest.mark.slow
def test_a_run_with_flash_attention_3_logs_it_and_scores(tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, "fa3", ITERATIONS=4, EVAL_STRIDE=0,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(STANDIN), os.environ.get("PYTHONPATH")])))
    result = run_train(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert parse_line(result.stdout, "runtime")["attention"] == "fa3"
    assert float(parse_line(result.stdout, "final_submission")["val_bpb"]) > 0


def test_bf16_model_keeps_its_residual_stream_in_bf16_and_its_parameters_in_fp32():
    model = randomised(tg.GPT(small_hp(), bf16=True))
    stream = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, out: stream.append(out.dtype))
    with torch.no_grad():
        logits = model.logits(torch.randint(0, 97, (2, 16)))
    assert stream == [torch.bfloat16] * 5 and logits.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_model_scores_like_the_fp32_model_with_the_same_weights():
    fp32 = randomised(tg.GPT(small_hp()))
    bf16 = tg.GPT(small_hp(), bf16=True).eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        assert bf16(x, x).item() == pytest.approx(fp32(x, x).item(), abs=0.02)


def test_calibration_runs_the_linear_layers_in_bf16_like_training():
    model = randomised(tg.GPT(small_hp(), bf16=True))
    dtypes = set()
    for m in model.modules():
        if isinstance(m, tg.CastedLinear):
            m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    hessians = tg.collect_hessians(model, [torch.randint(0, 97, (2, 16))])
    assert dtypes == {torch.bfloat16}
    assert all(h.dtype == torch.float32 and torch.isfinite(h).all() for h in hessians.values())


def test_reloaded_model_does_not_fake_quantise():
    trained, reloaded = tg.GPT(small_hp()), tg.GPT(small_hp(), qat=False)
    assert {m.qat_bits for m in trained.modules() if isinstance(m, tg.CastedLinear)} == {5, 6}
    assert {m.qat_bits for m in reloaded.modules() if isinstance(m, tg.CastedLinear)} == {0}


# ----------------------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------------------


def reference_muon_step(params, states, lr, momentum, wd, steps=5):
    """The per-matrix Muon update as it was before the flat buffer, kept here as the specification."""
    by_shape = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    updates = {}
    for ps in by_shape.values():
        grads = []
        for p in ps:
            buf = states.setdefault(p, torch.zeros_like(p))
            buf.mul_(momentum).add_(p.grad)
            grads.append(p.grad.add(buf, alpha=momentum))
        ortho = tg.newton_schulz(torch.stack(grads), steps)
        ortho *= max(1.0, ps[0].size(0) / ps[0].size(1)) ** 0.5
        updates.update(zip(ps, ortho))
    with torch.no_grad():
        for p in params:
            p.mul_(1 - lr * wd)
            p.add_(updates[p], alpha=-lr)


def muon_problem(seed=0):
    torch.manual_seed(seed)
    shapes = [(64, 32), (32, 64), (64, 32), (48, 48), (32, 64), (16, 8)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    return params, grads


def test_flat_buffer_update_equals_the_per_matrix_update_bit_for_bit():
    params, grads = muon_problem()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, states = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1), {}
    for step_grads in grads:
        for p, r, g in zip(params, reference, step_grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        reference_muon_step(reference, states, lr=0.05, momentum=0.9, wd=0.1)
    assert all(torch.equal(p, r) for p, r in zip(params, reference))


def test_owners_balance_the_default_models_matrices_over_eight_ranks():
    model = tg.GPT(tg.Hyperparameters())
    sizes = [p.numel() for p in tg.build_optimizers(model, tg.Hyperparameters(), 0, 1, fused=False)[0]
             .param_groups[0]["params"]]
    owners = tg.balanced_owners(sizes, 8)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(8)]
    assert max(load) <= 1.1 * sum(sizes) / 8


def _two_rank_muon(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    params, grads = muon_problem()
    opt = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1, rank=rank, world_size=2)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    torch.save([p.detach() for p in params], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_work_and_reach_the_one_rank_result_exactly(tmp_path):
    mp.spawn(_two_rank_muon, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    params, grads = muon_problem()
    opt = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for rank in (0, 1):
        # Each rank owned a part; the all-reduce adds the other part to zeros, which is exact.
        assert all(torch.equal(p, q) for p, q in zip(params, torch.load(tmp_path / f"rank{rank}.pt")))


def _ddp_trainer(rank, init_file, dataset_path, tokenizer, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    hp = plain_hp(data_path=dataset_path, tokenizer_path=tokenizer, vocab_size=512, num_layers=2,
                            model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=16, train_batch_tokens=256,
                            compile=False)
    trainer = tg.Trainer(hp, rank, 2, torch.device("cpu"), tg.Logger("unused", False))
    Path(out_dir, f"rank{rank}").write_text(str(trainer.step_model.broadcast_buffers))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_does_not_broadcast_buffers_every_forward(tiny_dataset, tmp_path):
    mp.spawn(_ddp_trainer, args=(str(tmp_path / "init"), str(tiny_dataset.path), str(tiny_dataset.tokenizer),
                                 str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["False", "False"]


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def test_prefetching_stream_reads_shards_in_order_and_wraps_around(tmp_path):
    shards = [np.arange(start, start + n, dtype=np.uint16) for start, n in ((0, 7), (100, 3), (200, 11))]
    files = []
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens)
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
    stream = tg.TokenStream(files, 1024)
    got = np.concatenate([stream.take(n) for n in (5, 9, 4, 8, 6)])
    expected = np.concatenate(shards * 2)[:32]
    assert np.array_equal(got, expected)
