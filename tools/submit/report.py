"""What the tool prints (compliance, results and statistics) and the submission.json it writes."""

import datetime as _dt
import hashlib
import math
import os

from .checks import dataset_label, hardware_label, run_passes
from .stats import ALPHA, MARGIN_NATS, MIN_SEEDS


def utc_now():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt(x, spec, none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _table(headers, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _cell(check, value):
    ok = check[0]
    word = "PASS" if ok is True else ("FAIL" if ok is False else "----")
    return "%s %s" % (word, value) if value not in (None, "") else word


def compliance_table(runs):
    headers = ["run_id", "seed", "status", "bytes_total", "scores", "train_s", "eval_s",
               "code", "config", "result"]
    rows = []
    for r in runs:
        c = r.checks
        t_ms, e_ms = r.train_time_ms, r.eval_time_ms
        rows.append([
            r.run_id,
            _cell(c["seed"], r.seed),
            _cell(c["complete"], r.status),
            _cell(c["bytes"], r.bytes_field("bytes_total")),
            _cell(c["scores"], ""),
            _cell(c["train"], None if t_ms is None else "%.1f" % (t_ms / 1000)),
            _cell(c["eval"], None if e_ms is None else "%.1f" % (e_ms / 1000)),
            _cell(c["code"], r.code_sha[:8] if r.code_sha else None),
            _cell(c["config"], ""),
            "PASS" if run_passes(r) else "FAIL",
        ])
    return _table(headers, rows)


def results_table(runs):
    headers = ["run_id", "seed", "steps", "step_avg_ms", "pre_export_bpb", "roundtrip_bpb",
               "sliding_bpb", "ttt_bpb", "val_loss", "val_bpb", "bytes_model", "bytes_code"]
    rows = []
    for r in runs:
        steps = r.steps
        if steps is not None and r.total_steps is not None:
            steps = "%d/%d" % (steps, r.total_steps)
        rows.append([
            r.run_id, fmt(r.seed, "d"), fmt(steps, ""), fmt(r.step_avg_ms, ".2f"),
            fmt(r.field("pre_export", "val_bpb"), ".8f"),
            fmt(r.field("roundtrip", "val_bpb"), ".8f"),
            fmt(r.field("sliding", "val_bpb"), ".8f"),
            fmt(r.field("ttt", "val_bpb"), ".8f"),
            fmt(r.val_loss, ".8f"), fmt(r.val_bpb, ".8f"),
            fmt(r.bytes_field("bytes_model"), "d"), fmt(r.bytes_field("bytes_code"), "d"),
        ])
    return _table(headers, rows)


def stats_block(st, margin=MARGIN_NATS):
    out = []
    seeds = " ".join(str(s) for s in st["seeds"])
    out.append("statistics over %d complete run(s) (seeds: %s)" % (st["n"], seeds or "none"))
    for rid, status in st["excluded"]:
        out.append("  not counted: %s (%s)" % (rid, status))
    out.append("  val_loss  mean %s  std %s" % (fmt(st["val_loss_mean"], ".8f"),
                                                  fmt(st["val_loss_std"], ".8f")))
    out.append("  val_bpb   mean %s  std %s" % (fmt(st["val_bpb_mean"], ".8f"),
                                                  fmt(st["val_bpb_std"], ".8f")))
    if st["n"] < MIN_SEEDS:
        out.append("  note: a record needs at least %d seeds" % MIN_SEEDS)
    t = st["test"]
    if t is None:
        out.append("  no --against given: no significance test")
        return "\n".join(out)
    out.append("against %s" % t["source"])
    if t.get("conversion"):
        out.append("  %s" % t["conversion"])
    if t.get("val_loss") is None:
        out.append("  cannot test: %s" % t.get("problem", "no reference val_loss"))
        return "\n".join(out)
    out.append("  reference val_loss %.8f nats" % t["val_loss"])
    out.append("  improvement d_i = ref - val_loss_i: mean %s  std %s nats (n=%d)"
               % (fmt(t["mean"], ".8f"), fmt(t["std"], ".8f"), t["n"]))
    if t["p"] is None:
        out.append("  one-sided t-test needs at least 2 runs")
        out.append("  p < %g: NO (not tested)" % ALPHA)
        return "\n".join(out)
    out.append("  one-sided t-test, H0: mean(d) <= %g nats: t = %s, df = %d, p = %.6g"
               % (margin, fmt(t["t"], ".4f"), t["df"], t["p"]))
    out.append("  p < %g: %s" % (ALPHA, "YES (beats the reference by more than %g nats)" % margin
                                  if t["significant"] else "NO"))
    return "\n".join(out)


def build_submission(runs, st, args, code, existing):
    counted = [r for r in runs if r.counted]
    meta = {}
    for key, flag in (("author", args.author), ("github_id", args.github_id),
                      ("name", args.name), ("blurb", args.blurb), ("date", args.date)):
        meta[key] = flag if flag is not None else existing.get(key, "")
    if not meta["date"]:
        meta["date"] = utc_now()
    sub = dict(meta)
    sub["val_loss"] = _round(st["val_loss_mean"])
    sub["val_bpb"] = _round(st["val_bpb_mean"])
    totals = [r.bytes_field("bytes_total") for r in counted if r.bytes_field("bytes_total")]
    sub["bytes_total"] = max(totals) if totals else None
    sub["bytes_code"] = len(code)
    sub["val_loss_std"] = _round(st["val_loss_std"])
    sub["val_bpb_std"] = _round(st["val_bpb_std"])
    t = st["test"]
    sub["p_value"] = None if not t or t.get("p") is None else float("%.6g" % t["p"])
    if t and t.get("val_loss") is not None:
        sub["significance"] = {
            "test": "one-sided one-sample t-test on d_i = ref_val_loss - val_loss_i, "
                    "H0: mean(d) <= %g nats" % MARGIN_NATS,
            "against": t["source"],
            "against_val_loss": _round(t["val_loss"]),
            "conversion": t.get("conversion"),
            "margin_nats": MARGIN_NATS,
            "mean_improvement_nats": _round(t["mean"]),
            "t": None if t["t"] is None or not math.isfinite(t["t"]) else round(t["t"], 6),
            "df": t["df"],
            "p_value": sub["p_value"],
            "alpha": ALPHA,
            "significant": bool(t.get("significant")),
        }
    sub["num_seeds"] = len(counted)
    sub["seeds"] = [r.seed for r in counted]
    sub["seed_results"] = [{
        "run_id": r.run_id,
        "seed": r.seed,
        "log": os.path.basename(r.path),
        "val_loss": r.val_loss,
        "val_bpb": r.val_bpb,
        "pre_export_val_loss": r.field("pre_export", "val_loss"),
        "pre_export_val_bpb": r.field("pre_export", "val_bpb"),
        "roundtrip_val_loss": r.field("roundtrip", "val_loss"),
        "roundtrip_val_bpb": r.field("roundtrip", "val_bpb"),
        "sliding_val_loss": r.field("sliding", "val_loss"),
        "sliding_val_bpb": r.field("sliding", "val_bpb"),
        "ttt_val_bpb": r.field("ttt", "val_bpb"),
        "steps": r.steps,
        "step_avg_ms": r.step_avg_ms,
        "train_time_seconds": None if r.train_time_ms is None else r.train_time_ms / 1000.0,
        "eval_time_seconds": None if r.eval_time_ms is None else r.eval_time_ms / 1000.0,
        "bytes_model": r.bytes_field("bytes_model"),
        "bytes_total": r.bytes_field("bytes_total"),
        "stopped_early": bool(r.stopping_early),
        "compliant": run_passes(r),
    } for r in counted]
    sub["hardware"] = args.hardware or hardware_label(runs)
    sub["dataset"] = args.dataset or dataset_label(runs)
    sub["code_sha256"] = hashlib.sha256(code).hexdigest()
    sub["compliant"] = all(run_passes(r) for r in runs)
    ref_cfg = next((r.config() for r in counted), {})
    sub["config"] = {k: v for k, v in ref_cfg.items() if not k.startswith("env.")}
    sub["generated_by"] = "tools/submission.py"
    return sub


def _round(x, nd=8):
    return None if x is None or not math.isfinite(x) else round(x, nd)
