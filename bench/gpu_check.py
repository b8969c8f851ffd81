"""The first command on any GPU: does the CUDA path work, how fast is it, and does a capped run stay compliant?

For the default configuration and for the full frontier configuration, one capped training run each (compile
warm-up, training until the cap, export, reload, score) on the offline demo dataset, built here for the vocabulary
each profile needs: no download. From each run's log it reports the attention kernel, compile time and compiled
graphs, steady-state ms/step, tokens/s per GPU, peak memory, and whether training stopped inside its cap with
`compliance ... train_ok:1` and a `final_submission` line. The figures are appended to bench/RESULTS.md with the GPU
name and the date. Exit code 1 if any check fails.

The `record` profile runs the #1855 record's own script (measurement only: `--record`, by default
../shared/anchors/record_1855_train_gpt.py; on a GPU without FlashAttention-3 its `shim/` SDPA stand-in, on a CPU its
CPU copy written by `cpu_record.py` beside it) for the same seconds on the same data, TTT off and stopped after its
pre-quantisation score: ms/step and the training loss at the cap then compare it with `default` at equal time.

The artifact may exceed 16 MB here (ALLOW_OVERSIZE=1, FIT_TO_LIMIT=0): minutes of training on demo text are not
the weights of a real run, and pruning them to fit would only spend the check's time on recompression. The scores
are those of the demo text, not FineWeb.

    bash bench/gpu_check.sh                    # on a GPU machine: full-size models, 60 s cap each
    bash bench/gpu_check.sh --tiny --seconds 20  # the same end to end on a CPU, tiny models (compiles on CPU)
    bash bench/gpu_check.sh --profiles default record --record DIR/record_1855_train_gpt.py  # ours vs the record
"""
import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The defaults follow the #1855 record's run (results/MINIGOLF.md, decision table); this profile adds what the
# fuller frontier stacks on top and the defaults leave off, the asymmetric soft-cap (#1945), to time the whole stack.
FRONTIER = dict(LOGIT_SOFTCAP_NEG="20")
PROFILES = {"default": {}, "frontier": FRONTIER, "record": {}}
# The record's own names; its block indices scaled like ours in --tiny.
RECORD = dict(CASEOPS_ENABLED="0", TTT_ENABLED="0", PREQUANT_ONLY="1")
RECORD_TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="1",
                   TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="4096", VAL_BATCH_TOKENS="16384", WARMUP_STEPS="2",
                   MUON_MOMENTUM_WARMUP_STEPS="20", XSA_LAST_N="2", NUM_LOOPS="1", LOOP_START="1", LOOP_END="1",
                   PARALLEL_START_LAYER="1", ROPE_DIMS="8", ROPE_TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128")
# --tiny: shapes a CPU compiles and trains in minutes, block indices rescaled to 2 blocks, TTT chunks of one
# 128-token window (a chunk may not outgrow its window), and 90 s of evaluation (TTT stops adapting there; on a CPU
# it would otherwise take most of 570 s).
TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="1", TRAIN_SEQ_LEN="128",
            TRAIN_BATCH_TOKENS="4096", VAL_BATCH_SIZE="16384", WARMUP_STEPS="2", WARMDOWN_FRAC="0.2",
            MUON_MOMENTUM_WARMUP_STEPS="20", GPTQ_CALIB_BATCHES="2", GPTQ_RESERVE_SECONDS="1",
            TTT_CHUNK_TOKENS="128", XSA_LAST_N="2", PARALLEL_START="1", RECUR_LAYERS="1", EVAL_SECONDS="90")


def fields(log: str, event: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith(event + " ")]
    return dict(token.split(":", 1) for token in lines[-1].split()[1:] if ":" in token) if lines else {}


def record_progress(log: str, batch_tokens: int) -> list[tuple[int, float, float]]:
    """(step, train ms, train loss) of the record's `N/M train_loss: L train_time: Xm tok/s: T` lines; the time
    comes from its running tokens/s (its minutes have one decimal)."""
    return [(int(m.group(1)), 1000 * int(m.group(1)) * batch_tokens / float(m.group(3)), float(m.group(2))) for m in
            re.finditer(r"^(\d+)/\d+ train_loss: (\S+) train_time: \S+ tok/s: (\d+)", log, re.M)]


