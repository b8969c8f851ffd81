#!/usr/bin/env python3
"""Assemble a Parameter Golf submission from the logs that train_gpt.py writes.

    python tools/submission.py LOG... [--code train_gpt.py]
        [--against VALUE|submission.json] [--write submission.json]
        [--plot out.png]
        [--record-dir RECORDS --name NAME [--track TRACK] [--overwrite]]

Parses every log, prints a PASS/FAIL compliance table and a results table,
then the statistics across seeds (mean, std and, with --against, a one-sided
t-test of the improvement in nats against the 0.005-nat margin), optionally
writes submission.json, a PNG of the training curves and the folder a record
pull request adds (records/<track>/<date>_<name>/: README.md, submission.json,
train_gpt.py, one train_seed<N>.log per seed).

Exit status: 0 every run is complete and passes every check; 1 some run fails
a check or is incomplete (or, with --require-record, the set is not a record);
2 usage error (one line starting with "error:").

Needs scipy (the t-test) and, for --plot, matplotlib: pip install -r requirements-dev.txt.
See tools/README.md.
"""

from __future__ import annotations

import argparse
import ast
import base64
import copy
import datetime as _dt
import glob
import hashlib
import json
import lzma
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections import Counter

try:
    from scipy.stats import ttest_1samp
except ModuleNotFoundError:  # a dependency of the tools, never of train_gpt.py
    sys.exit("error: scipy is not installed: pip install -r requirements-dev.txt")

LIMIT_BYTES = 16_000_000
LIMIT_TRAIN_S = 600.0
LIMIT_EVAL_S = 600.0
MARGIN_NATS = 0.005
ALPHA = 0.01
MIN_SEEDS = 3
# The tracks of the challenge's records/ folder. Only the first has the 600 s limits; both have the 16 MB one.
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
TIMED_TRACK = TRACKS[0]
# --name with --record-dir names a folder: letters, digits, "-" and "_", not starting with "-".
RECORD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")

# Hyperparameters that may differ between the seeds of one submission: the
# seed, the run's name and the folder the artifact is written to. Everything
# else, DATA_PATH and TOKENIZER_PATH included, must be equal: those decide
# what the model was trained and scored on.
VARYING_HPARAMS = ("SEED", "RUN_ID", "ARTIFACT_DIR")
# Parts of the `env` line that are part of the configuration.
ENV_CONFIG_KEYS = ("world_size", "device_name")

CHECKS = ("complete", "bytes", "scores", "train", "eval", "code", "config", "seed")
CHECK_TITLES = {
    "complete": "status",
    "bytes": "bytes<=16e6",
    "scores": "scores",
    "train": "train<=600s",
    "eval": "eval<=600s",
    "code": "code==--code",
    "config": "config",
    "seed": "seed",
}
FINAL_KEYS = ("val_loss", "val_bpb", "bytes_total", "bytes_model", "bytes_code",
              "train_time_ms", "eval_time_ms")
BYTES_KEYS = ("bytes_model", "bytes_code", "bytes_total")
# Scores are printed with 8 decimals, so each is off by at most 5e-9 from the value
# computed: about 1e-8 relative for a bpb near 0.5, and less for larger ones. The
# exact-line bpb check allows 1e-6 relative, a hundred times that, so an honest log never
# fails it; a bpb moved in its sixth significant digit or more always does.
BPB_REL_TOL = 1e-6
# targets_per_byte is printed with 10 decimals: it may differ from targets/bytes by
# half a unit of the last decimal, plus float noise.
RATIO_ABS_TOL = 1e-10


class UsageError(Exception):
    """Bad command line or unreadable input: exit 2 with one line."""


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Log parsing
# --------------------------------------------------------------------------

_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _num(value):
    """'1234ms' -> 1234.0, '3.5' -> 3.5, 'nan' -> nan; None when no number."""
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("nan", "+nan", "-nan"):
        return float("nan")
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    if low in ("-inf", "-infinity"):
        return -math.inf
    m = _NUM.match(low)
    return float(m.group(0)) if m else None


def _int(value):
    x = _num(value)
    return int(x) if x is not None and math.isfinite(x) else None


def _kv(tokens):
    out = {}
    for tok in tokens:
        key, sep, val = tok.partition(":")
        if sep and key:
            out[key] = val
    return out


class Run:
    """Everything one log says about one run."""

    def __init__(self, path):
        self.path = path
        self.status = "truncated"   # complete | truncated | crashed | malformed
        self.problem = ""           # why it is not complete
        self.notes = []
        self.code = None            # bytes of the source block
        self.code_bytes_declared = None
        self.code_sha_declared = None
        self.env = {}
        self.hparams = {}
        self.model = {}
        self.train_points = []      # (step, train_loss, train_time_ms)
        self.val_points = []        # (step, val_loss, val_bpb, train_time_ms)
        self.total_steps = None
        self.last_step = None
        self.step_avg_ms = None
        self.stopping_early = None
        self.train_done = None
        self.pre_export = None
        self.artifact = None
        self.roundtrip = None
        self.sliding = None
        self.ttt = None
        self.compliance = None
        self.val_data = None
        self.exact_lines = []       # (event, fields) of every *_exact line, in order
        self.final_exact = None     # (event, fields) of the last final_*_exact line before final_submission
        self.final = None
        self.error = None
        self.checks = {}            # name -> (True/False/None, detail)
        self.counted = False

    # -- derived values ---------------------------------------------------
    @property
    def run_id(self):
        rid = self.hparams.get("RUN_ID")
        return rid if rid else os.path.splitext(os.path.basename(self.path))[0]

    @property
    def seed(self):
        return _int(self.hparams.get("SEED"))

    @property
    def code_sha(self):
        return hashlib.sha256(self.code).hexdigest() if self.code is not None else None

    @property
    def steps(self):
        if self.train_done and "step" in self.train_done:
            return _int(self.train_done["step"].split("/")[0])
        return self.last_step

    def _get(self, section, key, conv=_num):
        sec = getattr(self, section)
        return conv(sec.get(key)) if sec and key in sec else None

    @property
    def train_time_ms(self):
        v = self._get("final", "train_time_ms")
        if v is None:
            v = self._get("train_done", "train_time")
        return v

    @property
    def eval_time_ms(self):
        v = self._get("final", "eval_time_ms")
        if v is None:
            parts = [self._get(s, "eval_time_ms") for s in ("roundtrip", "sliding", "ttt")]
            parts = [p for p in parts if p is not None]
            v = max(parts) if parts else None  # each line's eval_time_ms counts from the start of the final eval
        return v

    def bytes_field(self, key):
        v = self._get("final", key, _int)
        if v is None:
            v = self._get("artifact", key, _int)
        return v

    @property
    def val_loss(self):
        return self._get("final", "val_loss")

    @property
    def val_bpb(self):
        return self._get("final", "val_bpb")

    @property
    def complete(self):
        return self.status == "complete"

    def config(self):
        cfg = {k: v for k, v in self.hparams.items() if k not in VARYING_HPARAMS}
        for k in ENV_CONFIG_KEYS:
            if k in self.env:
                cfg["env." + k] = self.env[k]
        return cfg



