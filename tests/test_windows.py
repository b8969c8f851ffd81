"""Evaluation windows: every validation target is scored exactly once, with the longest context available."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import plain_hp, byte_tables


@pytest.mark.parametrize("num_targets", [1, 5, 63, 64, 65, 127, 128, 129, 1000, 4097])
@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 1), (64, 7), (64, 32), (16, 3), (128, 64)])
def test_every_target_scored_exactly_once(num_targets, seq_len, stride):
    starts, first = tg.plan_windows(num_targets, seq_len, stride)
    length = min(seq_len, num_targets)
    counts = np.zeros(num_targets, np.int64)
    for s, f in zip(starts, first):
        assert 0 <= s and s + length <= num_targets and 0 <= f <= length
        counts[s + f:s + length] += 1
    assert counts.min() == 1 and counts.max() == 1


@pytest.mark.parametrize("num_targets,seq_len,stride", [(1000, 64, 16), (4097, 128, 64), (200, 64, 64)])
def test_scored_targets_get_at_least_seq_len_minus_stride_context(num_targets, seq_len, stride):
    starts, first = tg.plan_windows(num_targets, seq_len, stride)
    # Context of a target = how many inputs precede it inside its window (+1 for its own input token).
    min_context = min(int(f) for f in first[1:]) if len(first) > 1 else seq_len
    assert min_context >= seq_len - stride


def test_final_partial_window_is_right_aligned_and_scores_only_the_tail():
    starts, first = tg.plan_windows(100, 64, 64)
    assert list(starts) == [0, 36] and list(first) == [0, 28]


class CountingModel(torch.nn.Module):
    """Per-token 'loss' = the target id, so the eval's sum reveals exactly which targets were scored."""

    def forward(self, x, y, per_token=False):
        return y.double()


@pytest.mark.parametrize("n,seq_len,stride,batch", [(500, 64, 64, 3), (500, 64, 16, 5), (77, 32, 5, 4),
                                                    (40, 64, 64, 2)])
def test_evaluate_sums_every_target_once(n, seq_len, stride, batch):
    tokens = torch.randint(0, 50, (n,))
    loss, bpb = tg.evaluate(CountingModel(), tokens, byte_tables(50), seq_len, stride, batch, 0, 1)
    assert loss == pytest.approx(tokens[1:].double().mean().item(), rel=1e-12)
    assert bpb == pytest.approx(tokens[1:].double().sum().item() / math.log(2) / (n - 1), rel=1e-12)


def test_ranks_split_the_windows_without_overlap():
    starts, first = tg.plan_windows(1000, 64, 8)
    shares = [np.array_split(np.arange(starts.size), 3)[r] for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(starts.size))


def random_model(seed):
    torch.manual_seed(seed)
    hp = plain_hp(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2)
    model = tg.GPT(hp).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_stride_equal_to_seq_len_matches_plain_non_overlapping_eval():
    model = random_model(seed=0)
    seq_len, chunks = 32, 6
    tokens = torch.randint(0, 64, (seq_len * chunks + 1,))
    loss, _ = tg.evaluate(model, tokens, byte_tables(64), seq_len, seq_len, 4, 0, 1)
    x, y = tokens[:-1].view(chunks, seq_len), tokens[1:].view(chunks, seq_len)
    with torch.no_grad():
        plain = model(x, y).item()
    assert loss == pytest.approx(plain, rel=1e-5)


def test_sliding_eval_matches_scoring_each_target_with_its_planned_context():
    model = random_model(seed=1)
    tokens = torch.randint(0, 64, (150,))
    seq_len, stride = 32, 8
    loss, _ = tg.evaluate(model, tokens, byte_tables(64), seq_len, stride, 3, 0, 1)
    starts, first = tg.plan_windows(149, seq_len, stride)
    total = 0.0
    with torch.no_grad():
        for s, f in zip(starts, first):
            x, y = tokens[s:s + seq_len][None], tokens[s + 1:s + seq_len + 1][None]
            total += model(x, y, per_token=True)[0, f:].double().sum().item()
    assert loss == pytest.approx(total / 149, rel=1e-6)
