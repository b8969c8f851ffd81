"""Artifact size, its parts, and the roundtrip val_bpb of one set of trained weights under several export settings.

Takes the raw weights (and GPTQ Hessians) saved by bench/proxy_trained_size.py (RAW_STATE_PATH) and re-exports them
without retraining, so export options are compared on identical weights. The model and data come from the usual
environment variables (the same as the training run's); each variant is a set of overrides on top of them, and
`default` is none. The code counted is the packed copy of train_gpt.py (tools/pack_code.py), as submitted.

    RAW_STATE_PATH=raw.pt DATA_PATH=... python bench/export_sizes.py default "LQER_RANK=0" "QAT_BITS_MLP=6 EMBED_BITS=8"

Per variant: bytes of the artifact and in total, whether it fits, what FIT_TO_LIMIT's ladder did, the parts each
compressed on its own (block matrices, embeddings, LQER factors, fp16 tensors and scales), and the roundtrip score.
"""
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402


def packed_code_bytes() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "train_gpt.py")
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "pack_code.py"), tg.__file__, "-o", out],
                       check=True, capture_output=True)
        return os.path.getsize(out)


def override(hp: tg.Hyperparameters, spec: str) -> tg.Hyperparameters:
    fields = {f.name: type(f.default) for f in dataclasses.fields(hp)}
    changes = {}
    for item in spec.split():
        if item == "default":
            continue
        key, value = item.split("=", 1)
        kind = fields[key.lower()]
        changes[key.lower()] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return dataclasses.replace(hp, **changes)


def part_sizes(tensors: list, method: str) -> dict:
    """Each part of the artifact compressed on its own (the whole compresses a little better than the sum)."""
    parts = dict(matrices=[], embeddings=[], lqer=[], fp16=[])
    for t in tensors:
        if t.bits == 16:
            parts["fp16"].append(t.values.numpy().tobytes())
            continue
        kind = "matrices" if t.name.startswith(("blocks.", "bigram_proj.")) else "embeddings"
        parts[kind] += [t.codes.numpy().tobytes(), t.scale.numpy().tobytes()]
        if t.group >= 0:
            parts[kind].append(t.group_scale.numpy().tobytes())
        if t.lqer is not None:
            parts["lqer"] += [x.numpy().tobytes() for x in t.lqer]
    compress = tg.COMPRESSORS[method][1]
    return {k: len(compress(b"".join(v))) if v else 0 for k, v in parts.items()}


def main(specs: list[str]) -> None:
    hp = tg.Hyperparameters.from_env()
    raw = torch.load(os.environ["RAW_STATE_PATH"], weights_only=True)
    state, hessians = raw["state"], raw["hessians"]
    sp = tg.load_tokenizer(hp)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, hp.vocab_size))
    val = tg.load_validation(hp, torch.device("cpu"))
    code = packed_code_bytes()
    for spec in specs:
        hp_v = override(hp, spec)
        t = time.perf_counter()
        lines = []
        tensors = tg.quantize_state(state, hp_v, hessians if hp_v.gptq else None)
        budget = tg.SIZE_LIMIT - code if hp_v.fit_to_limit else float("inf")
        blob = tg.fit_artifact(tensors, state, hessians if hp_v.gptq else {}, hp_v, budget, lines.append)
        export_s = time.perf_counter() - t
        for line in lines:  # every ladder step, as the training script logs it
            print(line, flush=True)
        with tempfile.TemporaryDirectory() as tmp:  # score what a run would reload: the file, via read_artifact
            path = os.path.join(tmp, "artifact.pgz")
            tg.write_artifact(path, blob)
            model = tg.load_artifact_model(hp_v, path, torch.device("cpu"))
        loss, bpb = tg.evaluate(model, val, tables, hp.eval_seq_len, hp.eval_seq_len, hp.val_batch_size, 0, 1)
        lowered = [line.split()[1].split(":", 1)[1] + ":" + line.split()[2].split(":", 1)[1] for line in lines
                   if line.startswith("fit_lower ")]
        pruned = next((line.split()[1] for line in lines if line.startswith("prune ")), "zeroed:0")
        parts = part_sizes(tensors, tg.method_name(blob))
        lqer = ",".join(t.name for t in tensors if t.lqer is not None) or "-"
        print(f"export variant:{spec.replace(' ', '+')} bytes_model:{len(blob)} bytes_code_packed:{code} "
              f"bytes_total:{len(blob) + code} fits:{int(len(blob) + code <= tg.SIZE_LIMIT)} "
              f"compressor:{tg.method_name(blob)} export_s:{export_s:.0f} prune_{pruned} "
              f"lowered:{';'.join(lowered) or '-'} lqer_tensors:{lqer} "
              + " ".join(f"part_{k}:{v}" for k, v in parts.items())
              + f" roundtrip_val_loss:{loss:.6f} roundtrip_val_bpb:{bpb:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["default"])
