"""Artifact size (and roundtrip val_bpb) of one set of trained weights under several export settings.

Takes the raw weights saved by bench/proxy_trained_size.py (RAW_STATE_PATH) and re-exports them without
retraining, so export options are compared on identical weights. The model shape and data come from the
usual environment variables (DATA_PATH, TOKENIZER_PATH, VOCAB_SIZE, ...); GPTQ Hessians are collected from
GPTQ_CALIB_BATCHES training batches of TRAIN_BATCH_TOKENS x TRAIN_SEQ_LEN, never from validation tokens.

    RAW_STATE_PATH=raw.pt DATA_PATH=... python bench/export_sizes.py max std std+shuffle gptq+std+shuffle
"""
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def variant(hp: tg.Hyperparameters, spec: str) -> tuple[tg.Hyperparameters, bool]:
    """`max` or `std`, plus any of `shuffle`, `best`, `lzma`, `gptq`, `k<K>` (std mode without the clip search:
    every block row at K standard deviations), `mlp<B>` (MLP matrices at B bits) and `fit` (prune to the 16,000,000-byte limit as FIT_TO_LIMIT=1
    does), joined by `+`, e.g. `gptq+std+shuffle+k12+fit`."""
    parts = spec.split("+")
    fixed_k = [float(p[1:]) for p in parts if p.startswith("k")]
    mlp_bits = [int(p[3:]) for p in parts if p.startswith("mlp")]
    hp = dataclasses.replace(hp, clip_mode="std" if "std" in parts else "max", byte_shuffle="shuffle" in parts,
                             compressor=next((c for c in ("best", "lzma") if c in parts), "zstd"),
                             clip_search=not fixed_k, qat_clip_k=fixed_k[0] if fixed_k else hp.qat_clip_k,
                             qat_bits_mlp=mlp_bits[0] if mlp_bits else hp.qat_bits_mlp)
    return hp, "gptq" in parts


def main(specs: list[str]) -> None:
    hp = tg.Hyperparameters.from_env()
    state = torch.load(os.environ["RAW_STATE_PATH"], weights_only=True)
    model = tg.GPT(hp)
    model.load_state_dict(state)
    model.eval()
    sp = tg.load_tokenizer(hp)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, hp.vocab_size))
    val = tg.load_validation(hp, torch.device("cpu"))
    code_bytes = os.path.getsize(tg.__file__)
    hessians = None
    batch = tg.eval_batch_seqs(hp, hp.eval_seq_len, 1)
    loss, bpb = tg.evaluate(model, val, tables, hp.eval_seq_len, hp.eval_seq_len, batch, 0, 1)
    print(f"raw val_tokens:{val.numel()} val_loss:{loss:.6f} val_bpb:{bpb:.6f} code_bytes:{code_bytes}", flush=True)
    for spec in specs:
        hp_v, use_gptq = variant(hp, spec)
        if use_gptq and hessians is None:
            t = time.perf_counter()
            loader = tg.TrainLoader(tg.shard_files(hp.data_path, "train"), hp.vocab_size, 0, 1, torch.device("cpu"))
            with torch.no_grad():
                hessians = tg.collect_hessians(model, (loader.next_batch(hp.train_batch_tokens, hp.train_seq_len)[0]
                                                       for _ in range(hp.gptq_calib_batches)))
            print(f"hessians batches:{hp.gptq_calib_batches} ms:{1000 * (time.perf_counter() - t):.0f}", flush=True)
        t = time.perf_counter()
        packed = tg.pack(tg.quantize_state(state, hp_v, hessians if use_gptq else None))
        budget = tg.SIZE_LIMIT - code_bytes if "fit" in spec.split("+") else float("inf")
        blob, zeroed, _ = tg.prune_to_fit(packed, budget, hp_v.compressor, hp_v.byte_shuffle)
        export_ms = 1000 * (time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:  # score what a run would reload: the file, via read_artifact
            path = os.path.join(tmp, "artifact.pgz")
            tg.write_artifact(path, blob)
            fresh = tg.GPT(hp)
            fresh.load_state_dict(tg.read_artifact(path))
        fresh.eval()
        loss, bpb = tg.evaluate(fresh, val, tables, hp.eval_seq_len, hp.eval_seq_len, batch, 0, 1)
        print(f"export variant:{spec} bytes_model:{len(blob)} bytes_total:{len(blob) + code_bytes} "
              f"fits:{int(len(blob) + code_bytes <= tg.SIZE_LIMIT)} pruned_codes:{zeroed} compressor:{tg.method_name(blob)} "
              f"export_ms:{export_ms:.0f} roundtrip_val_loss:{loss:.6f} roundtrip_val_bpb:{bpb:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["max"])
