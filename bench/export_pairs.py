#!/usr/bin/env python3
"""Paired export and evaluation measure: train a mini-golf row once per seed, then write and score its artifact once
per variant, so every variant quantises and scores the very same weights and the comparison has no training noise.

    python3 bench/export_pairs.py run proxy8192 --seeds 1337 42 2025 \\
        --variant GPTQ_ACT_ORDER=1 --variant GPTQ_EMBED=0 --variant "CLIP_SIGMAS=attn:13,mlp:11.5,embed:14"
    python3 bench/export_pairs.py table --write   # markdown table of the results; --write: into results/MINIGOLF.md

A variant changes only export or scoring settings (EXPORT_SETTINGS, EVAL_SETTINGS; anything that touches training
is refused). Its export penalty is its reloaded artifact's score minus the trained model's, both plain windows at
the row's EVAL_SEQ_LEN in eager fp32; every variant is also scored in its final mode. The table gives each
variant's penalty and final score against the row's own (the same seeds, paired).
The row's settings, data and code are mini-golf's at the chosen shape (bench/minigolf.py, `--shape`); results go to
results/minigolf/export_pairs.jsonl (regime: regime_export_pairs.jsonl), each run's log to the work folder.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minigolf as mg  # noqa: E402

RESULTS = mg.REPO / "results" / "minigolf" / "export_pairs.jsonl"
BEGIN, END = "<!-- minigolf-export-pairs:begin -->", "<!-- minigolf-export-pairs:end -->"
# Settings read only by the export (quantisation, LQER, packing): the trained weights and Hessians stay valid.
# GPTQ_EMBED is among them because the embedding's Hessian is always collected here and only used when asked for.
EXPORT_SETTINGS = {"GPTQ_ACT_ORDER", "GPTQ_EMBED", "CLIP_SIGMAS", "CLIP_SEARCH", "LQER_RANK", "LQER_TENSORS",
                   "AWQ_GROUP", "BYTE_SHUFFLE", "COMPRESSOR"}
# Settings read only by the final scoring (TTT aside: on a CPU it costs minutes a variant).
EVAL_SETTINGS = {"EVAL_SEQ_LEN", "EVAL_STRIDE", "DOC_EVAL"}
EMBED_HESSIAN = "tok_emb.weight"


def parse_variant(text: str) -> dict:
    settings = dict(item.split("=", 1) for item in text.split() if "=" in item)
    if not settings or len(settings) != len(text.split()):
        raise mg.HarnessError(f"--variant {text!r}: give NAME=VALUE settings separated by spaces")
    foreign = sorted(set(settings) - EXPORT_SETTINGS - EVAL_SETTINGS)
    if foreign:
        raise mg.HarnessError(f"--variant {text!r}: {', '.join(foreign)} would change training, not only the export "
                              f"or the scoring (allowed: {', '.join(sorted(EXPORT_SETTINGS | EVAL_SETTINGS))})")
    return settings


def label(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "row"


def load_script(capped: Path, packed: Path):
    """The capped train_gpt.py as a module; its code bytes are the packed copy's, as in every mini-golf run."""
    spec = importlib.util.spec_from_file_location("train_gpt_capped", capped)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.__file__ = str(packed)
    return module


def final_score(tg, model, hp, val_tokens, tables) -> float:
    """The reloaded model's score in the variant's final mode (document windows, sliding or plain), eager."""
    mode, seq = tg.final_mode(hp), hp.eval_seq_len
    if mode == "ttt":
        raise mg.HarnessError("a TTT row's final score takes minutes a variant on a CPU: measure on a row with TTT=0")
    stride = hp.eval_stride or seq if mode in ("doc", "sliding") else seq
    return tg.evaluate(model, val_tokens, tables, seq, stride, hp.val_batch_size, 0, 1, documents=mode == "doc")[1]


