"""Lossless encodings of quantised payloads: bytes, bits per weight, encode and decode seconds, against entropy.

Reads artifacts written by train_gpt.py (any COMPRESSOR), recovers the exact payload they hold, and encodes it
every way below. Every method is decoded and checked byte for byte (or code for code) against the original.

    python3 bench/compress.py ARTIFACT.pgz [...] [--methods zstd brotli ...] [--json out.jsonl]

Methods:
  rans                       the export's default (train_gpt.rans_encode / rans_decode)
  zstd, lzma, brotli, zpaq   the whole payload through one back end (zstd-22 on the byte-shuffled payload is the
                             export before this benchmark; brotli 11 / window 2^24, lzma preset 9e, ZPAQ level 5
                             of the `zpaq` package on PyPI, one thread)
  record                     the #1855 record's `pergroup` compressor, its own functions executed from
                             ../shared/anchors/record_1855_train_gpt.py (needs the `lrzip` program): matrices by
                             role, rows reordered, transposed, each group through lrzip's ZPAQ mode; the rest
                             through torch.save + brotli, as that script stores it; record-T the same with
                             lrzip's -T (its LZO pre-test off: lrzip 0.651 stores a group raw when LZO cannot
                             shrink it, so ZPAQ runs on every group only with -T)
  group-X, groupT-X, sort-X  ours: each role's codes (all layers of one role back to back) as one stream, the rest
                             as another, each through back end X; T transposes every matrix (a column's codes
                             in a run); sort also orders each matrix's rows by their projection on the codes'
                             leading singular vector (the permutation is stored)
Reference: each quantised tensor's (and LQER factor's) order-0 entropy, its codes' empirical distribution,
summed (H0); `rest` is everything that is not a code (fp16 scales and tensors, header), raw and through lzma 9e.
`vs ref` compares a method's bytes with H0 + lzma(rest). `rans` also prints its code part alone (rANS words and
lane states) against H0 and against its own model's entropy (codes shifted per column, a table per row class
and per AWQ group: train_gpt.matrix_model, code_tables).
"""
import argparse
import ast
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402

RECORD = os.path.join(REPO, "..", "shared", "anchors", "record_1855_train_gpt.py")


def read_payload(path: str) -> bytes:
    blob = open(path, "rb").read()
    size = int.from_bytes(blob[4:12], "little")
    decompress = {i: d for i, _, d in tg.COMPRESSORS.values()}[blob[12]]
    payload = decompress(blob[13:], size + 1)
    assert len(payload) == size, path
    return payload


def parse(payload: bytes) -> dict:
    """The payload's codes, the bytes after them (fp16 data, table) and, per quantised tensor, its code slices."""
    header = tg.payload_header(payload)
    codes = np.frombuffer(payload, np.int8, header["codes"], 4)
    matrices = []  # (name, role, (offset, rows, cols)) for every code block: matrices and LQER factors
    for e in header["tensors"]:
        if "codes" in e:
            shape = e["shape"] if len(e["shape"]) == 2 else [1, math.prod(e["shape"])]
            role = e["name"].split(".", 2)[2] if e["name"].startswith("blocks.") else e["name"]
            matrices.append((e["name"], role, (e["codes"][0], *shape)))
        if "lqer" in e:
            a, _, b, _, a_shape, b_shape = e["lqer"]
            matrices += [(e["name"] + ".lqA", "lqer", (a[0], *a_shape)), (e["name"] + ".lqB", "lqer", (b[0], *b_shape))]
    return dict(codes=codes, rest=payload[4 + header["codes"]:], header=header, matrices=matrices)


def rans_class_entropy(payload: bytes) -> float:
    """The order-0 entropy that rans codes against: codes shifted per column, one table per class (matrix_model,
    code_tables), summed over the classes."""
    _, codes, _, tid, tables = tg.modelled_codes(payload)
    counts = np.bincount(tid.astype(np.int64) * 256 + codes.view(np.uint8), minlength=256 * tables).reshape(tables, -1)
    p = counts / np.maximum(1, counts.sum(1, keepdims=True))
    return float(-(counts * np.log2(np.where(counts > 0, p, 1))).sum() / 8)


# ------------------------------------------------------------------------------------------ back ends


def zpaq_module():
    import zpaq
    return zpaq


# The export's own compressors (rans needs the whole payload, not a back end) and ZPAQ at every level.
BACKENDS = {name: tg.COMPRESSORS[name][1:] for name in ("zstd", "lzma", "brotli", "rans")}
BACKENDS["zpaq"] = (lambda b: zpaq_module().compress(b, level=5, threads=1), lambda b, n: zpaq_module().decompress(b))
for _level in (1, 2, 3, 4):
    BACKENDS[f"zpaq{_level}"] = (lambda b, lv=_level: zpaq_module().compress(b, level=lv, threads=1),
                                 lambda b, n: zpaq_module().decompress(b))


