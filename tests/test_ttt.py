"""Score-first test-time training: the model may only learn from validation tokens it has already scored."""
import math

import pytest
import torch

import train_gpt as tg
from conftest import byte_tables

SEQ_LEN, STRIDE, CHUNK, N_TOKENS = 32, 8, 64, 321


def hp(**overrides):
    values = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                  eval_seq_len=SEQ_LEN, eval_stride=STRIDE, ttt=True, ttt_chunk_tokens=CHUNK, ttt_epochs=2,
                  ttt_lr=0.05, val_batch_size=3 * SEQ_LEN)
    values.update(overrides)
    return tg.Hyperparameters(**values)


def fresh_model():
    torch.manual_seed(0)
    model = tg.GPT(hp())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def ttt_losses(tokens, keep_adapting=lambda: True, **overrides):
    """Per-target losses of one TTT pass, plus its (loss, bpb, chunks adapted)."""
    model = fresh_model()
    per_target = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    result = tg.evaluate_ttt(model, model, tokens, byte_tables(64), hp(**overrides), 0, 1, keep_adapting,
                             per_target)
    return per_target, result


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 64, (N_TOKENS,))


def test_every_target_is_scored_and_the_total_is_their_mean(tokens):
    per_target, (loss, _, adapted) = ttt_losses(tokens)
    assert not per_target.isnan().any()
    assert loss == pytest.approx(per_target.mean().item(), rel=1e-9)
    assert adapted == math.ceil((N_TOKENS - 1) / CHUNK) - 1  # every chunk but the last one teaches


def test_without_learning_rate_ttt_equals_the_plain_sliding_eval(tokens):
    _, (loss, bpb, _) = ttt_losses(tokens, ttt_lr=0.0)
    plain = tg.evaluate(fresh_model().eval(), tokens, byte_tables(64), SEQ_LEN, STRIDE, 3, 0, 1)
    assert (loss, bpb) == pytest.approx(plain, rel=1e-12)


def test_adaptation_changes_later_chunks_but_not_the_first(tokens):
    adapted, _ = ttt_losses(tokens)
    frozen, _ = ttt_losses(tokens, ttt_lr=0.0)
    assert torch.equal(adapted[:CHUNK], frozen[:CHUNK])
    assert (adapted[2 * CHUNK:] - frozen[2 * CHUNK:]).abs().max() > 1e-3  # the test below has teeth


@pytest.mark.parametrize("position", [CHUNK + 5, 2 * CHUNK + 40, 4 * CHUNK - 1])
def test_a_token_influences_no_score_made_before_it_was_seen(tokens, position):
    """Token `position` is the label of target position-1 and context of later targets. Scores of earlier
    targets must be bit-identical whatever its value: score-before-update. Training on a chunk before scoring
    it would let the token leak into the scores of the targets before it in the same chunk."""
    base, _ = ttt_losses(tokens)
    changed = tokens.clone()
    changed[position] = (changed[position] + 17) % 64
    perturbed, _ = ttt_losses(changed)
    assert torch.equal(base[:position - 1], perturbed[:position - 1])
    assert not torch.equal(base[position - 1:], perturbed[position - 1:])


def test_training_before_scoring_would_be_caught(tokens, monkeypatch):
    """Sanity check of the test above: swap the order (adapt on a chunk, then score it) and the leak shows."""
    position = 2 * CHUNK + 40

    def leaky_score(model, val_tokens, tables, starts, first_scored, length, batch, sums, per_target=None):
        if starts.size:
            chunk = (starts[0] + first_scored[0]) // CHUNK
            tg.ttt_adapt(model, torch.optim.SGD(model.parameters(), lr=0.05), val_tokens[chunk * CHUNK:(chunk + 1) * CHUNK + 1],
                         SEQ_LEN, 1, 0, 1)
        real_score(model, val_tokens, tables, starts, first_scored, length, batch, sums, per_target)

    real_score = tg.score_windows
    monkeypatch.setattr(tg, "score_windows", leaky_score)
    base, _ = ttt_losses(tokens)
    changed = tokens.clone()
    changed[position] = (changed[position] + 17) % 64
    perturbed, _ = ttt_losses(changed)
    assert not torch.equal(base[:position - 1], perturbed[:position - 1])


def test_adaptation_stops_when_the_eval_clock_says_so(tokens):
    _, (loss, _, adapted) = ttt_losses(tokens, keep_adapting=lambda: False)
    _, (frozen_loss, _, _) = ttt_losses(tokens, ttt_lr=0.0)
    assert adapted == 0 and loss == pytest.approx(frozen_loss, rel=1e-12)
