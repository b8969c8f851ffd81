#!/usr/bin/env python3
"""Does a CPU shape agree with full scale? Each published full-scale delta of one change (results/calibration.json,
with its source) beside the same change measured by mini-golf at each shape: a registry row against its base, the
same seeds (bench/minigolf.py), or, for a row that changes only the export or the scoring and has no such runs, its
settings as a variant of its base in bench/export_pairs.py (the same trained weights). Per shape: how many signs
agree, and the rank correlation of the deltas, read twice: on the final score, and with every change of training
measured on its model before export (each run's own log), since a CPU shape's export penalty need not be the
records' (at `regime` it is ten times theirs and moves by more than the training changes do).

    python3 bench/calibration.py              # prints the table; --write puts it in results/MINIGOLF.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_pairs as ep  # noqa: E402
import minigolf as mg  # noqa: E402

CALIBRATION = mg.REPO / "results" / "calibration.json"
# Full-scale seed spreads are ~0.0003-0.0017: a published delta below this says nothing about its sign.
FULL_SCALE_NOISE = 0.0005
BEGIN, END = "<!-- minigolf-calibration:begin -->", "<!-- minigolf-calibration:end -->"
STAGES = ("training", "export", "scoring")  # what an entry's change touches; only training has a before-export Δ


def load_entries(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise mg.HarnessError(f"{path}: {e}") from None
    for e in entries:
        missing = {"change", "full_scale", "source", "row"} - set(e)
        row = mg.ROWS.get(e.get("row"))
        if missing or row is None or (e.get("base") or row.base) not in mg.ROWS or stage(e) not in STAGES:
            raise mg.HarnessError(f"{path}: entry {e.get('change')!r} needs change, full_scale, source, a registry "
                                  f"row with a base and a stage among {STAGES} (missing {sorted(missing)}, row "
                                  f"{e.get('row')!r}, stage {stage(e)!r})")
    return entries


def stage(entry: dict) -> str:
    return entry.get("stage", "training")


def before_export(records: list[dict], read_log=mg.log_copy) -> list[dict]:
    """The scored runs again, each with its model's score before export (its log's pre_export_exact) as val_bpb;
    runs whose log copy is missing are left out."""
    out = []
    for r in mg.scored(records):
        text = read_log(r) if r.get("log") else None
        if text and (m := mg.paired_measures(text)):
            out.append({**r, "val_bpb": m["pre_export"]})
    return out


def measured(records: list[dict], row: str, base: str) -> tuple[float, float | None, int, str] | None:
    """The row's same-seed delta against `base` (mean, standard error, seeds, CPU kind), on the one kind of CPU that
    ran most of the pair's seeds; None if no seed ran both."""
    best = None
    for kind, runs in mg.by_cpu_kind(records).items():
        mine, ref = mg.scored(r for r in runs if r["row"] == row), mg.scored(r for r in runs if r["row"] == base)
        seeds = {r["seed"] for r in mine} & {r["seed"] for r in ref}
        d = mg.paired_delta(mine, ref) if seeds else None
        if d and (best is None or len(seeds) > best[2]):
            best = (d[0], d[1], len(seeds), kind)
    return best


def measured_on_same_weights(exports: list[dict], row: str, base: str) -> tuple[float, float | None, int] | None:
    """A row of export or scoring settings only, as a variant of `base` exported from the same training: its final
    score minus the base's own (mean, standard error, seeds); None if it never ran so."""
    settings = {k: str(v) for k, v in mg.ROWS[row].env.items()}
    if not settings or set(settings) - ep.EXPORT_SETTINGS - ep.EVAL_SETTINGS:
        return None
    own = {(r["seed"], r["date"]): r["final_bpb"] for r in exports if r["row"] == base and r["variant"] == "row"}
    deltas = [r["final_bpb"] - own[(r["seed"], r["date"])] for r in exports
              if r["row"] == base and r.get("settings") == settings and r.get("final_bpb") is not None
              and own.get((r["seed"], r["date"])) is not None]
    return (sum(deltas) / len(deltas), mg.standard_error(deltas), len(deltas)) if deltas else None


def agreement(pairs: list[tuple[float, float]]) -> str:
    """Signs that agree, and Spearman's rho of the deltas (their signed sizes), over the (full scale, shape) pairs
    whose full-scale delta is beyond FULL_SCALE_NOISE."""
    pairs = [(a, b) for a, b in pairs if abs(a) >= FULL_SCALE_NOISE]
    if not pairs:
        return "nothing measured"
    agree = sum((a < 0) == (b < 0) for a, b in pairs)
    if len(pairs) < 3:
        return f"signs agree {agree}/{len(pairs)} (too few to rank)"
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return f"signs agree {agree}/{len(pairs)}, Spearman rho {rho:+.2f}"


