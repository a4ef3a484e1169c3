"""All CPU benchmarks in one run, on one machine, on the same inputs: JSON, PNG plots and the target lines.

    python -m benchmarks.run --quick --json results/bench-quick.json        # < 5 minutes on 2 cores
    python -m benchmarks.run --json results/bench.json [--plots DIR] [--artifact DIR] [--store DIR]

Sections (each in the JSON; a section whose inputs are missing says why it was skipped):
    peak          the machine's matmul peak per precision (benchmarks/peak.py)
    pair_scoring  every scorer x caption length x batch at the flickr8k and paper presets,
                  random weights (benchmarks/pair_scoring.py)
    real_lengths  one image x captions of Flickr8K test lengths, bucketed, whole pass timed
    precision     fp16 / int8 vs fp32 rankings, random weights; and the reference artifact on the
                  store when both exist (benchmarks/precision.py)
    end_to_end    1K x 5K protocol exhaustive and with shortlists, extraction images/s (benchmarks/end_to_end.py)
    targets       the issue's three targets, each a ratio with PASS / FAIL (or UNVERIFIED: the speed
                  part passes, the accuracy part could not be measured here)

Plots go to --plots (default: beside the JSON, OUT-plots/). Speed uses random-weight models
(speed does not depend on the weights); accuracy needs the reference model and the store.
The 2 cores are shared: the JSON records the load average at the start and the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the legacy exporter's C++ shape-inference warnings

from benchmarks.common import DEFAULT_THREADS, load_note, machine_info, write_json_atomic  # noqa: E402
from benchmarks.end_to_end import (  # noqa: E402
    DEFAULT_ARTIFACT, DEFAULT_DATA, DEFAULT_MODEL, DEFAULT_STORE, SHORTLIST_KS, flickr8k_test_lengths, print_end_to_end,
    run_end_to_end, store_has_test,
)
from engine.runtime import DEFAULT_PAIRS_PER_CALL  # noqa: E402
from engine.cli import ArgumentParser, command, output_file  # noqa: E402

SPEEDUP_FACTORED = 2.0  # factored ORT fp32 vs the paper as written, padded to 30 (issue 5; kept as a sanity line)
SPEEDUP_VS_EAGER = 2.0  # issue 14: the engine's path >= 2x factored-eager torch on Flickr8K test lengths
SPEEDUP_BEST = 30.0  # issue 14: the engine's path >= 30x the paper as written on Flickr8K test lengths
R1_SLACK = 0.3  # R@1 within 0.3 (points) of fp32 for int8/bf16 paths
PEAK_FRACTION = 0.40  # issue 14: the pair scorer at >= 40% of the measured peak of its precision
EQUAL_SCORES = 1e-4  # "at equal scores": max |score - paper-as-written score| (export/validate.py PARITY_TOLERANCE)
SIZE_FIELDS = ("region_count", "region_dim", "object_count", "object_dim", "word_dim", "w2r_hidden", "o2w_hidden")
# the engine's scoring paths (engine.runtime.Scorer path=) and the one-thread scorer that runs each in the real-length pass
ENGINE_PATH_SCORERS = {"grid": "ort-fp32", "pair": "ort-fp32-pair", "kernel": "kernel"}
INT8_ARTIFACT = {"ort-int8-recurrence": "int8", "ort-int8-projection": "int8", "ort-fp32": "fp32", "factored-eager": "fp32"}


ALL_LENGTHS = (8, 12, 20, 30)


@dataclass
class RunConfig:
    presets: tuple[str, ...] = ("flickr8k", "paper")
    lengths: dict = field(default_factory=lambda: {"flickr8k": ALL_LENGTHS, "paper": ALL_LENGTHS, "demo": (4, 8)})
    batches: tuple[int, ...] = (1, 16, 64, 256)
    repeats: int = 7
    min_calls: int = 3  # timed calls per point at least, even past max_seconds
    max_seconds: float = 4.0
    real_block: int = DEFAULT_PAIRS_PER_CALL  # captions per call in the real-length pass (every scorer: the engine's; fixed)
    real_min_seconds: float = 6.0  # real-length pass: interleaved rounds until every scorer has this much timed
    real_captions: dict = field(default_factory=lambda: {"flickr8k": 5000, "paper": 1000, "demo": 256})
    precision_images: int = 4
    precision_captions: int = 1000
    e2e_images: int = 1000
    artifact_precision_images: int = 1000
    extraction_images: int = 48
    synthetic_images: int = 200  # without the reference model/store: protocol timing on a random-weight model
    square_peak: bool = True


# --quick: the flickr8k preset only (the reference model's sizes, where issue 14's targets are judged), every
# length, three batches; the real-length pass with as many interleaved rounds as fit in real_min_seconds per
# scorer (its figures are the ones two quick runs must agree on within 15%). < 5 minutes on 2 shared cores.
QUICK = RunConfig(presets=("flickr8k",), lengths={"flickr8k": ALL_LENGTHS, "paper": (12, 30), "demo": (4, 8)}, batches=(16, 64, 256),
                  repeats=5, min_calls=3, max_seconds=1.0, real_captions={"flickr8k": 1024, "paper": 128, "demo": 128},
                  real_min_seconds=4.0, precision_images=2, precision_captions=128, e2e_images=100, artifact_precision_images=100,
                  extraction_images=16, synthetic_images=40, square_peak=False)


def _point(result: dict, scorer: str, length: int, batch: int) -> dict | None:
    return next((p for p in result["points"] if p["scorer"] == scorer and p["length"] == length and p["batch"] == batch), None)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _validated_paths(real: dict, ranking: dict | None = None) -> dict[str, str]:
    """{path: its one-thread scorer} of the engine's scoring paths that are validated here, in ENGINE_PATH_SCORERS order:
    the scorer ran in the real-length pass, its scores equal the paper-as-written's (max_abs_diff_vs_paper <=
    EQUAL_SCORES, where measured), and, when the end-to-end ranking check ran, the check timed the path on the store's
    features and its R@1/5/10 equal the grid path's (only such a path is recorded for the engine: engine.paths)."""
    checked = ranking if ranking and "skipped" not in ranking else None
    out = {}
    for path, name in ENGINE_PATH_SCORERS.items():
        row = real["scorers"].get(name)
        if row is None or (row.get("max_abs_diff_vs_paper") is not None and row["max_abs_diff_vs_paper"] > EQUAL_SCORES):
            continue
        if checked is not None and path != "grid":
            # reports from before the kernel path checked grid vs pair only (identical_recall)
            equal = checked.get("recall_equal_to_grid", {"pair": checked.get("identical_recall", False)})
            if not equal.get(path, False):
                continue
        out[path] = name
    return out


