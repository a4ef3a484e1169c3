"""PNG plots of a benchmarks.run report (matplotlib, Agg backend: no display needed).

    python -m benchmarks.plots results/bench.json --out results/bench-plots
    from benchmarks.plots import write_plots
    paths = write_plots(report, Path("results/bench-plots"))

Plots: pairs/s vs caption length and vs batch per scorer (one panel per preset), latency p50/p90
vs batch, fraction of the measured matmul peak per scorer, the real-length pass, precision
agreement vs fp32, and the end-to-end protocol times with R@1 when measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli import ArgumentParser, command

MARKERS = "osD^v<>p*h"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scorers(points: list[dict]) -> list[str]:
    return list(dict.fromkeys(p["scorer"] for p in points))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_throughput(report: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    results = report["pair_scoring"]
    paths = []
    for axis_name, fixed_name in (("length", "batch"), ("batch", "length")):
        fig, axes = plt.subplots(1, len(results), figsize=(8.5 * len(results), 4.4), squeeze=False)
        for ax, result in zip(axes[0], results):
            fixed = max(p[fixed_name] for p in result["points"])
            for i, scorer in enumerate(_scorers(result["points"])):
                rows = sorted((p for p in result["points"] if p["scorer"] == scorer and p[fixed_name] == fixed),
                              key=lambda p: p[axis_name])
                x, y = [p[axis_name] for p in rows], [p["pairs_per_s"] for p in rows]
                if rows and "latency_min_s" in rows[0]:  # error bars: the slowest and the fastest call
                    low = [p["pairs_per_s"] - p["batch"] / p["latency_max_s"] for p in rows]
                    high = [p["batch"] / p["latency_min_s"] - p["pairs_per_s"] for p in rows]
                    ax.errorbar(x, y, yerr=[low, high], marker=MARKERS[i % len(MARKERS)], label=scorer, capsize=2)
                else:
                    ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], label=scorer)
            factored = sorted((p for p in result["points"] if p["scorer"] == "ort-fp32" and p[fixed_name] == fixed),
                              key=lambda p: p[axis_name])
            peak = report.get("peak", {})
            if axis_name == "length" and factored and peak.get("peak", {}).get("fp32"):
                for key, style, what in (("peak", "--", "every core"), ("peak_1thread", ":", "one thread")):
                    value = peak.get(key, {}).get("fp32")
                    if value:  # the roofline: the measured fp32 GEMM peak over the factored pair step's FLOPs
                        ax.plot([p["length"] for p in factored], [value / p["flops_per_pair"] for p in factored], style,
                                color="black", label=f"peak fp32 {value / 1e9:.0f} GFLOP/s ({what}) / FLOPs per pair")
            ax.set_yscale("log")
            if axis_name == "batch":
                ax.set_xscale("log", base=2)
            ax.set_xlabel("caption length (words)" if axis_name == "length" else "pairs per call (1 image x B captions)")
            ax.set_ylabel("pairs / s")
            ax.set_title(f"{result['preset']} preset, {fixed_name} {fixed}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(_save(fig, out / f"pairs_per_s_vs_{axis_name}.png"))
    return paths


def plot_latency(report: dict, out: Path) -> Path:
    plt = _pyplot()
    results = report["pair_scoring"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        length = max(p["length"] for p in result["points"])
        for i, scorer in enumerate(_scorers(result["points"])):
            rows = sorted((p for p in result["points"] if p["scorer"] == scorer and p["length"] == length), key=lambda p: p["batch"])
            batches = [p["batch"] for p in rows]
            line, = ax.plot(batches, [1e3 * p["latency_median_s"] for p in rows], marker=MARKERS[i % len(MARKERS)], label=f"{scorer} p50")
            ax.plot(batches, [1e3 * p["latency_p90_s"] for p in rows], linestyle="--", color=line.get_color(), alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pairs per call")
        ax.set_ylabel("latency per call, ms (solid p50, dashed p90)")
        ax.set_title(f"{result['preset']} preset, L={length}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "latency_vs_batch.png")


def plot_peak_fraction(report: dict, out: Path) -> Path:
    plt = _pyplot()
    real = report.get("real_lengths", [])
    fig, axes = plt.subplots(1, max(1, len(real)), figsize=(6 * max(1, len(real)), 4.2), squeeze=False)
    for ax, result in zip(axes[0], real):
        names = list(result["scorers"])
        fractions = [100 * result["scorers"][n]["fraction_of_peak"] for n in names]
        ax.bar(range(len(names)), fractions, color="tab:blue")
        ax.axhline(70, color="tab:red", linestyle="--", label="target 70%")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("% of the measured peak of the precision used")
        ax.set_title(f"{result['preset']}: Flickr8K test lengths (mean {result['mean_length']:.1f})")
        for x, (n, f) in enumerate(zip(names, fractions)):
            ax.text(x, f, f"{result['scorers'][n]['pairs_per_s']:.0f}/s", ha="center", va="bottom", fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out / "fraction_of_peak.png")


def plot_precision(report: dict, out: Path) -> Path:
    plt = _pyplot()
    results = report.get("precision", {}).get("random_weights", [])
    fig, axes = plt.subplots(1, max(1, len(results)), figsize=(6 * max(1, len(results)), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        names = list(result["variants"])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [result["variants"][n]["kendall_tau"] for n in names], width=0.4, label="Kendall tau")
        ax.bar([i + 0.2 for i in x], [result["variants"][n]["topk_overlap"] for n in names], width=0.4, label="top-k overlap (k=10)")
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(min([0.8] + [result["variants"][n]["kendall_tau"] - 0.02 for n in names]), 1.005)
        ax.set_title(f"{result['preset']} vs ORT fp32 (random weights)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out / "precision_agreement.png")


def plot_end_to_end(report: dict, out: Path) -> Path | None:
    retrieval = report.get("end_to_end", {}).get("retrieval", {})
    title = "Flickr8K test protocol, engine runtime"
    if "runs" not in retrieval:
        retrieval = report.get("end_to_end", {}).get("synthetic_retrieval", {})
        title = f"TIMING ONLY: random-weight {retrieval.get('preset')} model, random features (R@1 is chance level)"
    if "runs" not in retrieval:
        return None
    plt = _pyplot()
    fig, (ax_time, ax_r1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in retrieval["runs"]:
        labels, times, r1 = ["exhaustive"], [run["exhaustive"]["score_s"]], [run["exhaustive"]["metrics"]["i2t"]["r1"]]
        for name, row in run.get("shortlist", {}).items():
            if isinstance(row, dict) and "score_s" in row:
                labels.append(f"shortlist {name}")
                times.append(row["score_s"])
                r1.append(row["i2t"]["r1"])
        ax_time.plot(labels, times, marker="o", label=run["precision"])
        ax_r1.plot(labels, r1, marker="o", label=run["precision"])
    ax_time.set_yscale("log")
    ax_time.set_ylabel("wall time, s")
    ax_r1.set_ylabel("image-to-text R@1")
    for ax in (ax_time, ax_r1):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{title}; {retrieval['runs'][0]['images']} images x {retrieval['runs'][0]['captions']} captions", fontsize=9)
    return _save(fig, out / "end_to_end.png")


def plot_gpu(report: dict, path: Path) -> Path:
    """A benchmarks.gpu report: pairs/s vs batch, one panel per (preset, caption length), one colour per dtype,
    eager dashed and CUDA-graph replay solid; the paper-as-written baseline as a grey line on its preset's panels."""
    plt = _pyplot()
    panels = list(dict.fromkeys((p.get("preset", report.get("preset")), p["length"]) for p in report["points"]))
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    dtypes = list(dict.fromkeys(p["dtype"] for p in report["points"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    baseline = report.get("paper_as_written") or {}
    for ax, (preset, length) in zip(axes.flat, panels):
        for i, dtype in enumerate(dtypes):
            pts = sorted((p for p in report["points"] if p.get("preset", report.get("preset")) == preset
                          and p["length"] == length and p["dtype"] == dtype), key=lambda p: p["batch"])
            x = [p["batch"] for p in pts]
            ax.plot(x, [p["eager_pairs_per_s"] for p in pts], ls="--", marker=MARKERS[i], color=colours[i % len(colours)],
                    label=f"{dtype} eager")
            if any("graph_pairs_per_s" in p for p in pts):
                ax.plot(x, [p.get("graph_pairs_per_s") for p in pts], ls="-", marker=MARKERS[i], color=colours[i % len(colours)],
                        label=f"{dtype} CUDA graph")
        if baseline.get("preset", preset) == preset and baseline.get("pairs_per_s"):
            ax.axhline(baseline["pairs_per_s"], color="grey", lw=1, label=f"paper as written, fp32 L={baseline['length']}")
        ax.set(xscale="log", yscale="log", xlabel="pairs per call (one image x B captions)", ylabel="pairs/s",
               title=f"{preset} preset, L={length}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    gpu = report.get("gpu", {})
    fig.suptitle(f"{gpu.get('name', report.get('device', '?'))}: BSSAN pair step, random weights ({report.get('note', '')})", fontsize=9)
    return _save(fig, Path(path))


def write_plots(report: dict, out: Path) -> list[Path]:
    """Every plot the report has data for; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = plot_throughput(report, out) + [plot_latency(report, out), plot_peak_fraction(report, out), plot_precision(report, out)]
    end_to_end = plot_end_to_end(report, out)
    return paths + ([end_to_end] if end_to_end else [])


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="JSON written by python -m benchmarks.run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {args.report}: cannot read the report ({exc}); expected JSON from python -m benchmarks.run", file=sys.stderr)
        return 2
    if "pair_scoring" not in report:
        print(f"error: {args.report}: no pair_scoring section; expected a report of python -m benchmarks.run", file=sys.stderr)
        return 2
    for path in write_plots(report, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