def agreements(reading: dict[str, dict[int, tuple[float, float]]]) -> str:
    """Each shape's agreement over everything it measured, and over the entries every shape measured."""
    common = set.intersection(*(set(p) for p in reading.values()))
    return "; ".join(f"**{name}** {agreement(list(p.values()))} (on the changes every shape measured: "
                     f"{agreement([p[i] for i in sorted(common)])})" for name, p in reading.items())


def kind_label(m: tuple | None, mixed: bool) -> str:
    """The CPU kind a pair was measured on, where its shape's runs span two kinds."""
    return f", {m[3]}" if m and mixed else ""


def cell(m: tuple | None, sign: int, how: str = "") -> str:
    if m is None:
        return "not run"
    return f"{sign * m[0]:+.4f}" + (f" ± {m[1]:.4f}" if m[1] is not None else "") + f" ({m[2]}{how})"


def table(entries: list[dict], shapes: dict[str, list[dict]], exports: dict[str, list[dict]],
          pre_export: dict[str, list[dict]]) -> str:
    """The entries beside each shape's final Δ and, for training changes, its Δ before export; then both readings'
    agreement per shape (the second takes an export or scoring change's final Δ: it has no other). A shape whose runs
    span two kinds of CPU names the kind of each pair (their precision differs: bf16 on one, fp32 on the other)."""
    mixed = {name: len(mg.by_cpu_kind(records)) > 1 for name, records in shapes.items()}
    head = " | ".join(f"{name} Δ (same seeds, n) | {name} Δ before export" for name in shapes)
    lines = [f"| change | full-scale Δ val_bpb | source | rows (from → to) | {head} |",
             "| --- | ---: | --- | --- |" + " ---: | ---: |" * len(shapes)]
    final: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in shapes}
    training: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in shapes}
    for i, e in enumerate(entries):
        cells = []
        base = e.get("base") or mg.ROWS[e["row"]].base
        sign = -1 if e.get("reverse") else 1  # a row measured the change the other way round
        trains = stage(e) == "training"
        for name, records in shapes.items():
            m = measured(records, e["row"], base)
            how = kind_label(m, mixed[name])
            if m is None:
                m, how = measured_on_same_weights(exports[name], e["row"], base), ", same weights"
            pre = measured(pre_export[name], e["row"], base) if trains else m
            cells += [cell(m, sign, how), cell(pre, sign, kind_label(pre, mixed[name])) if trains else f"({stage(e)})"]
            for reading, got in ((final, m), (training, pre)):
                if got is not None:
                    reading[name][i] = (e["full_scale"], sign * got[0])
        note = f" ({e['note']})" if e.get("note") else ""
        source = e["source"].replace("|", "\\|")  # the quoted table rows would split the cell
        pair = f"`{base}` → `{e['row']}`" if not e.get("reverse") else f"`{e['row']}` → `{base}`"
        lines.append(f"| {e['change']}{note} | {e['full_scale']:+.5f} | {source} | {pair} | {' | '.join(cells)} |")
    lines += ["", "Agreement with full scale, over the changes whose full-scale |Δ| is at least "
              f"{FULL_SCALE_NOISE} (smaller ones are within the records' seed spread), on the final score: "
              + agreements(final) + ". With training changes read before export: " + agreements(training)
              + ". Δ = the change's end minus its start, on the seeds both rows ran (n), ± its standard error; "
              "\"same weights\": measured by bench/export_pairs.py, the change as a variant of its base's export; "
              "before export: each run's `pre_export_exact` (its own log), for changes of training only."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=Path, default=CALIBRATION)
    parser.add_argument("--write", action="store_true", help="replace the calibration section of results/MINIGOLF.md")
    args = parser.parse_args(argv)
    try:
        entries = load_entries(args.entries)
        shapes = {name: mg.read_results(mg.results_file(shape)) for name, shape in mg.SHAPES.items()}
        exports = {name: mg.read_results(mg.results_file(shape, ep.RESULTS)) for name, shape in mg.SHAPES.items()}
    except mg.HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = table(entries, shapes, exports, {name: before_export(records) for name, records in shapes.items()})
    print(text)
    if args.write:
        mg.TABLE_DOC.write_text(mg.replace_section(mg.TABLE_DOC.read_text(encoding="utf-8"), text, BEGIN, END),
                                encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
