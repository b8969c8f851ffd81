"""Stand-in for FlashAttention-3's `flash_attn_interface` (Hopper only), with its call signature and layout:
q (batch, time, heads, head_dim), k and v (batch, time, kv_heads, head_dim), GQA by head groups. It returns
(out, softmax_lse) like the FA3 releases that return both. Every call is counted, so tests can see it was used."""
import math

import torch

calls = 0


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **_):
    global calls
    calls += 1
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (softmax_scale or 1 / math.sqrt(q.size(-1)))
    if causal:
        t = q.size(1)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)
    return out, lse