def _engine_graphs_name(real: dict, ranking: dict | None = None) -> str:
    """The one-thread scorer of the engine's path: the fastest (protocol pairs/s) of its validated paths on this machine
    (_validated_paths: ort-fp32 = grid, ort-fp32-pair = pair, kernel = the fused W2R kernel), as the end-to-end check
    records the fastest of them for the engine; ort-fp32 when none is validated."""
    paths = _validated_paths(real, ranking)
    if not paths:
        return "ort-fp32"
    return max(paths.values(), key=lambda name: real["scorers"][name]["protocol_pairs_per_s"])


def evaluate_targets(report: dict, config: RunConfig) -> list[dict]:
    """Issue 14's targets as rows {target, preset, ratio, threshold, verdict, detail}. Speed ratios compare scorers
    on the same number of threads (one, by default: `--threads`): the engine's path at one thread (the fastest of its
    validated paths here: ort-fp32 = grid graphs, ort-fp32-pair = pair graphs, kernel = the fused W2R kernel; see
    _engine_graphs_name) vs the torch baselines at one thread; "equal ranking" is the end-to-end check's (every
    timed path's R@K equal the grid path's); the fraction of peak is the engine as a user runs it (every core) over
    the peak measured on every core."""
    rows = []
    artifact = report.get("precision", {}).get("artifact", {})
    for result in report["pair_scoring"]:
        preset, batch = result["preset"], max(p["batch"] for p in result["points"])
        length = max(result["lengths"])
        base, ort = _point(result, "paper-eager", length, batch), _point(result, "ort-fp32", length, batch)
        if base and ort:
            equal = ort["max_abs_diff_vs_paper"] is not None and ort["max_abs_diff_vs_paper"] <= EQUAL_SCORES
            ratio = ort["protocol_pairs_per_s"] / base["pairs_per_s"]
            rows.append({"target": "factored ORT fp32 >= 2x paper-as-written (padded to 30)", "preset": preset,
                         "ratio": ratio, "threshold": SPEEDUP_FACTORED, "verdict": _verdict(ratio >= SPEEDUP_FACTORED and equal),
                         "detail": f"L={length} B={batch}: {ort['protocol_pairs_per_s']:.0f} vs {base['pairs_per_s']:.0f} pairs/s, "
                                   f"max |score diff| {ort['max_abs_diff_vs_paper']:.2g} (equal: <= {EQUAL_SCORES:g})"})
    ranking = report.get("end_to_end", {}).get("ranking_check")
    if ranking and "skipped" not in ranking:
        diffs = ranking.get("max_abs_diff_vs_grid", {"pair": ranking["max_abs_diff"]})
        kernel_skipped = ranking.get("kernel", {}).get("skipped")
        same, detail = ranking["identical_recall"], (
            f"{' vs '.join(ranking.get('paths', ['grid', 'pair']))} path on {ranking['images']} x {ranking['captions']} "
            f"({ranking['source']}): max |score diff| vs grid {', '.join(f'{p} {d:.2g}' for p, d in diffs.items())}, "
            f"R@K identical: {ranking['identical_recall']}" + (f" (kernel not checked: {kernel_skipped})" if kernel_skipped else ""))
    else:
        same, detail = None, f"engine paths' R@K NOT MEASURED ({(ranking or {}).get('skipped', 'no artifact')})"
    for real in report.get("real_lengths", []):
        scorers = real["scorers"]
        mine = _engine_graphs_name(real, ranking)
        if mine not in scorers:
            continue
        rate = scorers[mine]["protocol_pairs_per_s"]
        threads = scorers[mine]["threads"]
        validated = _validated_paths(real, ranking)
        choice = (f"engine's path: {mine}, the fastest of the validated "
                  + ", ".join(f"{p} ({n}) {scorers[n]['protocol_pairs_per_s']:.0f}" for p, n in validated.items())
                  + " pairs/s" if validated else f"engine's path: {mine} (no path validated)")
        for baseline, need in (("factored-eager", SPEEDUP_VS_EAGER), ("paper-eager", SPEEDUP_BEST)):
            if baseline not in scorers:
                continue
            ratio = rate / scorers[baseline]["pairs_per_s"]
            verdict = "FAIL" if ratio < need or same is False else "PASS" if same else "UNVERIFIED"
            rows.append({"target": f"engine's path >= {need:g}x {baseline} on Flickr8K test lengths, equal ranking",
                         "preset": real["preset"], "ratio": ratio, "threshold": need, "verdict": verdict,
                         "detail": f"{mine} {rate:.0f} vs {baseline} {scorers[baseline]['pairs_per_s']:.0f} pairs/s, both on "
                                   f"{threads} thread(s) (mean length {real['mean_length']:.1f}, {real['images']} x "
                                   f"{real['captions']} pairs per pass; {choice}); {detail}"})
        if "engine" in scorers:
            engine = scorers["engine"]
            rows.append({"target": ">= 40% of the measured peak of the precision used (pair scorer)", "preset": real["preset"],
                         "ratio": engine["fraction_of_peak"], "threshold": PEAK_FRACTION,
                         "verdict": _verdict(engine["fraction_of_peak"] >= PEAK_FRACTION),
                         "detail": f"engine (every core): {engine['gflops_per_s']:.1f} GFLOP/s, {engine['pairs_per_s']:.0f} pairs/s; "
                                   f"peak fp32 {report['peak']['peak'].get('fp32', 0) / 1e9:.0f} GFLOP/s "
                                   f"({report['peak']['peak_kernel'].get('fp32')}); the engine's path on one thread ({mine}) "
                                   f"{100 * scorers[mine]['fraction_of_peak']:.0f}% of the one-thread peak"})
    for run in report.get("end_to_end", {}).get("retrieval", {}).get("runs", []):
        if run.get("images") == 1000 and run["precision"] == "fp32":
            rows.append({"target": "1K x 5K exhaustive <= 3 min (Scorer, 2 cores)", "preset": "reference",
                         "ratio": run["exhaustive"]["score_s"] / 180, "threshold": 1.0,
                         "verdict": _verdict(run["exhaustive"]["score_s"] <= 180),
                         "detail": f"{run['exhaustive']['score_s']:.0f} s ({run['exhaustive']['pairs_per_s']:.0f} pairs/s); ratio = time / limit"})
            k100 = run.get("shortlist", {}).get("k100")
            if k100:
                rows.append({"target": "1K x 5K shortlist K=100 <= 20 s (Scorer, 2 cores)", "preset": "reference",
                             "ratio": k100["score_s"] / 20, "threshold": 1.0, "verdict": _verdict(k100["score_s"] <= 20),
                             "detail": f"{k100['score_s']:.1f} s, both directions; ratio = time / limit"})
    return rows