# One-shot log events and the Run attribute that keeps their key:value fields.
EVENT_FIELDS = {"stopping_early": "stopping_early", "train_done": "train_done", "pre_export_exact": "pre_export",
                "artifact": "artifact", "final_roundtrip_exact": "roundtrip", "final_sliding_exact": "sliding",
                "final_ttt_exact": "ttt", "compliance": "compliance", "final_submission": "final",
                "val_data": "val_data"}


def _is_final_exact(event):
    # Matched by pattern: each new evaluation train_gpt.py adds gets a name of this form.
    return event.startswith("final_") and event.endswith("_exact")

def parse_log(path) -> Run:
    run = Run(path)
    with open(path, "rb") as f:
        data = f.read()
    nl = data.find(b"\n")
    header = (data if nl < 0 else data[:nl]).decode("utf-8", "replace")
    htoks = header.split()
    if not htoks or htoks[0] != "code_begin":
        if not data:
            run.problem = "empty log"
        else:
            run.status = "malformed"
            run.problem = "does not start with 'code_begin' (not a train_gpt.py log?)"
        return run
    hdr = _kv(htoks[1:])
    n = _int(hdr.get("bytes"))
    run.code_bytes_declared = n
    run.code_sha_declared = hdr.get("sha256")
    if nl < 0:
        run.problem = "log ends inside the code_begin line"
        return run
    if n is None or n < 0:
        run.status = "malformed"
        run.problem = "code_begin line has no valid bytes:N"
        return run
    start = nl + 1
    if len(data) < start + n:
        run.problem = "log ends inside the source block (%d of %d bytes)" % (len(data) - start, n)
        return run
    run.code = data[start:start + n]
    rest = data[start + n:]
    if rest.startswith(b"code_end"):
        rest = rest[len(b"code_end"):]
    elif rest.startswith(b"\ncode_end"):
        rest = rest[len(b"\ncode_end"):]
    elif rest.strip() == b"":
        run.problem = "log ends after the source block, before code_end"
        return run
    else:
        run.status = "malformed"
        run.problem = "source block not followed by code_end (byte count wrong?)"
        return run

    text = rest.decode("utf-8", "replace")
    last_event = "code_end"
    after_final = 0
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        if run.final is not None:
            after_final += 1
        if line.startswith("error:"):
            run.error = line[len("error:"):].strip() or "(no message)"
            last_event = "error"
            continue
        toks = line.split()
        if toks[0] == "code_begin":
            run.status = "malformed"
            run.problem = "a second code_begin: more than one run in this log (RUN_ID reused?)"
            return run
        if ":" in toks[0]:
            event, fields = None, _kv(toks)
        else:
            event, fields = toks[0], _kv(toks[1:])
        if event is None and "step" in fields:
            s, _, tot = fields["step"].partition("/")
            step = _int(s)
            if tot:
                run.total_steps = _int(tot)
            if step is None:
                continue
            run.last_step = step
            ms = _num(fields.get("train_time"))
            if "step_avg" in fields:
                run.step_avg_ms = _num(fields["step_avg"])
            if "train_loss" in fields:
                run.train_points.append((step, _num(fields["train_loss"]), ms))
            if "val_loss" in fields or "val_bpb" in fields:
                run.val_points.append((step, _num(fields.get("val_loss")),
                                       _num(fields.get("val_bpb")), ms))
            last_event = "step:%s" % fields["step"]
            continue
        if event is None:
            continue
        last_event = event
        if event == "env":
            run.env.update(fields)
        elif event == "hparam":
            run.hparams.update(fields)
        elif event == "model":
            run.model.update(fields)
        if event.endswith("_exact"):
            run.exact_lines.append((event, fields))
        if event in EVENT_FIELDS:
            setattr(run, EVENT_FIELDS[event], fields)
            if event == "final_submission":
                after_final = 0
                run.final_exact = next(((e, f) for e, f in reversed(run.exact_lines) if _is_final_exact(e)), None)

    if run.error is not None:
        run.status = "crashed"
        run.problem = "error: " + run.error
    elif run.final is None:
        where = last_event if last_event.startswith("step:") else "'%s'" % last_event
        if run.last_step is not None and not last_event.startswith("step:"):
            where += " (last step %d)" % run.last_step
        run.problem = "no final_submission line; log ends after %s" % where
    else:
        missing = [k for k in FINAL_KEYS if k not in run.final]
        if missing:
            run.status = "malformed"
            run.problem = "final_submission lacks " + ", ".join(missing)
        else:
            run.status = "complete"
            if after_final:
                run.notes.append("%d line(s) after final_submission" % after_final)
            if not all(math.isfinite(x) for x in (run.val_loss, run.val_bpb)):
                run.status = "crashed"
                run.problem = "score is not finite (val_loss %s)" % run.final["val_loss"]
    if run.status == "crashed" and run.final is not None and run.error is not None:
        run.notes.append("has final_submission but also an error line")
    return run


