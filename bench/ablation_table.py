"""Turn the logs of bench/ablation.sh into the Markdown table of results/ABLATION.md.

    python bench/ablation_table.py results/ablation_logs > results/ABLATION.md

Rows keep the order of bench/ablation.sh (baseline first); each row is the mean over its seeds, and delta is
against the row above. A row whose logs lack a final score is listed as failed, never silently dropped.
"""
import re
import statistics
import sys
from pathlib import Path

ORDER = ["baseline"] + re.findall(r'^\s+"(\w+)\|', (Path(__file__).parent / "ablation.sh").read_text(), re.M)


def last(pattern: str, text: str):
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def read_run(text: str) -> dict:
    return dict(
        bpb=last(r"final_submission .*?val_bpb:([\d.]+)", text) or last(r"final_int8_zlib_roundtrip_exact .*?val_bpb:([\d.]+)", text),
        step_ms=last(r"step_avg:([\d.]+)ms", text),
        bytes=last(r"final_submission .*?bytes_total:(\d+)", text) or last(r"Total submission size int8\+zlib: (\d+)", text),
    )


def main(log_dir: str) -> None:
    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(log_dir).glob("*_s*.txt")):
        name = re.sub(r"_s\d+$", "", path.stem)
        runs.setdefault(name, []).append(read_run(path.read_text(errors="replace")))
    print("# Ablation on the proxy corpus (one GPU, equal training wall clock)\n")
    print("| technique (cumulative) | seeds | proxy val_bpb (mean ± sd) | Δ vs previous | ms/step | artifact bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    previous = None
    for name in sorted(runs, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        scores = [r["bpb"] for r in runs[name] if r["bpb"] is not None]
        if not scores:
            print(f"| {name} | {len(runs[name])} | failed (no final score) | | | |")
            continue
        mean = statistics.fmean(scores)
        spread = f" ± {statistics.stdev(scores):.4f}" if len(scores) > 1 else ""
        delta = f"{mean - previous:+.4f}" if previous is not None else ""
        ms = [r["step_ms"] for r in runs[name] if r["step_ms"]]
        size = [r["bytes"] for r in runs[name] if r["bytes"]]
        print(f"| {name} | {len(scores)} | {mean:.4f}{spread} | {delta} | {statistics.fmean(ms):.1f} | "
              f"{max(size):,.0f} |" if ms and size else f"| {name} | {len(scores)} | {mean:.4f}{spread} | {delta} | | |")
        previous = mean


if __name__ == "__main__":
    main(sys.argv[1])
