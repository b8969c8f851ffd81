"""Statistics over the seeds: mean and std, and the one-sided t-test of the improvement on a reference."""

import json
import math
import os
import re

from scipy.stats import ttest_1samp

from . import UsageError

MARGIN_NATS = 0.005
ALPHA = 0.01
MIN_SEEDS = 3


def mean_std(xs):
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


def one_sided_ttest(d, margin=MARGIN_NATS):
    """H0: mean(d) <= margin against H1: mean(d) > margin (scipy's one-sample t-test, alternative "greater").

    t = (mean(d) - margin) / (std(d, ddof=1) / sqrt(n)), p = P(T_{n-1} > t).
    Returns a dict with n, mean, std, t, df, p (t and p are None when n < 2).
    """
    n = len(d)
    m, s = mean_std(list(d))
    out = {"n": n, "mean": m, "std": s, "t": None, "df": n - 1, "p": None}
    if n < 2:
        return out
    if s == 0.0:  # scipy answers nan without a spread; the sign of mean - margin settles it
        t = math.inf if m > margin else (-math.inf if m < margin else 0.0)
        p = 0.0 if m > margin else 1.0
    else:
        result = ttest_1samp(d, margin, alternative="greater")
        t, p = float(result.statistic), float(result.pvalue)
    out.update(t=t, p=p)
    return out


def parse_against(spec):
    """-> (kind, value, description); kind is 'val_loss' or 'val_bpb'."""
    s = spec.strip()
    m = re.fullmatch(r"(val_loss|val_bpb)\s*=\s*(\S+)", s)
    if m:
        v = _float_arg(m.group(2), spec)
        return m.group(1), v, "%s=%s" % (m.group(1), m.group(2))
    try:
        v = float(s)
    except ValueError:
        v = None
    if v is not None and math.isfinite(v) and not os.path.exists(s):
        return "val_bpb", v, "%s (a bare number is read as val_bpb)" % s
    if os.path.isfile(s):
        try:
            with open(s, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError("--against %s: cannot read JSON (%s)" % (s, e))
        if not isinstance(obj, dict):
            raise UsageError("--against %s: not a JSON object" % s)
        name = obj.get("name") or os.path.basename(s)
        for kind in ("val_loss", "val_bpb"):
            if isinstance(obj.get(kind), (int, float)) and not isinstance(obj.get(kind), bool):
                return kind, float(obj[kind]), "%s (%s, %s=%s)" % (s, name, kind, obj[kind])
        raise UsageError("--against %s: no numeric val_loss or val_bpb field" % s)
    raise UsageError("--against %r: expected val_loss=X, val_bpb=X, a number or a submission.json"
                     % spec)


def _float_arg(text, spec):
    try:
        v = float(text)
    except ValueError:
        raise UsageError("--against %r: %r is not a number" % (spec, text))
    if not math.isfinite(v):
        raise UsageError("--against %r: not a finite number" % spec)
    return v


def compute_stats(runs, against):
    counted = [r for r in runs if r.complete]
    for r in counted:
        r.counted = True
    losses = [r.val_loss for r in counted]
    bpbs = [r.val_bpb for r in counted]
    st = {"n": len(counted), "seeds": [r.seed for r in counted],
          "excluded": [(r.run_id, r.status) for r in runs if not r.complete]}
    st["val_loss_mean"], st["val_loss_std"] = mean_std(losses)
    st["val_bpb_mean"], st["val_bpb_std"] = mean_std(bpbs)
    ratios = [l / b for l, b in zip(losses, bpbs) if b]
    st["nats_per_bpb"] = mean_std(ratios)[0] if ratios else None
    st["test"] = None
    if against is not None:
        kind, value, desc = against
        ref = {"source": desc, "given": kind, "value": value}
        if kind == "val_loss":
            ref_loss = value
        elif st["nats_per_bpb"] is None:
            ref_loss = None
            ref["problem"] = "no complete run to convert val_bpb to nats"
        else:
            ref_loss = value * st["nats_per_bpb"]
            ref["conversion"] = ("val_loss = val_bpb x %.8f nats/bpb (mean val_loss/val_bpb of the "
                                 "counted runs; exact only when the reference used the same "
                                 "tokenizer and val set)" % st["nats_per_bpb"])
        ref["val_loss"] = ref_loss
        if ref_loss is not None:
            d = [ref_loss - l for l in losses]
            ref.update(one_sided_ttest(d, MARGIN_NATS))
            ref["significant"] = ref["p"] is not None and ref["p"] < ALPHA
        st["test"] = ref
    return st