def frame(streams: list[bytes]) -> bytes:
    sizes = b"".join(len(s).to_bytes(4, "little") for s in streams)
    return len(streams).to_bytes(4, "little") + sizes + b"".join(streams)


def unframe(blob: bytes) -> list[bytes]:
    n = int.from_bytes(blob[:4], "little")
    sizes = [int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "little") for i in range(n)]
    at, out = 4 + 4 * n, []
    for s in sizes:
        out.append(blob[at:at + s])
        at += s
    return out


# ------------------------------------------------------------------------------------------ our per-group layouts


def row_order(m: np.ndarray) -> np.ndarray:
    """Rows sorted by their projection on the leading right singular vector: similar rows end up side by side."""
    x = m.astype(np.float32)
    v = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][0]
    return np.argsort(x @ v, kind="stable").astype(np.uint16 if m.shape[0] < 65536 else np.uint32)


def layout(p: dict, transpose: bool, sort: bool) -> tuple[list[bytes], list]:
    """Code streams, one per role (in payload order of first appearance), and per block how it was laid out."""
    roles, plan = {}, []
    for name, role, (offset, rows, cols) in p["matrices"]:
        m = p["codes"][offset:offset + rows * cols].reshape(rows, cols)
        perm = row_order(m) if sort and rows > 1 and role != "lqer" else None
        if perm is not None:
            m = m[perm]
        roles.setdefault(role, []).append((m.T if transpose else m).tobytes())
        plan.append((role, offset, rows, cols, perm))
    return [b"".join(parts) for parts in roles.values()], plan


def group_method(backend: str, transpose: bool, sort: bool):
    compress, decompress = BACKENDS[backend]

    def encode(p: dict) -> bytes:
        streams, plan = layout(p, transpose, sort)
        perms = b"".join(perm.tobytes() for *_, perm in plan if perm is not None)
        return frame([compress(s) for s in streams] + [compress(perms + p["rest"])])

    def decode(blob: bytes, p: dict) -> np.ndarray:
        """Rebuilds the code array from the streams; the plan (shapes, offsets) stands in for the table that a
        product format would read from its header."""
        parts, (_, plan) = unframe(blob), layout(p, False, False)
        streams = [np.frombuffer(decompress(s, 1 << 30), np.int8) for s in parts[:-1]]
        tail = decompress(parts[-1], 1 << 30)
        codes, at, perm_at = np.empty_like(p["codes"]), {}, 0
        role_index = {role: i for i, role in enumerate(dict.fromkeys(r for r, *_ in plan))}
        for role, offset, rows, cols in ((r, o, n, c) for r, o, n, c, _ in plan):
            i = role_index[role]
            flat = streams[i][at.get(i, 0):at.get(i, 0) + rows * cols]
            at[i] = at.get(i, 0) + rows * cols
            m = flat.reshape(cols, rows).T if transpose else flat.reshape(rows, cols)
            if sort and rows > 1 and role != "lqer":
                dtype = np.uint16 if rows < 65536 else np.uint32
                perm = np.frombuffer(tail, dtype, rows, perm_at)
                perm_at += rows * dtype().itemsize
                m = m[np.argsort(perm)]
            codes[offset:offset + rows * cols] = m.ravel()
        assert tail[perm_at:] == p["rest"]
        return codes

    return encode, decode


# ------------------------------------------------------------------------------------------ the record's pergroup


def record_functions() -> dict:
    """The record's own per-group functions, executed from its file (measurement only, nothing copied)."""
    import collections
    import io

    import torch
    tree = ast.parse(open(RECORD).read())
    wanted = {"_GROUP_ORDER", "_SIMSORT_KEYS", "_PACK_MAGIC", "_similarity_sort_l1", "_lrzip_compress",
              "_lrzip_decompress", "_pack_streams", "_unpack_streams", "_serialize_pergroup", "_deserialize_pergroup"}
    nodes = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted)
             or (isinstance(n, ast.Assign) and {getattr(t, "id", None) for t in n.targets} & wanted)]
    namespace = dict(collections=collections, io=io, os=os, subprocess=subprocess, torch=torch)
    exec(compile(ast.Module(body=nodes, type_ignores=[]), RECORD, "exec"), namespace)
    return namespace


def record_state(p: dict) -> tuple[dict, dict]:
    """Our payload in the record's quant_result layout: NAME.q int8 codes, everything else kept as it is."""
    import torch
    quant = {}
    for name, role, (offset, rows, cols) in p["matrices"]:
        quant[name if role == "lqer" else name + ".q"] = torch.from_numpy(
            p["codes"][offset:offset + rows * cols].reshape(rows, cols).copy())
    quant["rest"] = torch.from_numpy(np.frombuffer(p["rest"], np.uint8).copy())
    return quant, {"table": p["header"]}


