"""Train the default architecture on a proxy corpus (CPU-sized batches), then export it exactly as a real run does.

Used to measure the artifact size of *trained* default weights when no GPU is available. It runs
train_gpt.run() unchanged and only adds one thing: the raw (pre-quantisation, post-EMA) weights are saved to
RAW_STATE_PATH, so later export variants can be re-measured on the same weights without retraining
(`bench/export_sizes.py`).

    RAW_STATE_PATH=/tmp/raw.pt DATA_PATH=... python bench/proxy_trained_size.py

The CPU run behind NOTES.md (default architecture; proxy sp1024 train shard; the first 65,536 val tokens
only, because a CPU cannot score the full split with this model in reasonable time; so its val_bpb is not a
proxy score, only its bytes matter):

    DATA_PATH=<dir with the proxy train shard and a 65,536-token val shard> \
    TOKENIZER_PATH=../shared/tokenizers/fineweb_1024_bpe.model RUN_ID=proxy_default_cpu \
    TRAIN_SEQ_LEN=512 TRAIN_BATCH_TOKENS=2048 GRAD_ACCUM_STEPS=1 WARMUP_STEPS=0 MAX_WALLCLOCK_SECONDS=5100 \
    WARMDOWN_ITERS=300 MUON_MOMENTUM_WARMUP_STEPS=150 TRAIN_LOG_EVERY=10 EVAL_STRIDE=0 VAL_BATCH_SIZE=16384 \
    ALLOW_OVERSIZE=1 RAW_STATE_PATH=raw_state.pt OMP_NUM_THREADS=1 python bench/proxy_trained_size.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt  # noqa: E402

_export_and_score = train_gpt.export_and_score


def export_and_score_saving_raw(hp, trainer, *args, **kwargs):
    if trainer.rank == 0:
        path = os.environ["RAW_STATE_PATH"]
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"raw_state path:{path}", flush=True)
    return _export_and_score(hp, trainer, *args, **kwargs)


train_gpt.export_and_score = export_and_score_saving_raw
train_gpt.__file__ = os.path.abspath(train_gpt.__file__)  # bytes_code stays the size of train_gpt.py

if __name__ == "__main__":
    train_gpt.main()