def run_seed(tg, row: mg.Row, seed: int, variants: list[dict], args, folder: Path, base_env: dict) -> list[dict]:
    """One training, then one export + reload + score per variant (the row's own settings first)."""
    os.environ.update(base_env, GPTQ_EMBED="1")  # a GPTQ row collects the embedding Hessian; variants may drop it
    os.chdir(folder)
    (folder / "artifacts").mkdir(exist_ok=True)
    hp = tg.Hyperparameters.from_env()
    hp.validate(1)
    log = tg.Logger(hp.run_id, True)
    _, world_size, device = tg.setup_distributed()
    tg.log_setup(hp, log, world_size, device)
    tg.torch.manual_seed(hp.seed)
    tg.np.random.seed(hp.seed)
    val_tokens, tables = tg.load_scoring(hp, device)
    trainer = tg.Trainer(hp, 0, 1, device, log)
    trainer.warm_up_compile(tables)
    steps, train_ms = trainer.train(val_tokens, tables)
    if hp.gptq:  # as in a run: without Hessians every matrix, the embedding too, competes in FIT_TO_LIMIT's ladder
        trainer.calibrate()
    hessians = trainer.hessians
    seq, batch = hp.eval_seq_len, hp.val_batch_size
    _, pre_bpb = tg.evaluate(trainer.model.eval(), val_tokens, tables, seq, seq, batch, 0, 1)
    log(f"pre_export_exact val_bpb:{pre_bpb:.8f} steps:{steps} train_time:{train_ms:.0f}ms")
    records = []
    for settings in variants:
        os.environ.pop("GPTQ_EMBED", None)
        os.environ.update({**base_env, **settings, "RUN_ID": f"{hp.run_id}_v{len(records)}"})
        hp_v = tg.Hyperparameters.from_env()
        hp_v.validate(1)
        trainer.hessians = {k: h for k, h in hessians.items() if hp_v.gptq_embed or k != EMBED_HESSIAN}
        t = time.perf_counter()
        path, sizes = tg.export(hp_v, trainer, log)
        export_s = time.perf_counter() - t
        model = tg.load_artifact_model(hp_v, path, device, sizes["sha256"]).requires_grad_(False)
        _, bpb = tg.evaluate(model, val_tokens, tables, seq, seq, batch, 0, 1)
        final = final_score(tg, model, hp_v, val_tokens, tables)
        log(f"variant {label(settings)} roundtrip_bpb:{bpb:.8f} penalty:{bpb - pre_bpb:+.8f} "
            f"final_bpb:{final} bytes_total:{sizes['bytes_total']} export_s:{export_s:.1f}")
        os.remove(path)
        records.append(dict(row=row.name, seed=seed, variant=label(settings), settings=settings, steps=steps,
                            train_s=train_ms / 1000, pre_bpb=pre_bpb, roundtrip_bpb=bpb, penalty=bpb - pre_bpb,
                            final_bpb=final, final_mode=tg.final_mode(hp_v),
                            bytes_model=sizes["bytes_model"], bytes_total=sizes["bytes_total"], export_s=export_s,
                            log=str(folder / "logs" / f"{hp.run_id}.txt")))
        for key in settings:
            del os.environ[key]
    return records


def cmd_run(args) -> int:
    row, shape = mg.ROWS.get(args.row), mg.SHAPES[args.shape]
    if row is None or row.script != "ours":
        raise mg.HarnessError(f"{args.row!r} is not one of our rows (bench/minigolf.py rows)")
    refusal = mg.shape_refusal(row, shape)
    if refusal:
        raise mg.HarnessError(refusal)
    variants = [{}] + [parse_variant(v) for v in args.variant]
    clash = sorted(k for v in variants for k in v if k in row.env)
    if clash:
        raise mg.HarnessError(f"row {row.name} already sets {', '.join(clash)}: measure against a row that leaves it")
    shared, work = mg.need_shared(args.shared), args.work
    results = args.results or (work / "smoke_export_pairs.jsonl" if args.smoke else mg.results_file(shape, RESULTS))
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    packed = mg.prepare_ours(work, pack=True, shape=shape)
    data = shape.data or row.data
    info = mg.ensure_data(shared, work, data, args.smoke, args.threads)
    print(f"data {data}: {info['val_docs']} val docs, {info['val_tokens']:,} val tokens", flush=True)
    tg = load_script(mg.capped_copy(work, shape), packed)
    host, git = mg.machine(), mg.git_state()
    for seed in args.seeds:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_id = f"export_{row.name}_s{seed}_{stamp}"
        folder = work / "runs" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        env = mg.row_env(row, seed, run_id, mg.data_dir(work, data, args.smoke), shared, args.threads, 1,
                         2, args.smoke, None, None, shape)
        print(f"{row.name} seed {seed}: log {folder / 'logs' / (run_id + '.txt')}", flush=True)
        for record in run_seed(tg, row, seed, variants, args, folder, env):
            record.update(git, date=stamp, machine=host, threads=args.threads, shape=shape.name)
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(f"    {record['variant']}: penalty {record['penalty']:+.5f}  bytes {record['bytes_total']:,}",
                  flush=True)
    return 0