def record_method(lzo_test: bool = True):
    f = record_functions()
    if not lzo_test:  # lrzip stores a chunk raw when LZO cannot shrink it; -T makes it always run ZPAQ
        run = subprocess.run
        f["subprocess"] = type("S", (), dict(run=staticmethod(
            lambda cmd, **kw: run(cmd[:2] + ["-T"] + cmd[2:] if cmd[1] == "-z" else cmd, **kw))))
    num_layers = lambda p: 1 + max(int(n.split(".")[1]) for n, *_ in p["matrices"] if n.startswith("blocks."))

    def encode(p: dict) -> bytes:
        quant, meta = record_state(p)
        with tempfile.TemporaryDirectory() as tmp:
            return f["_serialize_pergroup"](quant, meta, num_layers(p), tmp)

    def decode(blob: bytes, p: dict) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            quant, _ = f["_deserialize_pergroup"](blob, num_layers(p), tmp)
        codes = np.empty_like(p["codes"])
        for name, role, (offset, rows, cols) in p["matrices"]:
            codes[offset:offset + rows * cols] = quant[name if role == "lqer" else name + ".q"].numpy().ravel()
        assert quant["rest"].numpy().tobytes() == p["rest"]
        return codes

    return encode, decode


# ------------------------------------------------------------------------------------------ the runs


def whole_method(backend: str):
    compress, decompress = BACKENDS[backend]

    def decode(blob: bytes, p: dict) -> np.ndarray | None:
        out = decompress(blob, len(p["payload"]) + 1)
        return np.frombuffer(out, np.int8, p["codes"].size, 4) if out == p["payload"] else None

    return lambda p: compress(p["payload"]), decode


def method(name: str):
    if name in ("record", "record-T"):
        return record_method(lzo_test=name == "record")
    if name.startswith(("group-", "groupT-", "sort-")):
        kind, backend = name.split("-", 1)
        return group_method(backend, transpose=kind != "group", sort=kind == "sort")
    return whole_method(name)


def measure(name: str, p: dict) -> dict:
    encode, decode = method(name)
    t0 = time.perf_counter()
    blob = encode(p)
    t1 = time.perf_counter()
    codes = decode(blob, p)
    t2 = time.perf_counter()
    if codes is None or not np.array_equal(codes, p["codes"]):
        raise SystemExit(f"error: {name} did not decode to the same codes")
    return dict(method=name, bytes=len(blob), encode_s=round(t1 - t0, 2), decode_s=round(t2 - t1, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--methods", nargs="+", default=["zstd", "lzma", "brotli", "zpaq", "record", "group-brotli",
                                                       "groupT-brotli", "sort-brotli", "groupT-zpaq", "sort-zpaq"])
    ap.add_argument("--json", help="append one JSON line per artifact and method")
    args = ap.parse_args()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda x, **_: x  # noqa: E731
    for path in args.artifacts:
        payload = read_payload(path)
        p = dict(parse(payload), payload=payload)
        weights = sum(rows * cols for *_, (_, rows, cols) in p["matrices"])
        h0 = sum(tg.order0_bytes(p["codes"][o:o + r * c]) for *_, (o, r, c) in p["matrices"])
        h0_classes = rans_class_entropy(payload)
        rest_lzma = len(BACKENDS["lzma"][0](p["rest"]))
        ref = h0 + rest_lzma
        print(f"\n{path}: {len(payload):,} payload bytes, {weights:,} codes, order-0 entropy per tensor (H0) "
              f"{h0:,.0f} bytes ({8 * h0 / weights:.4f} bits/code), per rans class {h0_classes:,.0f}; rest "
              f"{len(p['rest']):,} bytes raw, {rest_lzma:,} through lzma; ref = H0 + lzma(rest) = {ref:,.0f}")
        print(f"{'method':<16}{'bytes':>12}{'bits/code':>11}{'vs ref':>9}{'enc s':>8}{'dec s':>8}")
        for name in tqdm(args.methods, desc=os.path.basename(path), leave=False, disable=not sys.stderr.isatty()):
            r = measure(name, p)
            r.update(artifact=path, payload_bytes=len(payload), codes=weights, h0_bytes=round(h0),
                     h0_classes_bytes=round(h0_classes), rest_bytes=len(p["rest"]), rest_lzma_bytes=rest_lzma)
            print(f"{name:<16}{r['bytes']:>12,}{8 * r['bytes'] / weights:>11.4f}"
                  f"{r['bytes'] / ref - 1:>+9.2%}{r['encode_s']:>8}{r['decode_s']:>8}", flush=True)
            if name == "rans":
                blob = tg.rans_encode(payload)
                r["rans_code_bytes"] = coded = len(blob) - 4 - int.from_bytes(blob[:4], "little")
                print(f"{'':<16}codes {coded:,} bytes: {coded / h0 - 1:+.2%} vs H0, "
                      f"{coded / h0_classes - 1:+.2%} vs its classes' entropy; lzma part {len(blob) - coded:,}")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