def print_targets(rows: list[dict]) -> None:
    print("\ntargets:")
    for row in rows:
        need = "<=" if row["target"].startswith("1K x 5K") else ">="
        print(f"  [{row['verdict']}] {row['target']} @ {row['preset']}: {row['ratio']:.2f} (need {need} {row['threshold']:g}); {row['detail']}")


def run(config: RunConfig, artifact: Path | None, model: Path, store: Path, data: Path, threads: int | str, work: Path) -> dict:
    from benchmarks.pair_scoring import SweepConfig, real_length_pass, sweep_preset
    from benchmarks.peak import choose_threads, format_peaks, measure_peaks
    from benchmarks.precision import artifact_precision, random_weight_precision
    from engine.backends.onnxruntime import cpu_count
    from training.config import preset

    print(load_note())
    chosen = choose_threads(tuple(sorted({1, DEFAULT_THREADS}))) if threads == "auto" else {"threads": int(threads), "forced": True}
    threads = chosen["threads"]
    cores = cpu_count()
    print(f"threads per scorer: {threads} ({'given' if chosen.get('forced') else 'auto: ' + str(chosen['geomean_flops_per_s'])}); "
          f"the engine scorer: every core ({cores})")
    report: dict = {"machine": machine_info(threads), "threads": chosen, "cores": cores, "mode": config.__dict__,
                    "weights_note": "speed sections use random-weight models (seed 0): speed does not depend on the weights"}
    started = time.perf_counter()
    hidden = tuple(sorted({preset(p).w2r_hidden for p in config.presets}))
    report["peak"] = measure_peaks(hidden, threads=cores, square=False)  # the same kernels at the start and at the end
    print(format_peaks(report["peak"]))
    sweeps = {p: SweepConfig(lengths=tuple(config.lengths.get(p, ALL_LENGTHS)), batches=config.batches, repeats=config.repeats,
                             min_calls=config.min_calls, max_seconds=config.max_seconds, threads=threads,
                             real_block=config.real_block, real_min_seconds=config.real_min_seconds) for p in config.presets}
    report["pair_scoring"] = [sweep_preset(p, sweeps[p], report["peak"], work) for p in config.presets]
    report["real_lengths"] = []
    for p in config.presets:
        lengths, source = flickr8k_test_lengths(config.real_captions.get(p, 256), preset(p).max_words, store, data)
        real = real_length_pass(p, lengths, sweeps[p], report["peak"], work)
        real["lengths_source"] = source
        report["real_lengths"].append(real)
    report["precision"] = {"random_weights": []}
    for p in config.presets:
        lengths, _ = flickr8k_test_lengths(config.precision_captions, preset(p).max_words, store, data, seed=1)
        report["precision"]["random_weights"].append(
            random_weight_precision(p, lengths, config.precision_images, report["peak"], work, threads))
    report["end_to_end"] = run_end_to_end(artifact, model, store, data, config.e2e_images, SHORTLIST_KS, ("fp32", "int8"),
                                          config.extraction_images, work, DEFAULT_THREADS, synthetic_images=config.synthetic_images,
                                          scorer_threads=None)
    resolved = report["end_to_end"].get("resolved_artifact")
    if resolved and store_has_test(store):
        report["precision"]["artifact"] = artifact_precision(Path(resolved), store, config.artifact_precision_images, threads)
    else:
        report["precision"]["artifact"] = {"skipped": report["end_to_end"]["retrieval"].get("skipped", "no artifact")}
    # The cores are shared: the peak is measured again at the end, the same way, and the better of the two is
    # the denominator, so that a peak taken in a busy moment does not inflate every fraction.
    end_peak = measure_peaks(hidden, threads=cores, square=False)
    report["peak"]["peak_at_start"] = dict(report["peak"]["peak"])
    report["peak"]["peak_at_end"] = end_peak["peak"]
    report["peak"]["peak_1thread_at_start"] = dict(report["peak"]["peak_1thread"])
    report["peak"]["peak_1thread_at_end"] = end_peak["peak_1thread"]
    report["peak"]["kernels_at_end"] = end_peak["kernels"]
    for key in ("peak", "peak_1thread"):
        report["peak"][key] = {k: max(v, end_peak[key].get(k, 0.0)) for k, v in report["peak"][key].items()}
    recompute_fractions(report)
    report["targets"] = evaluate_targets(report, config)
    report["seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report


def recompute_fractions(report: dict) -> None:
    """fraction_of_peak of every point and real-length scorer against the peak of the threads it ran on:
    report["peak"]["peak"] (every core: the engine scorer, or scorers on several threads) or ["peak_1thread"]."""
    from benchmarks.flops import peak_fraction

    peak = report["peak"]
    for result in report["pair_scoring"]:
        for p in result["points"]:
            peaks = peak["peak"] if p["scorer"] == "engine" or report["threads"]["threads"] > 1 else peak.get("peak_1thread", peak["peak"])
            p["fraction_of_peak"] = peak_fraction(p["flops_per_pair_by_precision"], peaks, p["latency_median_s"] / p["batch"])
    for real in report["real_lengths"]:
        for row in real["scorers"].values():
            peaks = peak.get(row.get("peak_used", "peak"), peak["peak"])
            row["fraction_of_peak"] = peak_fraction(row["flops_per_pair_by_precision"], peaks, 1.0 / row["pairs_per_s"])


def print_summary(report: dict) -> None:
    for result in report["pair_scoring"]:
        print(f"\n{result['preset']} (random weights; skipped: {result['skipped'] or 'none'})")
        for p in result["points"]:
            print(f"  L={p['length']:<3} B={p['batch']:<4} {p['scorer']:<20} {p['pairs_per_s']:10.1f} pairs/s  "
                  f"p50 {p['latency_median_s'] * 1e3:8.2f} ms  p90 {p['latency_p90_s'] * 1e3:8.2f} ms  "
                  f"{p['gflops_per_s']:6.1f} GFLOP/s  {100 * p['fraction_of_peak']:5.1f}% of peak")
    for real in report["real_lengths"]:
        print(f"\n{real['preset']} real lengths ({real['images']} images x {real['captions']} captions, mean {real['mean_length']:.1f}; "
              f"{real['lengths_source']}; {real['rounds']['rounds']} interleaved rounds, load "
              f"{min(real['rounds']['load_1min']):.1f}-{max(real['rounds']['load_1min']):.1f}); pairs/s median [min, max]")
        for name, row in real["scorers"].items():
            cpu = f"{row['pairs_per_cpu_s']:9.0f} per CPU-s" if row.get("pairs_per_cpu_s") else ""
            print(f"  {name:<20} B={row['block']:<4} {row['pairs_per_s']:9.0f} [{row['pairs_per_s_min']:7.0f}, {row['pairs_per_s_max']:7.0f}] "
                  f"x{row['calls']:<3} {cpu}  {row['gflops_per_s']:6.1f} GFLOP/s  {100 * row['fraction_of_peak']:5.1f}% of "
                  f"{'peak' if row.get('peak_used') == 'peak' else '1-thread peak'}")
        for name, why in real.get("skipped", {}).items():
            print(f"  {name:<20} SKIPPED ({why})")
        if real["scorers"].get("engine", {}).get("reason"):
            print(f"  engine: {real['scorers']['engine']['reason']}")
    for result in report["precision"]["random_weights"]:
        print(f"\nprecision vs ORT fp32, {result['preset']} (random weights, {result['images']} x {result['captions']})")
        for name, row in result["variants"].items():
            print(f"  {name:<20} max|diff| {row['max_abs_diff']:.3g}  top-{row['top_k']} overlap {row['topk_overlap']:.3f}  "
                  f"Kendall tau {row['kendall_tau']:.4f}")
    artifact = report["precision"].get("artifact", {})
    if "skipped" in artifact:
        print(f"\nprecision on the reference model: SKIPPED ({artifact['skipped']})")
    print()
    print_end_to_end(report["end_to_end"])


@command
def main(argv: list[str] | None = None) -> int:

    parser = ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset that finishes in < 5 minutes on 2 cores")
    parser.add_argument("--json", type=output_file, required=True, help="the report (written atomically)")
    parser.add_argument("--plots", type=Path, default=None, help="PNG directory (default: OUT-plots beside the JSON)")
    parser.add_argument("--presets", nargs="+", choices=("demo", "flickr8k", "paper"), default=None)
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", default="1",
                        help=f"intra-op threads of every scorer but the engine's (default 1: ratios per core), or auto: 1 or "
                             f"{DEFAULT_THREADS}, whichever GEMMs run faster now")
    args = parser.parse_args(argv)
    if args.threads != "auto" and (not args.threads.isdigit() or int(args.threads) < 1):
        print(f"error: --threads {args.threads!r}: expected a positive integer or auto", file=sys.stderr)
        return 2
    config = QUICK if args.quick else RunConfig()
    if args.presets:
        config = RunConfig(**{**config.__dict__, "presets": tuple(args.presets)})
    plots = args.plots or args.json.with_name(args.json.stem + "-plots")
    with tempfile.TemporaryDirectory(prefix="bssan-bench-") as work:
        report = run(config, args.artifact, args.model, args.store, args.data, args.threads, Path(work))
    print_summary(report)
    print_targets(report["targets"])
    write_json_atomic(args.json, report)
    from benchmarks.plots import write_plots

    written = write_plots(report, plots)
    print(f"\n{args.json}: report; {len(written)} plots in {plots}; {report['seconds']:.0f} s; {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