def signed(values: list[float]) -> str:
    se = mg.standard_error(values)
    return f"{statistics.fmean(values):+.5f}" + (f" ± {se:.5f}" if se is not None else "")


def table(records: list[dict]) -> str:
    """Per row and variant: seeds, export penalty (mean ± SE), its paired difference from the row's own export."""
    lines = ["| row | variant | seeds | export penalty (mean ± SE) | Δ vs row's export, same seeds | bytes_total "
             "(mean) | Δ bytes | final score Δ vs row's, same seeds | commits |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    runs = {(r["row"], r["seed"], r["date"], r["variant"]): r for r in records}
    for row in sorted({r["row"] for r in records}):
        for variant in dict.fromkeys(r["variant"] for r in records if r["row"] == row):
            mine = [r for r in records if r["row"] == row and r["variant"] == variant]
            own = [runs[(row, r["seed"], r["date"], "row")] for r in mine]
            paired, extra, final = "", "", ""
            if variant != "row":
                paired = signed([r["penalty"] - o["penalty"] for r, o in zip(mine, own)])
                extra = f"{statistics.fmean(r['bytes_total'] - o['bytes_total'] for r, o in zip(mine, own)):+,.0f}"
                if all(r.get("final_bpb") is not None and o.get("final_bpb") is not None for r, o in zip(mine, own)):
                    final = signed([r["final_bpb"] - o["final_bpb"] for r, o in zip(mine, own)])
            commits = ", ".join(sorted({r["commit"][:7] for r in mine}))
            lines.append(f"| {row} | `{variant}` | {len(mine)} | {signed([r['penalty'] for r in mine])} | {paired} | "
                         f"{statistics.fmean(r['bytes_total'] for r in mine):,.0f} | {extra} | {final} | {commits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a row per seed and export it once per variant")
    run.add_argument("row")
    run.add_argument("--seeds", type=int, nargs="+", default=[1337])
    run.add_argument("--shape", choices=mg.SHAPES, default="mini", help="mini-golf's shape (bench/minigolf.py)")
    run.add_argument("--variant", action="append", default=[], help="export settings, e.g. 'GPTQ_ACT_ORDER=1'")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--work", type=Path, default=mg.DEFAULT_WORK)
    run.add_argument("--shared", type=Path, default=mg.DEFAULT_SHARED)
    run.add_argument("--results", type=Path, help=f"JSON lines file (default {RESULTS.relative_to(mg.REPO)}, at "
                     "regime regime_export_pairs.jsonl beside it; with --smoke WORK/smoke_export_pairs.jsonl)")
    run.add_argument("--smoke", action="store_true", help="harness check: 8 steps, 40 val docs")
    show = sub.add_parser("table", help="markdown table of the results")
    show.add_argument("--results", type=Path, default=RESULTS)
    show.add_argument("--write", action="store_true", help="replace its section of results/MINIGOLF.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        text = table(mg.read_results(args.results))
        print(text)
        if args.write:
            mg.TABLE_DOC.write_text(mg.replace_section(mg.TABLE_DOC.read_text(encoding="utf-8"), text, BEGIN, END),
                                    encoding="utf-8")
        return 0
    except mg.HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
