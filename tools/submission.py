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
import copy
import datetime as _dt
import glob
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the submit/ package beside this file
try:
    from submit import UsageError
    from submit.checks import (CHECK_TITLES, CHECKS, TIMED_TRACK, TRACKS, check_runs, dataset_label,
                               hardware_label, on_8xh100, run_passes)
    from submit.logfile import parse_log
    from submit.plots import import_pyplot, plot_runs
    from submit.record_folder import (RECORD_NAME, record_folder, record_readme, refuse_taken_folder,
                                      script_defaults, write_record_folder)
    from submit.report import build_submission, compliance_table, results_table, stats_block, utc_now
    from submit.stats import ALPHA, MIN_SEEDS, compute_stats, parse_against
except ModuleNotFoundError as e:  # scipy: a dependency of the tools, never of train_gpt.py
    print("error: %s is not installed: pip install -r requirements-dev.txt" % (e.name or "").split(".")[0],
          file=sys.stderr)
    sys.exit(2)


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
        date = utc_now()
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
    refuse_taken_folder(target, args.overwrite)
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


def _not_a_record(all_pass, st, on_8xh100, track):
    """What keeps the runs from being a record (empty: a record)."""
    why = []
    if not all_pass:
        why.append("a run fails")
    if st["n"] < MIN_SEEDS:
        why.append("fewer than %d seeds" % MIN_SEEDS)
    if st["test"] is None:
        why.append("no --against")
    elif not st["test"].get("significant"):
        why.append("p >= %g or untested" % ALPHA)
    if not on_8xh100:
        why.append("not run on 8x H100")
    if track != TIMED_TRACK:
        why.append("track %s" % track)
    return why


def _write_json(runs, st, args, code, existing, all_pass, say):
    """--write: submission.json, unless a run fails (without --force) or none is complete."""
    if not all_pass and not args.force:
        say("submission.json NOT written to %s: some run fails a check (--force writes it "
            "anyway, marked compliant: false)" % args.write)
        return
    if st["n"] == 0:
        say("submission.json NOT written: no complete run")
        return
    sub = build_submission(runs, st, args, code, existing)
    with open(args.write, "w", encoding="utf-8") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")
    say("submission.json written: %s" % args.write)
    empty = [k for k in ("author", "github_id", "name", "blurb") if not sub.get(k)]
    if empty:
        say("note: fill in %s (flags --%s)" % (", ".join(empty), ", --".join(e.replace("_", "-") for e in empty)))


def _record_folder(runs, st, args, code, existing, target, date_source, all_pass, hw, not_record, say):
    """Write the record folder (passing runs only) and say what was written."""
    if not all_pass:
        say("record folder NOT written to %s: some run fails a check (--force does not apply: a record "
            "folder holds passing runs only)" % target)
        return
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
    if args.track == TIMED_TRACK and not_record:
        say("note: not a record (%s); %s is for record claims, --track %s otherwise"
            % (", ".join(not_record), TIMED_TRACK, TRACKS[1]))
    if not sub.get("blurb"):
        say("note: README.md's \"What changed\" holds a line for you to replace (or pass --blurb)")


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
        plt = import_pyplot()
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
    if not on_8xh100(hw) and args.track == TIMED_TRACK:
        say("note: hardware is %s, not 8x H100; the 600 s limits only count on 8x H100" % hw)
    say()
    say(results_table(runs))
    say()
    say(stats_block(st))
    say("dataset: %s" % (args.dataset or dataset_label(runs)))
    say("hardware: %s" % (args.hardware or hw))

    not_record = _not_a_record(all_pass, st, on_8xh100(hw), args.track)
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
        _write_json(runs, st, args, code, existing, all_pass, say)
    if target is not None:
        _record_folder(runs, st, args, code, existing, target, date_source, all_pass, hw, not_record, say)
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