# --------------------------------------------------------------------------
# Compliance
# --------------------------------------------------------------------------

def check_runs(runs, code: bytes, time_limits=True):
    configs = [r.config() for r in runs if r.hparams]
    counts = Counter(tuple(sorted(c.items())) for c in configs)
    ref = None
    if counts:
        best = max(counts.values())
        for c in configs:   # earliest of the most common configs
            if counts[tuple(sorted(c.items()))] == best:
                ref = c
                break
    seeds = Counter(r.seed for r in runs if r.seed is not None)
    code_sha = hashlib.sha256(code).hexdigest()

    for r in runs:
        ch = r.checks
        ch["complete"] = (r.complete, r.status if r.complete else "%s: %s" % (r.status, r.problem))

        bt, bm, bc = (r.bytes_field(k) for k in ("bytes_total", "bytes_model", "bytes_code"))
        if bt is None:
            ch["bytes"] = (None, "no bytes_total in log")
        else:
            why = []
            if bt > LIMIT_BYTES:
                why.append("bytes_total %d > %d" % (bt, LIMIT_BYTES))
            if bm is not None and bc is not None and bm + bc != bt:
                why.append("bytes_total %d != bytes_model %d + bytes_code %d" % (bt, bm, bc))
            if bc is not None and bc != len(code):
                why.append("bytes_code %d != size of --code %d" % (bc, len(code)))
            if bm is not None and bm + len(code) > LIMIT_BYTES and bt <= LIMIT_BYTES:
                why.append("bytes_model %d + code %d > %d" % (bm, len(code), LIMIT_BYTES))
            if r.final is not None:
                why += _bytes_disagreements(r)
            ch["bytes"] = (not why, "; ".join(why) or "%d bytes" % bt)

        if r.complete:
            why = _score_disagreements(r)
            ch["scores"] = (not why, "; ".join(why) or "consistent")
        else:
            ch["scores"] = (None, "run incomplete")

        for key, ms, limit in (("train", r.train_time_ms, LIMIT_TRAIN_S),
                               ("eval", r.eval_time_ms, LIMIT_EVAL_S)):
            if ms is None:
                ch[key] = (None, "no %s time in log" % key)
            elif not time_limits:
                ch[key] = (True, "%.1f s (no limit on %s)" % (ms / 1000.0, TRACKS[1]))
            else:
                ok = ms / 1000.0 <= limit
                ch[key] = (ok, "%.1f s" % (ms / 1000.0) if ok else
                           "%s time %.3f s > %.0f s" % (key, ms / 1000.0, limit))

        if r.code is None:
            ch["code"] = (None, "no source block in log")
        elif r.code_sha_declared and r.code_sha_declared.lower() != r.code_sha:
            ch["code"] = (False, "source block does not match its own sha256 (log corrupt)")
        elif r.code != code:
            ch["code"] = (False, "logged source (%d bytes, sha256 %s) differs from --code (%d bytes, sha256 %s)%s"
                          % (len(r.code), r.code_sha[:12], len(code), code_sha[:12],
                             _first_diff(r.code, code)))
        else:
            ch["code"] = (True, "sha256 " + code_sha[:12])

        if not r.hparams:
            ch["config"] = (None, "no hparam lines")
        else:
            diff = _config_diff(r.config(), ref)
            shown = ", ".join(diff[:6]) + (", and %d more" % (len(diff) - 6) if len(diff) > 6 else "")
            ch["config"] = (not diff, ("differs: " + shown) if diff else "same")

        if r.seed is None:
            ch["seed"] = (None, "no SEED hparam")
        elif seeds[r.seed] > 1:
            ch["seed"] = (False, "seed %d used by %d logs" % (r.seed, seeds[r.seed]))
        else:
            ch["seed"] = (True, str(r.seed))


def _bytes_disagreements(r):
    """final_submission's sizes against the artifact and compliance lines of the same run."""
    why = []
    for event, section, keys in (("artifact", r.artifact, BYTES_KEYS),
                                 ("compliance", r.compliance, ("bytes_total",))):
        if section is None:
            why.append("no %s line to cross-check final_submission's bytes with" % event)
            continue
        for key in keys:
            mine, theirs = _int(r.final.get(key)), _int(section.get(key))
            if mine != theirs:
                why.append("final_submission %s %s != %s %s" % (key, mine, event, theirs))
    return why


def _score_disagreements(r):
    """Every score of a complete run against the others and against the val split's size.

    final_submission must repeat the last final_*_exact line before it, and every *_exact
    line's val_bpb must be its val_loss in bits per byte: val_loss x targets/bytes / ln 2,
    with the targets and bytes that the val_data line reports for the val split.
    """
    why = []
    if r.final_exact is None:
        why.append("no final_*_exact line before final_submission")
    else:
        event, fields = r.final_exact
        for key in ("val_loss", "val_bpb"):
            if _num(fields.get(key)) != _num(r.final.get(key)):
                why.append("final_submission %s %s != %s of %s"
                           % (key, r.final.get(key), fields.get(key), event))
    vd = r.val_data
    if vd is None:
        why.append("no val_data line: scores cannot be cross-checked")
        return why
    tokens, targets, nbytes = (_int(vd.get(k)) for k in ("tokens", "targets", "bytes"))
    ratio = _num(vd.get("targets_per_byte"))
    if None in (tokens, targets, nbytes, ratio) or nbytes <= 0 or not math.isfinite(ratio):
        why.append("val_data line needs tokens, targets, bytes > 0 and targets_per_byte numbers")
        return why
    if targets != tokens - 1:
        why.append("val_data targets %d != tokens %d - 1" % (targets, tokens))
    if abs(ratio - targets / nbytes) > RATIO_ABS_TOL:
        why.append("val_data targets_per_byte %s != targets/bytes %.10f" % (vd["targets_per_byte"],
                                                                              targets / nbytes))
    logged_tokens = _int((r.compliance or {}).get("val_tokens"))
    if logged_tokens is not None and logged_tokens != tokens:
        why.append("compliance val_tokens %d != val_data tokens %d" % (logged_tokens, tokens))
    for event, fields in r.exact_lines:
        loss, bpb = _num(fields.get("val_loss")), _num(fields.get("val_bpb"))
        if loss is None or bpb is None:
            continue
        expected = loss * ratio / math.log(2)
        if not math.isclose(bpb, expected, rel_tol=BPB_REL_TOL):
            why.append("%s val_bpb %s != val_loss %s x targets_per_byte %s / ln 2 = %.8f"
                       % (event, fields["val_bpb"], fields["val_loss"], vd["targets_per_byte"], expected))
    return why


