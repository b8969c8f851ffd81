"""Document-aware scoring and score-first LoRA test-time training: every target scored exactly once, with context
from its own document only, and no score ever made by weights that have seen the token it is about."""
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import plain_hp, byte_tables

VOCAB, SEQ_LEN, STRIDE, CHUNK = 64, 32, 8, 8


def hp(**overrides):
    values = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                  eval_seq_len=SEQ_LEN, eval_stride=STRIDE, ttt=True, ttt_lora_rank=4, ttt_chunk_tokens=CHUNK,
                  ttt_batch_docs=3, ttt_prefix_docs=4, ttt_phases=2, ttt_lr=0.01, ttt_phase_lr=0.05,
                  val_batch_size=4 * SEQ_LEN, ttt_global_chunk_tokens=4 * SEQ_LEN)
    values.update(overrides)
    return plain_hp(**values)


def fresh_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = tg.GPT(hp(**overrides))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval().requires_grad_(False)


def stream(lengths, seed=1) -> torch.Tensor:
    """Documents of the given token counts, each [BOS] + tokens that are never BOS."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.cat((torch.tensor([tg.BOS_ID]), torch.randint(2, VOCAB, (n,), generator=generator)))
                      for n in lengths])


# TTT processes documents longest first, not in file order, and its phases train on what it has scored in that
# order. Listing the documents longest first makes the processing order the stream order, so "a score made before
# position p was seen" is simply "a target before p" and the perturbation checks below can compare by position.
# Lengths cross chunks (8), windows (32) and batches (3 documents), and the phases fall after documents 2 and 4.
LENGTHS = [70, 45, 33, 20, 17, 9, 8, 3, 1, 0]
# The budget never binds in these tests unless a test says so; evaluate_ttt updates the rates it is given, so
# each call gets a copy.
RATES = dict(adapt=1e9, score=1e9, train=1e9)


def ttt_scores(tokens, seconds=1e9, **overrides):
    """Per-target losses of one TTT pass (NaN where nothing was scored), plus its (loss, bpb, stats)."""
    model = fresh_model()
    per_target = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    clock = tg.EvalClock(seconds, lambda x: x)
    result = tg.evaluate_ttt(model, model, tokens, byte_tables(VOCAB), hp(**overrides), 0, 1, clock, dict(RATES),
                             lambda line: None, per_target)
    return per_target, result


@pytest.fixture(scope="module")
def tokens():
    return stream(LENGTHS)


def perturbed(tokens, position):
    changed = tokens.clone()
    changed[position] = 2 + (changed[position] - 2 + 17) % (VOCAB - 2)  # never a BOS: documents stay the same
    return changed


# ----------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------


def test_documents_own_every_target_once_and_end_on_the_next_bos(tokens):
    starts, counts = tg.document_spans(tokens.numpy())
    owned = np.concatenate([np.arange(b + 1, b + c + 1) for b, c in zip(starts, counts)])
    assert np.array_equal(owned, np.arange(1, tokens.numel()))
    assert all(tokens[b] == tg.BOS_ID for b in starts)


def test_a_stream_that_does_not_start_with_bos_still_has_its_first_document():
    starts, counts = tg.document_spans(np.array([5, 6, tg.BOS_ID, 7, 8]))
    assert starts.tolist() == [0, 2] and counts.tolist() == [2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_document_windows_score_each_target_once_inside_its_document(seed):
    rng = np.random.default_rng(seed)
    tokens = stream(rng.integers(0, 120, 30).tolist(), seed=seed).numpy()
    starts, counts = tg.document_spans(tokens)
    begins, lengths, first = tg.plan_document_windows(starts, counts, SEQ_LEN, STRIDE)
    scored = np.concatenate([np.arange(b + f, b + n) + 1 for b, n, f in zip(begins, lengths, first)])
    assert np.array_equal(np.sort(scored), np.arange(1, tokens.size))
    doc_of = np.searchsorted(starts, begins, side="right") - 1
    assert np.all(begins + lengths <= starts[doc_of] + counts[doc_of])  # no window reaches past its document
    assert np.all(lengths <= SEQ_LEN)


def test_document_scoring_sees_no_other_document(tokens):
    model = fresh_model()
    base = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    tg.evaluate(model, tokens, byte_tables(VOCAB), SEQ_LEN, STRIDE, 4 * SEQ_LEN, 0, 1, True, base)
    starts, counts = tg.document_spans(tokens.numpy())
    other = base.clone()
    tg.evaluate(model, perturbed(tokens, int(starts[1]) + 5), byte_tables(VOCAB), SEQ_LEN, STRIDE, 4 * SEQ_LEN, 0, 1,
                True, other)
    own = slice(starts[1], starts[1] + counts[1])  # targets (position - 1) of the second document
    changed = (base != other).nonzero().flatten()
    assert changed.numel() and changed.min() >= own.start + 4 and changed.max() < own.stop


# ----------------------------------------------------------------------------------------------------------
# TTT
# ----------------------------------------------------------------------------------------------------------


def test_every_target_is_scored_once_and_the_total_is_their_mean(tokens):
    per_target, (loss, _, stats) = ttt_scores(tokens)
    assert not per_target.isnan().any()
    assert loss == pytest.approx(per_target.mean().item(), rel=1e-9)
    assert stats == dict(docs=9, docs_adapted=9, phases=2)  # the empty last document owns no target


@pytest.mark.parametrize("seed", range(3))
def test_random_document_lengths_are_all_scored_exactly_once(seed):
    lengths = sorted(np.random.default_rng(seed).integers(0, 100, 12).tolist(), reverse=True)
    tokens = stream(lengths, seed)
    per_target, (loss, _, _) = ttt_scores(tokens)
    assert not per_target.isnan().any() and loss == pytest.approx(per_target.mean().item(), rel=1e-9)


def test_without_learning_ttt_scores_like_its_chunk_windows_and_learning_changes_later_chunks(tokens):
    adapted, _ = ttt_scores(tokens, ttt_phases=0)
    frozen, _ = ttt_scores(tokens, ttt_phases=0, ttt_lr=0.0)
    starts, _ = tg.document_spans(tokens.numpy())
    first_chunk = slice(int(starts[0]), int(starts[0]) + CHUNK)
    assert torch.equal(adapted[first_chunk], frozen[first_chunk])
    assert (adapted - frozen).abs().max() > 1e-3  # the tests below have teeth


# Positions: inside the first chunk's window, at a chunk boundary, in a later window of a long document, in the
# second document (a document boundary), and in documents scored after the first and the second phase.
POSITIONS = [5, 9, 17, 60, 71 + 20, 71 + 46 + 34 + 5, 71 + 46 + 34 + 21 + 10]


@pytest.mark.parametrize("position", POSITIONS)
def test_a_token_influences_no_score_made_before_it_was_seen(tokens, position):
    """Token p is the label of target p-1 and context of later targets. Scores of earlier targets must be
    bit-identical whatever its value: score before update, across chunks, documents and phases."""
    base, _ = ttt_scores(tokens)
    other, _ = ttt_scores(perturbed(tokens, position))
    assert torch.equal(base[:position - 1], other[:position - 1])
    assert not torch.equal(base[position - 1:], other[position - 1:])


def test_training_before_scoring_would_be_caught(tokens, monkeypatch):
    """The test above catches adapters that learn from a document before scoring it: here a first pass learns from
    every chunk, and a second pass, with the adapters as the first left them, is what gets scored."""
    real = tg.adapt_batch

    def learn_then_score(scorer, adapters, tokens_, tables, starts, counts, hp_, sums, per_target):
        real(scorer, adapters, tokens_, tables, starts, counts, hp_, torch.zeros_like(sums), None)
        real(scorer, adapters, tokens_, tables, starts, counts, hp_, sums, per_target)

    monkeypatch.setattr(tg, "adapt_batch", learn_then_score)
    position = 17
    base, _ = ttt_scores(tokens, ttt_phases=0)
    other, _ = ttt_scores(perturbed(tokens, position), ttt_phases=0)
    assert not torch.equal(base[:position - 1], other[:position - 1])


def test_a_phase_that_trains_on_unscored_documents_would_be_caught(tokens, monkeypatch):
    real = tg.train_on_scored

    def greedy(model, scorer, tokens_, starts, counts, hp_, rank, world_size):
        all_starts, all_counts = tg.document_spans(tokens_.numpy())
        return real(model, scorer, tokens_, all_starts, all_counts, hp_, rank, world_size)  # every document

    monkeypatch.setattr(tg, "train_on_scored", greedy)
    position = POSITIONS[-1]
    base, _ = ttt_scores(tokens)
    other, _ = ttt_scores(perturbed(tokens, position))
    assert not torch.equal(base[:position - 1], other[:position - 1])


def test_documents_adapt_in_isolation(tokens):
    """Without global phases, changing a token of one document changes no score of any other document."""
    starts, counts = tg.document_spans(tokens.numpy())
    base, _ = ttt_scores(tokens, ttt_phases=0)
    for doc in (0, 3):
        other, _ = ttt_scores(perturbed(tokens, int(starts[doc]) + 2), ttt_phases=0)
        changed = (base != other).nonzero().flatten()
        assert changed.numel() and changed.min() >= starts[doc] and changed.max() < starts[doc] + counts[doc]


@pytest.mark.parametrize("batch_docs", [1, 2])
def test_two_identical_documents_in_a_row_score_identically(batch_docs):
    """Adapters (and their optimizer state) start fresh for every document, in the same batch or the next."""
    twin = stream([40], seed=3)
    tokens = torch.cat((twin, twin, torch.tensor([tg.BOS_ID])))  # the last BOS is the second copy's last target
    per_target, _ = ttt_scores(tokens, ttt_batch_docs=batch_docs, ttt_phases=0)
    assert torch.equal(per_target[:41], per_target[41:82])


def test_with_no_time_left_ttt_stops_adapting_and_scores_every_document_window(tokens):
    lines = []
    model = fresh_model()
    per_target = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    clock = tg.EvalClock(1e-3, lambda x: x)
    time.sleep(0.002)
    loss, bpb, stats = tg.evaluate_ttt(model, model, tokens, byte_tables(VOCAB), hp(), 0, 1, clock, dict(RATES),
                                       lines.append, per_target)
    assert stats["docs_adapted"] == 0 and stats["phases"] == 0 and not per_target.isnan().any()
    assert lines and lines[0].startswith("ttt_stop reason:budget docs_adapted:0 ")
    plain = tg.evaluate(fresh_model(), tokens, byte_tables(VOCAB), SEQ_LEN, STRIDE, 4 * SEQ_LEN, 0, 1, True)
    assert (loss, bpb) == pytest.approx(plain, rel=1e-7)  # the same windows, batched differently


def simulated_ttt(tokens, monkeypatch, rates, **overrides):
    """TTT on a simulated clock with a 0.55 s budget where adapting a batch takes its token cost at 1,440 tokens/s
    (scoring and phases are free). Returns the clock, the stats and the log lines."""
    class SimulatedClock(tg.EvalClock):  # the real planning rule (fits) on simulated time
        def __init__(self):
            self.seconds, self.now = 0.55, 0.0

        def elapsed(self):
            return self.now

    clock, real = SimulatedClock(), tg.adapt_batch

    def timed_adapt(scorer, adapters, tokens_, tables, starts, counts, hp_, sums, per_target):
        clock.now += tg.adapt_cost(counts, hp_) / 1440
        real(scorer, adapters, tokens_, tables, starts, counts, hp_, sums, per_target)

    monkeypatch.setattr(tg, "adapt_batch", timed_adapt)
    lines, model = [], fresh_model()
    _, _, stats = tg.evaluate_ttt(model, model, tokens, byte_tables(VOCAB), hp(**{"ttt_phases": 0, **overrides}), 0,
                                  1, clock, rates, lines.append)
    return clock, stats, lines


def test_the_budget_check_stops_adapting_when_the_rest_would_not_fit(tokens, monkeypatch):
    """The first batch (720 tokens) is predicted at 0.4 s, 0.5 s with a quarter in hand, and fits the 0.55 s budget;
    it takes 0.5 s, and the second (135 tokens), predicted at that pace plus the quarter, would end past it: only
    the first batch adapts."""
    _, stats, lines = simulated_ttt(tokens, monkeypatch, dict(adapt=1800, score=1e9, train=1e9))
    assert stats["docs_adapted"] == 3 and lines[0].startswith("ttt_stop reason:budget docs_adapted:3 ")


def test_rates_that_flatter_the_machine_are_corrected_after_one_round(tokens, monkeypatch):
    """The same machine, but the warm-up claimed 1e9 tokens/s: the first round shows how far behind it ran, so the
    second is refused as above instead of adapting everything past the budget."""
    clock, stats, lines = simulated_ttt(tokens, monkeypatch, dict(RATES))
    assert stats["docs_adapted"] == 3 and lines[0].startswith("ttt_stop reason:budget docs_adapted:3 ")
    assert clock.now <= clock.seconds


def test_a_round_that_ends_a_phase_still_corrects_the_rates(tokens, monkeypatch):
    """The first round ends the only phase (after 3 documents): how far it ran behind the flattering rates must
    still stop the second round, as it does without phases."""
    clock, stats, lines = simulated_ttt(tokens, monkeypatch, dict(RATES), ttt_phases=1, ttt_prefix_docs=3)
    assert stats["docs_adapted"] == 3 and stats["phases"] == 1 and clock.now <= clock.seconds
    assert any(line.startswith("ttt_stop reason:budget docs_adapted:3 ") for line in lines)


def test_once_adapting_stops_the_rest_is_scored_in_full_size_batches(tokens, monkeypatch):
    """The rest is scored at the batch shape whose rate the budget was planned with (VAL_BATCH_SIZE tokens), in
    one pass over every remaining document, not a small TTT batch at a time."""
    calls, real = [], tg.score_windows

    def recorded(model, tokens_, tables, starts, lengths, first_scored, batch_tokens, *rest):
        calls.append((starts.size, batch_tokens))
        real(model, tokens_, tables, starts, lengths, first_scored, batch_tokens, *rest)

    monkeypatch.setattr(tg, "score_windows", recorded)
    per_target, (_, _, stats) = ttt_scores(tokens, seconds=0.0)
    assert stats["docs_adapted"] == 0 and not per_target.isnan().any()
    assert len(calls) == 1 and calls[0][1] == hp().val_batch_size


def test_a_chunk_longer_than_the_scoring_window_is_refused_at_start_up():
    with pytest.raises(tg.UserError, match="TTT_CHUNK_TOKENS=33 must be at most EVAL_SEQ_LEN=32"):
        hp(ttt_chunk_tokens=SEQ_LEN + 1).validate(world_size=1)


def test_short_chunks_pick_each_batchs_chunk_by_its_longest_document():
    h = hp(ttt_short_chunks="16:2,40:4")
    assert [h.ttt_chunk_for(n) for n in (1, 16, 17, 40, 41, 70)] == [2, 2, 4, 4, CHUNK, CHUNK]
    assert hp().ttt_chunk_for(5) == CHUNK  # empty: one chunk size for every batch


def test_a_short_documents_adapters_step_sooner_with_short_chunks_and_still_score_first(tokens):
    """With TTT_SHORT_CHUNKS the 9-token document (one chunk of 8 by default, so scored by unadapted weights) is cut
    into chunks of 2: later chunks are scored by adapters that learned from the earlier ones, and a token still
    moves no score made before it was seen."""
    starts, counts = tg.document_spans(tokens.numpy())
    doc = int(np.flatnonzero(counts == 9)[0])
    first, end = int(starts[doc]), int(starts[doc] + counts[doc])
    frozen, _ = ttt_scores(tokens, ttt_phases=0, ttt_lr=0.0)
    plain, _ = ttt_scores(tokens, ttt_phases=0)
    short, _ = ttt_scores(tokens, ttt_phases=0, ttt_short_chunks="9:2")
    assert torch.equal(plain[first:CHUNK + first], frozen[first:CHUNK + first])
    assert torch.equal(short[first:first + 2], frozen[first:first + 2])
    assert (short[first + 2:end] - frozen[first + 2:end]).abs().max() > 1e-3
    position = first + 5
    other, _ = ttt_scores(perturbed(tokens, position), ttt_phases=0, ttt_short_chunks="9:2")
    assert torch.equal(short[:position - 1], other[:position - 1])


@pytest.mark.parametrize("value", ["256", "256:0", "2000:24,256:8", "a:b", "256:33"])
def test_a_malformed_short_chunk_schedule_is_refused_at_start_up(value):
    with pytest.raises(tg.UserError, match="TTT_SHORT_CHUNKS"):
        hp(ttt_short_chunks=value).validate(world_size=1)


def _two_rank_ttt(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, tokens = fresh_model(), stream(LENGTHS)
    clock = tg.EvalClock(1e9, lambda x: x)
    loss, bpb, stats = tg.evaluate_ttt(model, model, tokens, byte_tables(VOCAB), hp(), rank, 2, clock, dict(RATES),
                                       lambda line: None)
    torch.save((loss, bpb, stats), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_like_one(tokens, tmp_path):
    mp.spawn(_two_rank_ttt, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    _, (loss, bpb, stats) = ttt_scores(tokens)
    for rank in (0, 1):
        loss2, bpb2, stats2 = torch.load(tmp_path / f"rank{rank}.pt")
        assert (loss2, bpb2) == pytest.approx((loss, bpb), rel=1e-5) and stats2 == stats


@pytest.mark.parametrize("rows_per_step", [1, 4, 10])
def test_a_global_phase_takes_one_sgd_step_per_chunk_of_scored_tokens(monkeypatch, rows_per_step):
    tokens = stream([40, 60, 60, 60])
    starts, counts = tg.document_spans(tokens.numpy())
    rows = (int((counts + 1).sum()) - 1) // SEQ_LEN  # each document with the BOS that ends it, cut into rows
    taken = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: taken.append(1) or real_step(self, *a, **k))
    model = fresh_model().requires_grad_(True)
    chunk = rows_per_step * SEQ_LEN
    trained = tg.train_on_scored(model, model, tokens, starts, counts, hp(ttt_global_chunk_tokens=chunk), 0, 1)
    assert rows == 7 and len(taken) == -(-rows // rows_per_step) and trained == len(taken) * chunk


@pytest.mark.parametrize("doc_attention", [True, False])
def test_a_global_phase_with_doc_attention_trains_each_document_on_its_own_context_only(doc_attention):
    """Its rows cut the scored stream at the row grid, so documents share rows; DOC_ATTENTION keeps them apart (the
    records' document-isolated global phase): editing one document moves only that document's training losses."""
    tokens = stream([40, 25, 50, 30])
    starts, counts = tg.document_spans(tokens.numpy())
    edited_doc, rows = 0, (tokens.numel() - 1) // SEQ_LEN
    position = SEQ_LEN + 3  # in the second row, whose rest is the next document
    def losses(tokens):
        model = fresh_model(doc_attention=doc_attention)
        seen = []

        def scorer(x, y, per_token):
            out = model(x, y, per_token=True)
            seen.append(out.detach().flatten())
            return out

        tg.train_on_scored(model.train(), scorer, tokens, starts, counts, hp(doc_attention=doc_attention,
                           ttt_global_chunk_tokens=rows * SEQ_LEN), 0, 1)
        return seen[0]  # one step over every row, before any weight moved: the stream's losses in order

    moved = torch.nonzero(losses(tokens) != losses(perturbed(tokens, position))).flatten()
    # Target t of the stream is predicted from position t; the edited document's own targets run from its edited
    # token's position up to its last token (which predicts the next document's BOS).
    own = (moved >= position - 1) & (moved < starts[edited_doc] + counts[edited_doc] + 1)
    assert moved.numel() > 0
    assert bool(own.all()) == doc_attention
