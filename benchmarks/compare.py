"""Do two runs of `python -m benchmarks.run` agree? Per scorer, the pairs/s of the real-length pass (and of
every sweep point) of run B over run A, with the machine state of each run.

    python -m benchmarks.compare results/benchmarks/quick-1.json results/benchmarks/quick-2.json [--tolerance 0.15]

"Agree within 15%" = max(a, b) / min(a, b) - 1 <= 0.15 for the median pairs/s of every scorer of the
real-length pass (issue 14's criterion; `--basis wall`, the default), or for its pairs per CPU-second
(`--basis cpu`: the process CPU time, which the other jobs on shared cores inflate least). Both are printed;
the sweep points are listed too (their calls are shorter, so noisier) but do not decide. Exit 0 when every
scorer agrees on the chosen basis, 1 otherwise, 2 on unreadable input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli import ArgumentParser, command

TOLERANCE = 0.15


def spread(a: float, b: float) -> float:
    """max / min - 1 of two positive rates."""
    return max(a, b) / min(a, b) - 1.0


def machine_state(report: dict) -> str:
    start = report.get("machine", {}).get("load_average_at_start") or [float("nan")]
    end = report.get("load_average_at_end") or [float("nan")]
    return f"{report.get('machine', {}).get('date_utc')}, load {start[0]:.1f} -> {end[0]:.1f}, {report.get('seconds', 0):.0f} s"


def compare(a: dict, b: dict, tolerance: float = TOLERANCE) -> tuple[list[dict], list[dict]]:
    """(real-length rows, sweep rows): {preset, scorer, a, b, spread, agree} (sweep rows add length and batch)."""
    real_rows = []
    for real_a in a.get("real_lengths", []):
        real_b = next((r for r in b.get("real_lengths", []) if r["preset"] == real_a["preset"]), None)
        if real_b is None:
            continue
        for name, row in real_a["scorers"].items():
            if name in real_b["scorers"]:
                x, y = row["pairs_per_s"], real_b["scorers"][name]["pairs_per_s"]
                cpu_x, cpu_y = row.get("pairs_per_cpu_s"), real_b["scorers"][name].get("pairs_per_cpu_s")
                real_rows.append({"preset": real_a["preset"], "scorer": name, "a": x, "b": y, "spread": spread(x, y),
                                  "agree": spread(x, y) <= tolerance,
                                  "cpu_spread": spread(cpu_x, cpu_y) if cpu_x and cpu_y else None})
    sweep_rows = []
    for sweep_a in a.get("pair_scoring", []):
        sweep_b = next((r for r in b.get("pair_scoring", []) if r["preset"] == sweep_a["preset"]), None)
        if sweep_b is None:
            continue
        index = {(p["scorer"], p["length"], p["batch"]): p for p in sweep_b["points"]}
        for p in sweep_a["points"]:
            q = index.get((p["scorer"], p["length"], p["batch"]))
            if q:
                sweep_rows.append({"preset": sweep_a["preset"], "scorer": p["scorer"], "length": p["length"], "batch": p["batch"],
                                   "a": p["pairs_per_s"], "b": q["pairs_per_s"], "spread": spread(p["pairs_per_s"], q["pairs_per_s"]),
                                   "agree": spread(p["pairs_per_s"], q["pairs_per_s"]) <= tolerance})
    return real_rows, sweep_rows


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first run's JSON")
    parser.add_argument("b", type=Path, help="the second run's JSON")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest max/min - 1 that agrees (default 0.15)")
    parser.add_argument("--basis", choices=("wall", "cpu"), default="wall", help="what decides: wall-clock pairs/s (default) or pairs per CPU-second")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.a, args.b):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: cannot read the report ({exc}); expected JSON from python -m benchmarks.run", file=sys.stderr)
            return 2
    real_rows, sweep_rows = compare(*reports, tolerance=args.tolerance)
    if not real_rows:
        print(f"error: {args.a} and {args.b}: no real-length pass in common; expected two reports of python -m benchmarks.run",
              file=sys.stderr)
        return 2
    print(f"A: {args.a} ({machine_state(reports[0])})\nB: {args.b} ({machine_state(reports[1])})")
    print(f"real-length pass, median pairs/s (agree: max/min - 1 <= {args.tolerance:.0%}):")
    for row in real_rows:
        cpu = f"   (per CPU-second: {100 * row['cpu_spread']:5.1f}%)" if row.get("cpu_spread") is not None else ""
        print(f"  [{'AGREE' if row['agree'] else 'DIFFER'}] {row['preset']:<9} {row['scorer']:<20} {row['a']:9.0f} {row['b']:9.0f}  "
              f"{100 * row['spread']:5.1f}%{cpu}")
    worst = max(sweep_rows, key=lambda r: r["spread"], default=None)
    if worst:
        agreeing = sum(r["agree"] for r in sweep_rows)
        print(f"sweep points (not deciding): {agreeing}/{len(sweep_rows)} within {args.tolerance:.0%}; widest {worst['scorer']} "
              f"L={worst['length']} B={worst['batch']}: {100 * worst['spread']:.1f}%")
    wall = sum(r["agree"] for r in real_rows)
    cpu = sum(r["cpu_spread"] is not None and r["cpu_spread"] <= args.tolerance for r in real_rows)
    print(f"wall-clock pairs/s: {wall}/{len(real_rows)} scorers agree within {args.tolerance:.0%}; "
          f"pairs per CPU-second: {cpu}/{len(real_rows)}")
    every = (wall if args.basis == "wall" else cpu) == len(real_rows)
    print(f"{'PASS' if every else 'FAIL'} ({args.basis}): {wall if args.basis == 'wall' else cpu}/{len(real_rows)} scorers agree "
          f"within {args.tolerance:.0%}")
    return 0 if every else 1


if __name__ == "__main__":
    sys.exit(main())
