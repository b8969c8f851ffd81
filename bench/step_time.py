#!/usr/bin/env python3
"""Step time of the compiled training step (forward, backward, clip, optimizers) under two settings at the mini-golf
shape of `ours`, interleaved in one process: whatever else loads the machine slows both sides alike, so their ratio
holds where the absolute times do not.

    python3 bench/step_time.py DOC_ATTENTION=0 DOC_ATTENTION=1 --steps 20

Batches are consecutive rows of a training shard (real document boundaries: BOS = 1), never validation tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import train_gpt as tg  # noqa: E402
from minigolf import OURS_BASE, OURS_NO_TTT, SHAPE, SP8192  # noqa: E402

TRAIN_SHARD = ROOT.parent / "shared" / "data" / "proxy" / "sp1024" / "fineweb_train_000000.bin"


def side(setting: str, base: dict) -> tuple:
    name, _, value = setting.partition("=")
    os.environ.update(base, **{name: value})
    hp = tg.Hyperparameters.from_env()
    model = tg.GPT(hp)
    model.recur_on = bool(model.recur)  # the state of most mini-golf steps (RECUR_START_FRAC 0.35)
    return (hp, model, torch.compile(model, dynamic=False, fullgraph=True),
            tg.build_optimizers(model, hp, 0, 1, False, True))


def step(hp, model, compiled, optimizers, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    compiled(x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="NAME=VALUE of the first side, e.g. DOC_ATTENTION=0")
    parser.add_argument("b", help="NAME=VALUE of the second side")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side, after two compiling ones")
    parser.add_argument("--shard", type=Path, default=TRAIN_SHARD, help="a training shard (uint16 tokens)")
    args = parser.parse_args()
    if not args.shard.is_file():
        sys.exit(f"error: no training shard at {args.shard}: pass --shard")
    base = {k: str(v) for k, v in {**SHAPE, **OURS_BASE, **OURS_NO_TTT, **SP8192}.items() if k != "data"}
    sides = [side(s, base) for s in (args.a, args.b)]
    rows, seq = sides[0][0].train_batch_tokens // sides[0][0].train_seq_len, sides[0][0].train_seq_len
    tokens = np.fromfile(args.shard, dtype="<u2", offset=tg.HEADER_INTS * 4)
    times = [[], []]
    for i in range(args.steps + 2):
        chunk = torch.from_numpy(tokens[i * rows * seq:(i + 1) * rows * seq + 1].astype(np.int64))
        x, y = chunk[:-1].view(rows, seq), chunk[1:].view(rows, seq)
        for s in (0, 1) if i % 2 == 0 else (1, 0):  # alternate who goes first
            spent = step(*sides[s], x, y)
            if i >= 2:
                times[s].append(spent)
    a, b = (1000 * statistics.median(t) for t in times)
    print(f"step_time a:{args.a} b:{args.b} steps:{args.steps} median_ms_a:{a:.1f} median_ms_b:{b:.1f} "
          f"ratio:{b / a:.3f} threads:{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
