"""The challenge's rules applied to parsed runs: sizes, scores, times, code, config and seeds; where they ran."""

import hashlib
import json
import math
import os
import re
from collections import Counter

from .logfile import BYTES_KEYS, int_or_none, num

LIMIT_BYTES = 16_000_000
LIMIT_TRAIN_S = 600.0
LIMIT_EVAL_S = 600.0
# The tracks of the challenge's records/ folder. Only the first has the 600 s limits; both have the 16 MB one.
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
TIMED_TRACK = TRACKS[0]

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
# Scores are printed with 8 decimals, so each is off by at most 5e-9 from the value
# computed: about 1e-8 relative for a bpb near 0.5, and less for larger ones. The
# exact-line bpb check allows 1e-6 relative, a hundred times that, so an honest log never
# fails it; a bpb moved in its sixth significant digit or more always does.
BPB_REL_TOL = 1e-6
# targets_per_byte is printed with 10 decimals: it may differ from targets/bytes by
# half a unit of the last decimal, plus float noise.
RATIO_ABS_TOL = 1e-10


def check_runs(runs, code: bytes, time_limits=True):
    """Fill each run's `checks`: name -> (True / False / None for "cannot tell", detail)."""
    ref = _reference_config(runs)
    seeds = Counter(r.seed for r in runs if r.seed is not None)
    for r in runs:
        ch = r.checks
        ch["complete"] = (r.complete, r.status if r.complete else "%s: %s" % (r.status, r.problem))
        ch["bytes"] = _check_bytes(r, code)
        if r.complete:
            why = _score_disagreements(r)
            ch["scores"] = (not why, "; ".join(why) or "consistent")
        else:
            ch["scores"] = (None, "run incomplete")
        for key, ms, limit in (("train", r.train_time_ms, LIMIT_TRAIN_S),
                               ("eval", r.eval_time_ms, LIMIT_EVAL_S)):
            ch[key] = _check_time(key, ms, limit, time_limits)
        ch["code"] = _check_code(r, code)
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


def _reference_config(runs):
    """The config the others are compared with: the earliest of the most common ones (None without any)."""
    configs = [r.config() for r in runs if r.hparams]
    counts = Counter(tuple(sorted(c.items())) for c in configs)
    if not counts:
        return None
    best = max(counts.values())
    return next(c for c in configs if counts[tuple(sorted(c.items()))] == best)


def _check_bytes(r, code):
    bt, bm, bc = (r.bytes_field(k) for k in ("bytes_total", "bytes_model", "bytes_code"))
    if bt is None:
        return None, "no bytes_total in log"
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
    return not why, "; ".join(why) or "%d bytes" % bt


def _check_time(key, ms, limit, time_limits):
    if ms is None:
        return None, "no %s time in log" % key
    if not time_limits:
        return True, "%.1f s (no limit on %s)" % (ms / 1000.0, TRACKS[1])
    ok = ms / 1000.0 <= limit
    return ok, "%.1f s" % (ms / 1000.0) if ok else "%s time %.3f s > %.0f s" % (key, ms / 1000.0, limit)


def _check_code(r, code):
    if r.code is None:
        return None, "no source block in log"
    if r.code_sha_declared and r.code_sha_declared.lower() != r.code_sha:
        return False, "source block does not match its own sha256 (log corrupt)"
    code_sha = hashlib.sha256(code).hexdigest()
    if r.code != code:
        return False, ("logged source (%d bytes, sha256 %s) differs from --code (%d bytes, sha256 %s)%s"
                       % (len(r.code), r.code_sha[:12], len(code), code_sha[:12], _first_diff(r.code, code)))
    return True, "sha256 " + code_sha[:12]


def _bytes_disagreements(r):
    """final_submission's sizes against the artifact and compliance lines of the same run."""
    why = []
    for event, section, keys in (("artifact", r.artifact, BYTES_KEYS),
                                 ("compliance", r.compliance, ("bytes_total",))):
        if section is None:
            why.append("no %s line to cross-check final_submission's bytes with" % event)
            continue
        for key in keys:
            mine, theirs = int_or_none(r.final.get(key)), int_or_none(section.get(key))
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
            if num(fields.get(key)) != num(r.final.get(key)):
                why.append("final_submission %s %s != %s of %s"
                           % (key, r.final.get(key), fields.get(key), event))
    vd = r.val_data
    if vd is None:
        why.append("no val_data line: scores cannot be cross-checked")
        return why
    tokens, targets, nbytes = (int_or_none(vd.get(k)) for k in ("tokens", "targets", "bytes"))
    ratio = num(vd.get("targets_per_byte"))
    if None in (tokens, targets, nbytes, ratio) or nbytes <= 0 or not math.isfinite(ratio):
        why.append("val_data line needs tokens, targets, bytes > 0 and targets_per_byte numbers")
        return why
    if targets != tokens - 1:
        why.append("val_data targets %d != tokens %d - 1" % (targets, tokens))
    if abs(ratio - targets / nbytes) > RATIO_ABS_TOL:
        why.append("val_data targets_per_byte %s != targets/bytes %.10f" % (vd["targets_per_byte"],
                                                                              targets / nbytes))
    logged_tokens = int_or_none((r.compliance or {}).get("val_tokens"))
    if logged_tokens is not None and logged_tokens != tokens:
        why.append("compliance val_tokens %d != val_data tokens %d" % (logged_tokens, tokens))
    for event, fields in r.exact_lines:
        loss, bpb = num(fields.get("val_loss")), num(fields.get("val_bpb"))
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


def on_8xh100(hardware):
    """Whether a hardware_label is the challenge's machine, the only one its 600 s limits are set on."""
    return bool(re.fullmatch(r"8x .*H100.*", hardware))


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
