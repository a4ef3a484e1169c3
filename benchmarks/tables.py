"""Markdown tables of a benchmarks.run report (what benchmarks/README.md shows).

    python -m benchmarks.tables results/bench.json > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli import ArgumentParser, command


def machine_line(report: dict) -> str:
    m = report["machine"]
    load = report.get("load_average_at_end")
    return (f"{m['cpu']}, {m['cores']} cores (flags: {', '.join(m['cpu_flags']) or 'none'}), {report['threads']['threads']} "
            f"thread(s) per scorer; torch {m['versions'].get('torch')}, onnxruntime {m['versions'].get('onnxruntime')}, "
            f"numpy {m['versions'].get('numpy')}; commit {str(m['git'].get('commit'))[:10]}{' (dirty)' if m['git'].get('dirty') else ''}; "
            f"{m['date_utc']}; load average at start {m['load_average_at_start'][0]:.1f}"
            + (f", at end {load[0]:.1f}" if load else ""))


def sweep_table(result: dict, batch: int) -> str:
    points = [p for p in result["points"] if p["batch"] == batch]
    lengths = sorted({p["length"] for p in points})
    scorers = list(dict.fromkeys(p["scorer"] for p in points))
    lines = [f"| {result['preset']}, B={batch} | " + " | ".join(f"L={n}" for n in lengths) + " | MFLOP/pair at L=30 |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for name in scorers:
        row = {p["length"]: p for p in points if p["scorer"] == name}
        flops = row.get(max(lengths), {}).get("flops_per_pair", 0) / 1e6
        lines.append(f"| {name} | " + " | ".join(f"{row[n]['pairs_per_s']:.0f}" if n in row else "-" for n in lengths)
                     + f" | {flops:.1f} |")
    return "\n".join(lines)


def latency_table(result: dict, length: int) -> str:
    points = [p for p in result["points"] if p["length"] == length]
    batches = sorted({p["batch"] for p in points})
    scorers = list(dict.fromkeys(p["scorer"] for p in points))
    lines = [f"| {result['preset']}, L={length}: p50 / p90 ms per call | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in scorers:
        row = {p["batch"]: p for p in points if p["scorer"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{1e3 * row[b]['latency_median_s']:.1f} / {1e3 * row[b]['latency_p90_s']:.1f}" if b in row else "-" for b in batches) + " |")
    return "\n".join(lines)


def real_table(real: dict) -> str:
    base = real["scorers"].get("paper-eager", {}).get("pairs_per_s")
    lines = [f"| {real['preset']}, Flickr8K test lengths (mean {real['mean_length']:.1f}, {real['captions']} captions) | B | pairs/s "
             "| x paper-as-written | GFLOP/s | % of peak |", "|---|---|---|---|---|---|"]
    for name, row in real["scorers"].items():
        ratio = f"{row['protocol_pairs_per_s'] / base:.1f}" if base else "-"
        lines.append(f"| {name} | {row.get('block', '-')} | {row['protocol_pairs_per_s']:.0f} | {ratio} | {row['gflops_per_s']:.1f} "
                     f"| {100 * row['fraction_of_peak']:.0f} |")
    return "\n".join(lines)


def precision_table(report: dict) -> str:
    lines = ["| preset | variant vs ORT fp32 | max abs diff | top-10 overlap | Kendall tau (mean / min) |", "|---|---|---|---|---|"]
    for result in report["precision"]["random_weights"]:
        for name, row in result["variants"].items():
            lines.append(f"| {result['preset']} | {name} | {row['max_abs_diff']:.2g} | {row['topk_overlap']:.3f} | "
                         f"{row['kendall_tau']:.4f} / {row['kendall_tau_min']:.4f} |")
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| target | preset | measured | need | verdict |", "|---|---|---|---|---|"]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {row['preset']} | {row['ratio']:.2f} | {row['threshold']:g} | **{row['verdict']}** |")
    return "\n".join(lines)


def peak_table(report: dict) -> str:
    peak = report["peak"]
    lines = ["| precision | peak used (G(FL)OP/s) | at start | at end | kernel |", "|---|---|---|---|---|"]
    for name, value in peak["peak"].items():
        start, end = peak.get("peak_at_start", {}).get(name), peak.get("peak_at_end", {}).get(name)
        lines.append(f"| {name} | {value / 1e9:.1f} | {start / 1e9 if start else float('nan'):.1f} | "
                     f"{end / 1e9 if end else float('nan'):.1f} | {peak['peak_kernel'].get(name, '')} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    parts = [f"Machine: {machine_line(report)}.", "", peak_table(report), ""]
    for result in report["pair_scoring"]:
        parts += [sweep_table(result, max(p["batch"] for p in result["points"])), ""]
        parts += [latency_table(result, max(p["length"] for p in result["points"])), ""]
    for real in report["real_lengths"]:
        parts += [real_table(real), ""]
    parts += [precision_table(report), "", targets_table(report)]
    return "\n".join(parts)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        print(markdown(report))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {args.report}: not a complete report of python -m benchmarks.run ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