def _first_diff(a: bytes, b: bytes):
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    line = a[:i].count(b"\n") + 1
    return "; first difference at line %d" % line


def _config_diff(cfg, ref):
    if ref is None:
        return []
    out = []
    for k in sorted(set(cfg) | set(ref)):
        a, b = cfg.get(k), ref.get(k)
        if a != b:
            out.append("%s=%s (others %s)" % (k, a if a is not None else "<unset>",
                                                b if b is not None else "<unset>"))
    return out


def run_passes(r):
    return all(r.checks.get(c, (None,))[0] is True for c in CHECKS)


# --------------------------------------------------------------------------
# Reference record (--against)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Labels: dataset and hardware
# --------------------------------------------------------------------------

_FINEWEB = re.compile(r"fineweb", re.IGNORECASE)


def _manifest_source(data_path):
    """The `source` recorded by data/prepare.py in DATA_PATH/manifest.json, when that folder is here."""
    try:
        with open(os.path.join(data_path, "manifest.json"), encoding="utf-8") as f:
            src = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(src, list):
        src = ", ".join(str(x) for x in src)
    return str(src) if src else None


def dataset_label(runs):
    """What the runs were trained and scored on, from DATA_PATH.

    With DATA_PATH/manifest.json readable, its source decides: only the published
    export (an hf:// source naming fineweb) is called FineWeb. Without it, only a
    folder whose name contains "fineweb" (fineweb10B_sp1024, ...) is.
    """
    paths = sorted({r.hparams.get("DATA_PATH", "") for r in runs if r.hparams})
    if not paths or paths == [""]:
        return "unknown (no DATA_PATH in the logs)"
    labels = []
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or p
        source = _manifest_source(p)
        if source is not None:
            if source.startswith("hf://") and _FINEWEB.search(source):
                labels.append("FineWeb (%s; %s)" % (base, source))
            else:
                labels.append("%s (not FineWeb: %s)" % (base, source))
        elif _FINEWEB.search(base):
            labels.append("FineWeb (%s)" % base)
        else:
            labels.append("%s (not FineWeb; DATA_PATH=%s)" % (base, p))
    return "; ".join(labels)


def hardware_label(runs):
    out = []
    for r in runs:
        if not r.env:
            continue
        name = r.env.get("device_name") or r.env.get("device") or "unknown device"
        name = name.replace("_", " ")
        label = "%sx %s" % (r.env.get("world_size", "?"), name)
        if label not in out:
            out.append(label)
    return "; ".join(out) if out else "unknown"


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _fmt(x, spec, none="-"):
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
            r.run_id, _fmt(r.seed, "d"), _fmt(steps, ""), _fmt(r.step_avg_ms, ".2f"),
            _fmt(r._get("pre_export", "val_bpb"), ".8f"),
            _fmt(r._get("roundtrip", "val_bpb"), ".8f"),
            _fmt(r._get("sliding", "val_bpb"), ".8f"),
            _fmt(r._get("ttt", "val_bpb"), ".8f"),
            _fmt(r.val_loss, ".8f"), _fmt(r.val_bpb, ".8f"),
            _fmt(r.bytes_field("bytes_model"), "d"), _fmt(r.bytes_field("bytes_code"), "d"),
        ])
    return _table(headers, rows)


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


def stats_block(st, margin=MARGIN_NATS):
    out = []
    seeds = " ".join(str(s) for s in st["seeds"])
    out.append("statistics over %d complete run(s) (seeds: %s)" % (st["n"], seeds or "none"))
    for rid, status in st["excluded"]:
        out.append("  not counted: %s (%s)" % (rid, status))
    out.append("  val_loss  mean %s  std %s" % (_fmt(st["val_loss_mean"], ".8f"),
                                                  _fmt(st["val_loss_std"], ".8f")))
    out.append("  val_bpb   mean %s  std %s" % (_fmt(st["val_bpb_mean"], ".8f"),
                                                  _fmt(st["val_bpb_std"], ".8f")))
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
               % (_fmt(t["mean"], ".8f"), _fmt(t["std"], ".8f"), t["n"]))
    if t["p"] is None:
        out.append("  one-sided t-test needs at least 2 runs")
        out.append("  p < %g: NO (not tested)" % ALPHA)
        return "\n".join(out)
    out.append("  one-sided t-test, H0: mean(d) <= %g nats: t = %s, df = %d, p = %.6g"
               % (margin, _fmt(t["t"], ".4f"), t["df"], t["p"]))
    out.append("  p < %g: %s" % (ALPHA, "YES (beats the reference by more than %g nats)" % margin
                                  if t["significant"] else "NO"))
    return "\n".join(out)


# --------------------------------------------------------------------------
# submission.json
# --------------------------------------------------------------------------

