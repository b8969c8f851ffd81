"""Train the default architecture on a proxy corpus (CPU-sized batches), then export it exactly as a real run does.

Used to measure the artifact size of *trained* default weights when no GPU is available. It runs train_gpt.main()
unchanged and adds one thing: the raw (pre-quantisation, post-EMA) weights and the GPTQ Hessians are saved to
RAW_STATE_PATH just before the export, so export variants can be re-measured on the same weights without
retraining (`bench/export_sizes.py`). bytes_code stays the size of train_gpt.py.

    RAW_STATE_PATH=/tmp/raw.pt DATA_PATH=... python bench/proxy_trained_size.py

The command behind results/proxy_trained_size.md is in that file.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt  # noqa: E402

_export = train_gpt.export


def export_saving_raw(hp, trainer, log):
    if trainer.rank == 0:
        path = os.environ["RAW_STATE_PATH"]
        raw = dict(state={k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                   hessians={k: v.detach().cpu() for k, v in trainer.hessians.items()})
        torch.save(raw, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"raw_state path:{path}", flush=True)
    return _export(hp, trainer, log)


train_gpt.export = export_saving_raw
train_gpt.__file__ = os.path.abspath(train_gpt.__file__)

if __name__ == "__main__":
    train_gpt.main()