def steady_ms_per_step(log: str) -> float | None:
    """ms/step between the last two progress lines: compile, the first steps and QAT switching stay out of it."""
    return steady_ms([(int(m.group(1)), float(m.group(2))) for m in
                      re.finditer(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", log, re.M)])


def steady_ms(points: list[tuple]) -> float | None:
    """ms/step between the last two (step, ms, ...) progress points."""
    if len(points) < 2:
        return None
    (s0, t0, *_), (s1, t1, *_) = points[-2:]
    return (t1 - t0) / (s1 - s0)


def environment() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        import flash_attn_interface  # noqa: F401
        fa3 = "yes"
    except ImportError:
        fa3 = "no"
    return dict(gpu=gpu, gpus=torch.cuda.device_count(), torch=torch.__version__, cuda=torch.version.cuda or "-",
                cudnn=torch.backends.cudnn.version() or "-", fa3=fa3, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def demo_data(work: Path, vocab: int) -> Path:
    out = work / f"demo_v{vocab}"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "--out", str(out), "--vocab-size", str(vocab)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def record_script(args, work: Path) -> tuple[Path, dict]:
    """The record's script and the environment it needs here: on a CPU its CPU copy (fp32 without native bf16);
    on a GPU the script itself, with the SDPA stand-in for FlashAttention-3 when that is not installed."""
    import torch
    if not args.record.is_file():
        raise SystemExit(f"error: the record profile needs {args.record} (pass --record PATH)")
    shim = args.record.parent / "shim"
    if not torch.cuda.is_available():
        copy = work / "record_cpu.py"
        fp32 = [] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ["--fp32"]
        subprocess.run([sys.executable, str(args.record.parent / "cpu_record.py"), str(args.record), str(copy), *fp32],
                       check=True)
        return copy, dict(RECORD_SOURCE=str(args.record))
    try:
        import flash_attn_interface  # noqa: F401
        return args.record, {}
    except ImportError:
        return args.record, dict(PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))


def run_record(args, work: Path) -> dict:
    script, extra = record_script(args, work)
    data = demo_data(work, 8192)
    env = dict(os.environ, **RECORD, **(RECORD_TINY if args.tiny else {}), **extra)
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"), VOCAB_SIZE="8192",
               RUN_ID="gpu_check_record", MAX_WALLCLOCK_SECONDS=str(args.seconds), ITERATIONS="100000",
               TRAIN_LOG_EVERY="10", VAL_LOSS_EVERY="0", ARTIFACT_DIR=str(work / "record_artifacts"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    print(f"gpu_check: profile record: {script.name}, {args.seconds} s cap, {args.nproc} process(es)", flush=True)
    result = subprocess.run(launcher + [str(script)], cwd=work, env=env, capture_output=True, text=True)
    log = result.stdout + result.stderr
    (work / "record.log").write_text(log)
    batch = re.findall(r"^\s*train_batch_tokens: (\d+)", log, re.M)
    points = record_progress(log, int(batch[-1])) if batch else []
    steps, ms, loss = points[-1] if points else (None, None, None)
    peak = re.findall(r"^peak memory allocated: (\d+) MiB", log, re.M)
    pre = re.findall(r"^diagnostic pre-quantization post-ema val_loss:\S+ val_bpb:(\S+) eval_time:(\d+)ms", log, re.M)
    row = dict(profile="record", exit=result.returncode, attention="fa3" if not extra else "sdpa-standin",
               compile_s=None, graphs="-", graph_breaks="-", ms_per_step=steady_ms(points),
               tok_s_per_gpu=1000 * steps * int(batch[-1]) / ms / args.nproc if points else None,
               peak_mib=peak[-1] if peak else "-", steps=steps or "-", train_s=ms and ms / 1000, train_loss=loss,
               train_ok="-", val_bpb=f"{pre[-1][0]} (pre-quant)" if pre else "-",
               eval_s=int(pre[-1][1]) / 1000 if pre else None)
    problems = [f"exit {result.returncode}: see {work / 'record.log'}"] if result.returncode else []
    if not pre:
        problems.append("no pre-quantization score line")
    row["problems"] = "; ".join(problems) or "none"
    return row


def run_profile(name: str, env_overrides: dict, args, work: Path) -> dict:
    if name == "record":
        return run_record(args, work)
    env = dict(os.environ, **env_overrides)
    if args.tiny:
        env.update(TINY)
    vocab = int(env.get("VOCAB_SIZE", "8192"))  # the default vocabulary
    data = demo_data(work, vocab)
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"), VOCAB_SIZE=str(vocab),
               RUN_ID=f"gpu_check_{name}", MAX_WALLCLOCK_SECONDS=str(args.seconds), ITERATIONS="100000",
               TRAIN_LOG_EVERY="10", VAL_LOSS_EVERY="0", ALLOW_OVERSIZE="1", FIT_TO_LIMIT="0",
               ARTIFACT_DIR=str(work / "artifacts"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    print(f"gpu_check: profile {name}: vocab {vocab}, {args.seconds} s cap, {args.nproc} process(es)", flush=True)
    result = subprocess.run(launcher + [str(REPO / "train_gpt.py")], cwd=work, env=env, capture_output=True,
                            text=True)
    log = result.stdout
    (work / f"{name}.log").write_text(log + result.stderr)
    runtime, warmup, done = fields(log, "runtime"), fields(log, "warmup_done"), fields(log, "train_done")
    final, compliance, compile_stats = fields(log, "final_submission"), fields(log, "compliance"), fields(log, "compile")
    tok_s = [float(m) for m in re.findall(r" tok_s:(\d+)", log)]
    losses = re.findall(r"^step:\d+/\d+ train_loss:(\S+)", log, re.M)
    row = dict(profile=name, exit=result.returncode, attention=runtime.get("attention", "-"),
               compile_s=float(warmup.get("time_ms", "nan")) / 1000, graphs=compile_stats.get("graphs", "-"),
               graph_breaks=compile_stats.get("graph_breaks", "-"), ms_per_step=steady_ms_per_step(log),
               tok_s_per_gpu=tok_s[-1] / args.nproc if tok_s else None, peak_mib=done.get("peak_mem_mib", "-"),
               steps=done.get("step", "-"), train_s=float(final.get("train_time_ms", "nan")) / 1000,
               train_loss=float(losses[-1]) if losses else None,
               train_ok=compliance.get("train_ok", "-"), val_bpb=final.get("val_bpb", "-"),
               eval_s=float(final.get("eval_time_ms", "nan")) / 1000)
    problems = []
    if result.returncode != 0:
        error = [line for line in (log + result.stderr).splitlines() if line.startswith("error:")]
        problems.append(f"exit {result.returncode}: {error[-1] if error else 'see ' + str(work / (name + '.log'))}")
    if not final:
        problems.append("no final_submission line")
    if row["train_ok"] != "1" or not row["train_s"] <= args.seconds:
        problems.append(f"train_s {row['train_s']} over the {args.seconds} s cap or train_ok:{row['train_ok']}")
    if row["graph_breaks"] not in ("0", "-"):
        problems.append(f"{row['graph_breaks']} graph breaks")
    row["problems"] = "; ".join(problems) or "none"
    return row


def markdown(env: dict, rows: list[dict], args) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)  # noqa: E731
    head = (f"\n## {env['date']}: {env['gpus']} x {env['gpu']}{' (tiny config)' if args.tiny else ''}\n\n"
            f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, FlashAttention-3 importable: "
            f"{env['fa3']}, Python {env['python']}; {args.nproc} process(es), {args.seconds} s training cap per "
            f"profile, demo data (scores are not FineWeb scores).\n\n"
            "| profile | attention | compile s | graphs | breaks | ms/step | tokens/s per GPU | peak MiB | steps | "
            "train s | train loss at the cap | train_ok | eval s | val_bpb (demo) | problems |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |\n")
    return head + "".join(
        f"| {r['profile']} | {r['attention']} | {fmt(r['compile_s'], '.1f')} | {r['graphs']} | {r['graph_breaks']} | "
        f"{fmt(r['ms_per_step'], '.1f')} | {fmt(r['tok_s_per_gpu'], ',.0f')} | {r['peak_mib']} | {r['steps']} | "
        f"{fmt(r['train_s'], '.1f')} | {fmt(r['train_loss'], '.4f')} | {r['train_ok']} | {fmt(r['eval_s'], '.1f')} | "
        f"{r['val_bpb']} | "
        f"{r['problems']} |\n" for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models (a CPU run end to end)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training cap per profile (default 60)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (default 1)")
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=["default", "frontier"])
    parser.add_argument("--record", type=Path, default=REPO.parent / "shared" / "anchors" / "record_1855_train_gpt.py",
                        help="the record's script for the record profile (its shim/ and cpu_record.py beside it)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "gpu_check", help="scratch folder")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="appended to")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = environment()
    print("gpu_check: " + " ".join(f"{k}:{str(v).replace(' ', '_')}" for k, v in env.items()), flush=True)
    rows = [run_profile(name, PROFILES[name], args, args.work) for name in args.profiles]
    text = markdown(env, rows, args)
    print(text)
    if not args.results.exists():
        args.results.write_text("# GPU check results\n\nAppended by `bash bench/gpu_check.sh` (bench/gpu_check.py).\n")
    with open(args.results, "a") as f:
        f.write(text)
    return 0 if all(r["problems"] == "none" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