def build_submission(runs, st, args, code, existing):
    counted = [r for r in runs if r.counted]
    meta = {}
    for key, flag in (("author", args.author), ("github_id", args.github_id),
                      ("name", args.name), ("blurb", args.blurb), ("date", args.date)):
        meta[key] = flag if flag is not None else existing.get(key, "")
    if not meta["date"]:
        meta["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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
        "pre_export_val_loss": r._get("pre_export", "val_loss"),
        "pre_export_val_bpb": r._get("pre_export", "val_bpb"),
        "roundtrip_val_loss": r._get("roundtrip", "val_loss"),
        "roundtrip_val_bpb": r._get("roundtrip", "val_bpb"),
        "sliding_val_loss": r._get("sliding", "val_loss"),
        "sliding_val_bpb": r._get("sliding", "val_bpb"),
        "ttt_val_bpb": r._get("ttt", "val_bpb"),
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


# --------------------------------------------------------------------------
# Record folder (--record-dir)
# --------------------------------------------------------------------------

def script_defaults(code: bytes):
    """NAME -> default of every field of the Hyperparameters class in `code`, read without running it.

    A file packed by tools/pack_code.py is decoded first (its one base85 string literal, lzma-compressed).
    None when the code holds no such class: the README then lists every setting.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "b85decode" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            try:
                source = lzma.LZMADecompressor().decompress(base64.b85decode(node.args[0].value),
                                                            max_length=64 << 20)
                tree = ast.parse(source)
            except (ValueError, lzma.LZMAError, SyntaxError):
                return None
            break
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            out = {}
            for stmt in node.body:
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and stmt.value is not None):
                    try:
                        out[stmt.target.id.upper()] = ast.literal_eval(stmt.value)
                    except ValueError:
                        continue
            return out or None
    return None


def changed_settings(run, defaults):
    """[(NAME, logged value, default or None)] of the run's settings that differ from the script's defaults
    (all of them when the defaults are unknown), in log order; the per-seed ones left out."""
    out = []
    for key, value in run.hparams.items():
        if key in VARYING_HPARAMS:
            continue
        if defaults is None or key not in defaults:
            out.append((key, value, None))
        elif value != str(defaults[key]):   # train_gpt.py logs str() of each value
            out.append((key, value, defaults[key]))
    return out


def _env_value(value, default):
    if isinstance(default, bool):
        value = {"True": "1", "False": "0"}.get(value, value)
    return shlex.quote(value)


def _mean_pm(values):
    m, s = mean_std(values)
    return "%.8f ± %s" % (m, _fmt(s, ".8f"))


def _seconds(ms):
    return "%.3f" % (ms / 1000.0)


def record_readme(runs, st, sub, code, track, defaults, hardware, dataset):
    """README.md of the record folder: every number is read from the logs (or computed from them)."""
    name = sub["name"]
    seeds = [r.seed for r in runs]
    final_events = sorted({r.final_exact[0] for r in runs})
    out = ["# %s" % name, ""]
    out.append("**val_bpb %.8f** (mean of %d seed(s), std %s; val_loss %.8f nats) | largest artifact %s bytes | "
               "%s | `%s`" % (st["val_bpb_mean"], st["n"], _fmt(st["val_bpb_std"], ".8f"), st["val_loss_mean"],
                              "{:,}".format(sub["bytes_total"]), hardware, track))
    out.append("")
    if sub.get("author") or sub.get("github_id"):
        out += ["By %s%s, %s." % (sub.get("author") or "",
                                  " (@%s)" % sub["github_id"] if sub.get("github_id") else "", sub["date"][:10]), ""]

    out += ["## What changed", ""]
    if sub.get("blurb"):
        out += [sub["blurb"], ""]
    else:
        out += ["> **AUTHOR: replace this line** with what this submission changes and why. Everything else in "
                "this file is generated by `tools/submission.py` from the logs.", ""]
    changed = changed_settings(runs[0], defaults)
    if defaults is None:
        out += ["The submitted `train_gpt.py` has no `Hyperparameters` defaults to compare with, so every setting "
                "of the logs' `hparam` lines is listed (SEED, RUN_ID and ARTIFACT_DIR left out):", "",
                "| Setting | Value |", "| --- | --- |"]
        out += ["| `%s` | `%s` |" % (k, v) for k, v, _ in changed]
    elif changed:
        out += ["Settings that differ from the defaults of the submitted `train_gpt.py`, as the logs' `hparam` "
                "lines record them (SEED, RUN_ID and ARTIFACT_DIR left out):", "",
                "| Setting | This submission | Default |", "| --- | --- | --- |"]
        out += ["| `%s` | `%s` | %s |" % (k, v, "(none)" if d is None else "`%s`" % d) for k, v, d in changed]
    else:
        out += ["Every setting is the default of the submitted `train_gpt.py` (the logs' `hparam` lines)."]
    out.append("")

    out += ["## Results", ""]
    out.append("Hardware: %s. Dataset: %s. Final evaluation: %s." % (
        hardware, dataset, ", ".join("`%s`" % e for e in final_events)))
    out.append("")
    out.append("| Seed | Steps | Pre-quant val_bpb | Quantized val_bpb | Final val_bpb | Final val_loss | "
               "Model bytes | Total bytes | Train s | Eval s |")
    out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    cols = {"pre": [], "rt": [], "bpb": [], "loss": []}
    for r in runs:
        pre, rt = (r.pre_export or {}).get("val_bpb", "-"), (r.roundtrip or {}).get("val_bpb", "-")
        for key, text in (("pre", pre), ("rt", rt), ("bpb", r.final["val_bpb"]), ("loss", r.final["val_loss"])):
            if _num(text) is not None:
                cols[key].append(_num(text))
        out.append("| %s | %s | %s | %s | %s | %s | %d | %d | %s | %s |" % (
            r.seed, _fmt(r.steps, "d"), pre, rt, r.final["val_bpb"], r.final["val_loss"],
            r.bytes_field("bytes_model"), r.bytes_field("bytes_total"),
            _seconds(r.train_time_ms), _seconds(r.eval_time_ms)))
    out.append("| mean ± std | | %s | %s | %s | %s | max %d | max %d | max %s | max %s |" % (
        _mean_pm(cols["pre"]), _mean_pm(cols["rt"]), _mean_pm(cols["bpb"]), _mean_pm(cols["loss"]),
        max(r.bytes_field("bytes_model") for r in runs), max(r.bytes_field("bytes_total") for r in runs),
        _seconds(max(r.train_time_ms for r in runs)), _seconds(max(r.eval_time_ms for r in runs))))
    out.append("")
    out.append("Pre-quant: `pre_export_exact`, the trained (EMA) weights in memory, before export. Quantized: "
               "`final_roundtrip_exact`, the artifact reloaded from its compressed file and scored without "
               "sliding windows or test-time training. Final: `final_submission`, the submitted score (equal to "
               "the last `final_*_exact` line). Standard deviations use ddof=1. Bytes: `final_submission`'s "
               "bytes_model and bytes_total (model plus code). Seconds: its train_time_ms and eval_time_ms.")
    t = st["test"]
    if t is not None and t.get("val_loss") is not None and t.get("p") is not None:
        out += ["", "Against %s: mean improvement %.8f nats over %d seeds; one-sided t-test of H0 mean <= %g nats: "
                    "t = %s, df = %d, p = %.6g (%s at p < %g)." % (
                        t["source"], t["mean"], t["n"], MARGIN_NATS, _fmt(t["t"], ".4f"), t["df"], t["p"],
                        "significant" if t.get("significant") else "not significant", ALPHA)]
    out.append("")

    out += ["## Compliance", ""]
    big = max(runs, key=lambda r: r.bytes_field("bytes_total"))
    out.append("- **Artifact size**: at most %s bytes (seed %s: model %s + code %s) <= 16,000,000 on every seed "
               "(`artifact` and `final_submission` lines)." % (
                   "{:,}".format(big.bytes_field("bytes_total")), big.seed,
                   "{:,}".format(big.bytes_field("bytes_model")), "{:,}".format(big.bytes_field("bytes_code"))))
    for label, key, attr in (("Training", "train", "train_time_ms"), ("Evaluation", "eval", "eval_time_ms")):
        worst = max(getattr(r, attr) for r in runs) / 1000.0
        if track == TIMED_TRACK:
            out.append("- **%s time**: at most %.3f s <= 600 s on every seed (`final_submission` %s)."
                       % (label, worst, attr))
        else:
            out.append("- **%s time**: at most %.3f s (`final_submission` %s); %s has no time limit."
                       % (label, worst, attr, track))
    if not re.fullmatch(r"8x .*H100.*", hardware):
        out.append("- **Hardware**: %s. The 600 s limits are set on 8xH100; these times were measured on %s."
                   % (hardware, hardware))
    vd = runs[0].val_data
    shas = sorted({(r.compliance or {}).get("val_sha256") for r in runs} - {None})
    if not shas:
        fingerprint = ""
    elif len(shas) == 1 and all((r.compliance or {}).get("val_sha256") for r in runs):
        fingerprint = ", fingerprint `%s` on every seed" % shas[0]
    else:
        fingerprint = ", fingerprints NOT the same on every seed (%s)" % ", ".join("`%s`" % h for h in shas)
    out.append("- **Validation split scored in full**: the `val_data` line counts %s tokens (%s scored targets, %s "
               "bytes, targets_per_byte %s); every `*_exact` score's val_bpb is its val_loss x targets_per_byte / "
               "ln 2 over those targets, and the `compliance` line names the tokens scored (val_tokens %s%s)."
               % ("{:,}".format(_int(vd["tokens"])), "{:,}".format(_int(vd["targets"])),
                  "{:,}".format(_int(vd["bytes"])), vd["targets_per_byte"], "{:,}".format(_int(vd["tokens"])),
                  fingerprint))
    modes = sorted({(r.compliance or {}).get("eval_mode", "?") for r in runs})
    if any(r.ttt for r in runs):
        per_seed = "; ".join("seed %s: %s of %s documents adapted, phases %s" % (
            r.seed, (r.ttt or {}).get("docs_adapted", "?"), (r.ttt or {}).get("docs", "?"),
            (r.ttt or {}).get("phases", "?")) for r in runs)
        out.append("- **Score-first test-time training** (eval_mode %s): each chunk of a document is scored before "
                   "the adapters take a step on it, and a global phase trains only on documents already scored, so "
                   "no token is scored by weights that have seen it (`final_ttt_exact`: %s)."
                   % ("/".join(modes), per_seed))
    else:
        out.append("- **No test-time training**: eval_mode %s; the final score is %s."
                   % ("/".join(modes), ", ".join("`%s`" % e for e in final_events)))
    data_path = runs[0].hparams.get("DATA_PATH", "?")
    out.append("- **No validation tokens in training**: training reads only the `fineweb_train_*` shards of "
               "DATA_PATH (`%s`); the `fineweb_val_*` shards are read by evaluation only." % data_path)
    out.append("- **Code**: `train_gpt.py` here is the source every log embeds, byte for byte: %s bytes "
               "(= bytes_code), sha256 `%s`." % ("{:,}".format(len(code)), hashlib.sha256(code).hexdigest()))
    out.append("")

    out += ["## Command", ""]
    world = runs[0].env.get("world_size", "8")
    env = ["%s=%s" % (k, _env_value(v, d)) for k, v, d in changed]
    lines, cur = [], "SEED=$SEED"
    for item in env:
        if len(cur) + 1 + len(item) > 100:
            lines.append(cur)
            cur = item
        else:
            cur += " " + item
    lines.append(cur)
    out += ["```bash", "for SEED in %s; do" % " ".join(str(s) for s in seeds)]
    out += ["  %s \\" % line for line in lines]
    out += ["  torchrun --standalone --nproc_per_node=%s train_gpt.py" % world, "done", "```", ""]
    out.append("Each run writes `logs/<RUN_ID>.txt`; `train_seed<N>.log` here is that log of seed N.")
    out.append("")

    out += ["## Files", "", "- `train_gpt.py`: the submitted code (%s bytes)." % "{:,}".format(len(code)),
            "- `submission.json`: the results above, per seed and as means (`tools/submission.py`)."]
    out += ["- `train_seed%s.log`: the log of seed %s." % (r.seed, r.seed) for r in runs]
    out.append("")
    return "\n".join(out)


def record_folder(record_dir, track, date, name):
    return os.path.join(record_dir, track, "%s_%s" % (date, name))


def _folder_in_use(path):
    return os.path.lexists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


def write_record_folder(target, files, overwrite):
    """Write {file name: bytes or source path} into the folder `target`, all or nothing.

    The files go to a temporary folder beside it, which is then renamed to `target`: a failure leaves no
    half-written folder, and with `overwrite` the old folder is replaced only once the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        raise UsageError("cannot create the record folder in %s: %s" % (parent, e.strerror or e))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private; the folder is meant to be shared
        for fname, content in files.items():
            dst = os.path.join(tmp, fname)
            if isinstance(content, bytes):
                with open(dst, "wb") as f:
                    f.write(content)
            else:
                shutil.copyfile(content, dst)
        if _folder_in_use(target):
            if not overwrite:
                raise UsageError("record folder %s already exists and is not empty (--overwrite replaces it)"
                                 % target)
            old = tmp + ".old"
            os.rename(target, old)
        elif os.path.isdir(target):
            os.rmdir(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
    except OSError as e:
        raise UsageError("cannot write record folder %s: %s" % (target, e.strerror or e))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------

def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_runs(runs, out_path, plt):
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for r in runs:
        label = "%s%s" % (r.run_id, "" if r.complete else " (%s)" % r.status)
        tp = [(s, l, ms) for s, l, ms in r.train_points if l is not None and math.isfinite(l)]
        vp = [(s, b, ms) for s, _, b, ms in r.val_points if b is not None and math.isfinite(b)]
        line = None
        if tp:
            line, = axes[0][0].plot([p[0] for p in tp], [p[1] for p in tp], label=label)
            w = [p for p in tp if p[2] is not None]
            axes[0][1].plot([p[2] / 1000 for p in w], [p[1] for p in w],
                            color=line.get_color(), label=label)
        color = line.get_color() if line is not None else None
        if vp:
            l2, = axes[1][0].plot([p[0] for p in vp], [p[1] for p in vp], marker="o",
                                  ms=3, color=color, label=label)
            color = l2.get_color()
            w = [p for p in vp if p[2] is not None]
            axes[1][1].plot([p[2] / 1000 for p in w], [p[1] for p in w], marker="o", ms=3,
                            color=color, label=label)
        if r.complete and r.steps is not None:
            axes[1][0].plot([r.steps], [r.val_bpb], marker="*", ms=12, color=color,
                            linestyle="none")
            if r.train_time_ms is not None:
                axes[1][1].plot([r.train_time_ms / 1000], [r.val_bpb], marker="*", ms=12,
                                color=color, linestyle="none")
    titles = (("train loss vs step", "step", "train_loss"),
              ("train loss vs wall-clock", "train time (s)", "train_loss"),
              ("val_bpb vs step (star: final score)", "step", "val_bpb"),
              ("val_bpb vs wall-clock (star: final score)", "train time (s)", "val_bpb"))
    for ax, (title, xl, yl) in zip([a for row in axes for a in row], titles):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_argparser():
    p = _Parser(prog="tools/submission.py",
                description="Check Parameter Golf runs and assemble submission.json from their logs.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="logs/<RUN_ID>.txt written by train_gpt.py")
    p.add_argument("--code", default="train_gpt.py",
                   help="the train_gpt.py being submitted (default: ./train_gpt.py)")
    p.add_argument("--against", metavar="VALUE|JSON",
                   help="reference record: val_loss=X, val_bpb=X, a bare number (read as "
                        "val_bpb) or a submission.json")
    p.add_argument("--write", metavar="PATH", help="write submission.json here")
    p.add_argument("--plot", metavar="PNG", help="plot training curves into this PNG (matplotlib)")
    p.add_argument("--force", action="store_true",
                   help="write submission.json even when a run fails a check")
    p.add_argument("--require-record", action="store_true",
                   help="also exit 1 unless the runs are a record: all PASS, >= 3 seeds, "
                        "p < 0.01 against --against, on 8x H100")
    p.add_argument("--dataset", help="dataset label for submission.json (default: from DATA_PATH)")
    p.add_argument("--hardware", help="hardware label (default: world_size x device_name from the logs)")
    for flag in ("author", "github-id", "name", "blurb", "date"):
        p.add_argument("--" + flag, help="submission.json %s (default: kept from an existing "
                                         "--write file, else empty)" % flag.replace("-", "_"))
    p.add_argument("--record-dir", metavar="RECORDS",
                   help="write the folder a record PR adds, RECORDS/<track>/<YYYY-MM-DD>_<name>/: README.md, "
                        "submission.json, train_gpt.py (--code) and train_seed<N>.log per seed; needs --name")
    p.add_argument("--track", choices=TRACKS, default=TIMED_TRACK,
                   help="the track the runs are checked for and filed under (default %s; %s has no time "
                        "limits)" % TRACKS)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing, non-empty record folder")
    return p


def _plan_record_folder(args, existing):
    """(folder path, where its date came from) for --record-dir; refuses a bad --name, a date that is not
    YYYY-MM-DD..., and a folder that exists and is not empty (unless --overwrite)."""
    if not args.name:
        raise UsageError("--record-dir needs --name (letters, digits, - and _: the folder is <date>_<name>)")
    if not RECORD_NAME.fullmatch(args.name):
        raise UsageError("--name %r cannot name a record folder: use letters, digits, - and _ only (at most 100)"
                         % args.name)
    if args.date:
        date, source = args.date, "from --date"
    elif existing.get("date"):
        date, source = str(existing["date"]), "from the date of %s" % args.write
    else:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        source = "today (UTC): the logs carry no date"
    m = re.match(r"\d{4}-\d{2}-\d{2}", date)
    try:
        day = _dt.date.fromisoformat(m.group(0)) if m else None
    except ValueError:
        day = None
    if day is None:
        raise UsageError("date %r (%s) does not start with YYYY-MM-DD" % (date, source))
    args.date = date          # submission.json carries the same date as the folder's name
    target = record_folder(args.record_dir, args.track, day.isoformat(), args.name)
    if _folder_in_use(target) and not args.overwrite:
        raise UsageError("record folder %s already exists and is not empty (--overwrite replaces it)" % target)
    return target, source


def _expand_logs(items):
    out = []
    for item in items:
        if any(ch in item for ch in "*?[") and not os.path.exists(item):
            hits = sorted(glob.glob(item))
            if not hits:
                raise UsageError("no log matches %s" % item)
            out.extend(hits)
        else:
            out.append(item)
    seen = set()
    for path in out:
        if not os.path.isfile(path):
            raise UsageError("log not found: %s" % path)
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError("log given twice: %s" % path)
        seen.add(real)
    return out


def main(argv=None, stdout=None):
    stdout = stdout or sys.stdout
    args = build_argparser().parse_args(argv)
    logs = _expand_logs(args.logs)
    try:
        with open(args.code, "rb") as f:
            code = f.read()
    except OSError as e:
        raise UsageError("cannot read --code %s: %s" % (args.code, e.strerror or e))
    against = parse_against(args.against) if args.against else None
    plt = None
    if args.plot:
        plt = _import_pyplot()
        if plt is None:
            raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    existing = {}
    if args.write and os.path.isfile(args.write):
        try:
            with open(args.write, encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = {}
        if not isinstance(existing, dict):
            existing = {}
    target = date_source = None
    if args.record_dir is not None:
        target, date_source = _plan_record_folder(args, existing)

    runs = []
    for path in logs:
        try:
            runs.append(parse_log(path))
        except OSError as e:
            raise UsageError("cannot read %s: %s" % (path, e.strerror or e))
    check_runs(runs, code, time_limits=args.track == TIMED_TRACK)
    st = compute_stats(runs, against)
    all_pass = all(run_passes(r) for r in runs)

    def say(s=""):
        print(s, file=stdout)

    say("compliance (%d log(s); --code %s: %d bytes, sha256 %s)"
        % (len(runs), args.code, len(code), hashlib.sha256(code).hexdigest()[:12]))
    say(compliance_table(runs))
    # An incomplete run fails on its status; its missing sizes and times are
    # a consequence, not separate findings.
    failures = [(r, name, r.checks[name][1]) for r in runs for name in CHECKS
                if r.checks[name][0] is False
                or (r.checks[name][0] is None and (r.complete or name == "complete"))]
    for r, name, detail in failures:
        say("FAIL %s: %s: %s" % (r.run_id, CHECK_TITLES[name], detail))
    for r in runs:
        for note in r.notes:
            say("note %s: %s" % (r.run_id, note))
    hw = hardware_label(runs)
    on_8xh100 = bool(re.fullmatch(r"8x .*H100.*", hw))
    if not on_8xh100 and args.track == TIMED_TRACK:
        say("note: hardware is %s, not 8x H100; the 600 s limits only count on 8x H100" % hw)
    say()
    say(results_table(runs))
    say()
    say(stats_block(st))
    say("dataset: %s" % (args.dataset or dataset_label(runs)))
    say("hardware: %s" % (args.hardware or hw))

    not_record = []
    if not all_pass:
        not_record.append("a run fails")
    if st["n"] < MIN_SEEDS:
        not_record.append("fewer than %d seeds" % MIN_SEEDS)
    if st["test"] is None:
        not_record.append("no --against")
    elif not st["test"].get("significant"):
        not_record.append("p >= %g or untested" % ALPHA)
    if not on_8xh100:
        not_record.append("not run on 8x H100")
    if args.track != TIMED_TRACK:
        not_record.append("track %s" % args.track)
    record_ok = not not_record
    say("verdict: %s; %s" % (
        "all %d run(s) PASS" % len(runs) if all_pass else
        "%d of %d run(s) FAIL" % (sum(not run_passes(r) for r in runs), len(runs)),
        "record: YES (8x H100, >= %d seeds, p < %g)" % (MIN_SEEDS, ALPHA) if record_ok else
        "record: NO (%s)" % ", ".join(not_record)))

    if args.plot:
        plot_runs(runs, args.plot, plt)
        say("plot written: %s" % args.plot)
    if args.write:
        if not all_pass and not args.force:
            say("submission.json NOT written to %s: some run fails a check (--force writes it "
                "anyway, marked compliant: false)" % args.write)
        elif st["n"] == 0:
            say("submission.json NOT written: no complete run")
        else:
            sub = build_submission(runs, st, args, code, existing)
            with open(args.write, "w", encoding="utf-8") as f:
                json.dump(sub, f, indent=2)
                f.write("\n")
            say("submission.json written: %s" % args.write)
            empty = [k for k in ("author", "github_id", "name", "blurb") if not sub.get(k)]
            if empty:
                say("note: fill in %s (flags --%s)" % (", ".join(empty),
                                                       ", --".join(e.replace("_", "-") for e in empty)))
    if target is not None:
        if not all_pass:
            say("record folder NOT written to %s: some run fails a check (--force does not apply: a record "
                "folder holds passing runs only)" % target)
        else:
            sub = build_submission(runs, st, args, code, existing)
            folder_sub = copy.deepcopy(sub)
            for entry in folder_sub["seed_results"]:
                entry["log"] = "train_seed%s.log" % entry["seed"]
            readme = record_readme(runs, st, sub, code, args.track, script_defaults(code),
                                   args.hardware or hw, args.dataset or dataset_label(runs))
            files = {"README.md": readme.encode("utf-8"),
                     "submission.json": (json.dumps(folder_sub, indent=2) + "\n").encode("utf-8"),
                     "train_gpt.py": code}
            for r in runs:
                files["train_seed%s.log" % r.seed] = r.path
            write_record_folder(target, files, args.overwrite)
            say("record folder written: %s (%s)" % (target, ", ".join(sorted(files))))
            say("  date %s: %s" % (os.path.basename(target)[:10], date_source))
            if args.track == TIMED_TRACK and not record_ok:
                say("note: not a record (%s); %s is for record claims, --track %s otherwise"
                    % (", ".join(not_record), TIMED_TRACK, TRACKS[1]))
            if not sub.get("blurb"):
                say("note: README.md's \"What changed\" holds a line for you to replace (or pass --blurb)")
    if not all_pass:
        return 1
    if args.require_record and not record_ok:
        return 1
    return 0


def cli(argv=None):
    try:
        return main(argv)
    except UsageError as e:
        print("error: %s" % str(e).splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
