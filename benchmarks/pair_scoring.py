"""Pair-scoring speed: pairs/s, latency (median, p90), FLOPs, GFLOP/s and fraction of peak of every scorer.

    python -m benchmarks.pair_scoring --preset paper --lengths 12 30 --batches 16 256 --json OUT.json
    from benchmarks.pair_scoring import SweepConfig, sweep_preset, real_length_pass
    result = sweep_preset("flickr8k", SweepConfig(lengths=(8, 30), batches=(64,)), peaks, work_dir)

Per preset: one random-weight model (seed 0: speed does not depend on the weights; the run says
so), one random image and the captions of the sweep. For each caption length L (every caption
exactly L words) and batch B (pairs per call = 1 image x B captions, the grid-block call the
engine makes), every scorer (benchmarks/scorers.py) is timed on the same rows: a warm-up call,
then `repeats` calls; latency is per call, throughput = B / median. FLOPs per pair come from
benchmarks/flops.py (the paper-as-written model always runs max_words = 30 W2R steps); the
fraction of peak is the roofline floor (each stage's GEMMs at the measured peak of its precision)
over the measured time. "max_abs_diff_vs_paper" checks that every scorer gives the baseline's scores.

`real_length_pass` scores REAL_IMAGES image rows against captions whose lengths follow Flickr8K
test (bucketed: sorted by length, fixed blocks of `real_block` captions, each sliced to its longest
caption), the baseline padding every caption to 30, and times the whole pass of each scorer in
interleaved rounds (min / median / max and the process CPU time per pass are reported). Its scorers are the
sweep's (REAL_SCORERS), `kernel` among them: the engine's fused W2R kernel path on one thread, skipped with the reason
where the kernel cannot be built or run, like torch-bf16 without bf16 instructions.
Every scorer runs on `threads` intra-op threads (default 1: ratios per core) except `engine`, which runs
as a user gets it (engine.runtime.Scorer, threads=None: concurrent one-thread calls on every core).
Cache costs (image and caption graphs) are timed once and amortised over the 1K x 5K protocol
in "protocol_pairs_per_s": pairs / (images x image_s + captions x caption_s + pairs / pair rate).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import DEFAULT_THREADS, machine_info, set_threads, time_round_robin, write_json_atomic
from benchmarks.flops import factored_pair_flops, flops_by_precision, peak_fraction, reference_pair_flops, total_flops
from benchmarks.scorers import SCORER_NAMES, Scorer, ScorerUnavailable, export_graphs, make_scorer, random_inputs, random_model
from engine.runtime import DEFAULT_PAIRS_PER_CALL  # noqa: E402
from engine.cli import ArgumentParser, command, output_file, positive_int

PROTOCOL_IMAGES, PROTOCOL_CAPTIONS = 1000, 5000  # the 1K-image test protocol, 5 captions per image
SPEED_SCORERS = ("paper-eager", "factored-eager", "torch-bf16", "ort-fp32-pair", "ort-fp32", "ort-int8-recurrence",
                 "ort-int8-projection", "kernel", "engine")  # kernel: the engine's fused W2R kernel path on one thread
REAL_SCORERS = SPEED_SCORERS  # the real-length pass: the same scorers
REAL_IMAGES = 2  # image rows of the real-length pass: the engine runs its calls on every core (one image row per call)


@dataclass
class SweepConfig:
    lengths: tuple[int, ...] = (8, 12, 20, 30)  # the caption lengths
    batches: tuple[int, ...] = (1, 16, 64, 256)  # pairs per call; 256 captions per image is ARCHITECTURE's protocol
    repeats: int = 5
    min_calls: int = 3  # timed calls per point at least
    max_seconds: float = 4.0  # per point: a slow scorer stops after min_calls calls past this
    scorers: tuple[str, ...] = SPEED_SCORERS
    real_scorers: tuple[str, ...] = REAL_SCORERS  # the real-length pass's scorers
    threads: int = 1  # intra-op threads of every scorer but `engine` (which runs as a user gets it: threads=None)
    seed: int = 0
    real_block: int = DEFAULT_PAIRS_PER_CALL  # captions per call in the real-length pass, every scorer (the engine's; fixed)
    real_min_seconds: float = 3.0  # real-length pass: rounds continue until every scorer has this much timed


def stage_flops(scorer: Scorer, config, length: int) -> dict:
    if scorer.route == "reference":
        return reference_pair_flops(config, length)
    return factored_pair_flops(config, length, scorer.route)


def measure(scorer: Scorer, config, rows: np.ndarray, lengths: np.ndarray, peaks: dict, timing: dict) -> dict:
    """A timing of scorer.score(rows) with FLOPs per pair at the rows' lengths (bucket = longest) and fraction of peak."""
    length = int(lengths[rows].max())
    stages = stage_flops(scorer, config, length)
    flops = total_flops(stages)
    seconds_per_pair = timing["median_s"] / len(rows)
    split = flops_by_precision(stages, scorer.precision_of)
    return {"pairs_per_s": len(rows) / timing["median_s"], "latency_median_s": timing["median_s"],
            "latency_p90_s": timing["p90_s"], "latency_min_s": timing["min_s"], "latency_max_s": timing["max_s"],
            "pairs_per_cpu_s": len(rows) / timing["cpu_median_s"] if timing.get("cpu_median_s") else None,
            "calls": timing["calls"], "flops_per_pair": flops,
            "gflops_per_s": flops / seconds_per_pair / 1e9, "flops_per_pair_by_precision": split,
            "fraction_of_peak": peak_fraction(split, peaks, seconds_per_pair), "precision_of": scorer.precision_of or "fp32"}


def protocol_rate(pairs_per_s: float, cache: dict, images: int = PROTOCOL_IMAGES, captions: int = PROTOCOL_CAPTIONS) -> float:
    pairs = images * captions
    return pairs / (images * cache["image_s"] + captions * cache["caption_s"] + pairs / pairs_per_s)


def usable_scorers(names: tuple[str, ...], peaks_report: dict, route: str) -> tuple[list[str], dict[str, str]]:
    """Scorers to run and {skipped: reason}: bf16 only with native bf16; int8-projection only where the
    pair graph has the projection (values = regions; with gates it is the int8-recurrence graph)."""
    run, skipped = [], {}
    probe = peaks_report.get("bf16_probe", {})
    for name in names:
        if name == "torch-bf16" and not probe.get("native", False):
            skipped[name] = (f"no native bf16 on this CPU (flags {probe.get('cpu_bf16_flags')}): torch bf16 matmul "
                             f"{probe.get('bf16_flops_per_s', 0) / 1e9:.2f} GFLOP/s vs fp32 {probe.get('fp32_flops_per_s', 0) / 1e9:.1f}")
        elif name == "ort-int8-projection" and route == "gates":
            skipped[name] = "the pair graph has no u W_ih_u^T projection (values = gates): same graph as ort-int8-recurrence"
        else:
            run.append(name)
    return run, skipped


def build_scorers(names: list[str], skipped: dict[str, str], model, threads: int, work: Path) -> list[Scorer]:
    """The scorers `names` on `model`, with the ONNX graphs they need exported into `work` (the kernel reads w2r_grid
    and runs the fp32 graphs); one that cannot run here (ScorerUnavailable: the kernel without a C compiler) goes
    into `skipped` with the reason."""
    precisions = tuple(dict.fromkeys(n[4:].replace("fp32-pair", "fp32") for n in names if n.startswith("ort-")))
    if "kernel" in names and "fp32" not in precisions:
        precisions = ("fp32", *precisions)
    graphs = export_graphs(model, work, precisions) if precisions else {}
    scorers = []
    for name in names:
        try:
            scorers.append(make_scorer(name, model, graphs, threads, work=work))
        except ScorerUnavailable as exc:
            skipped[name] = str(exc)
    return scorers


def sweep_preset(preset_name: str, sweep: SweepConfig, peaks_report: dict, work: Path, progress: bool = True) -> dict:
    """Every scorer x caption length x batch of one preset; see the module docstring."""
    set_threads(sweep.threads)
    peaks = peaks_report["peak"]
    model = random_model(preset_name, sweep.seed)
    route = "gates" if model.w2r.pair_gathers_gates else "regions"
    names, skipped = usable_scorers(sweep.scorers, peaks_report, route)
    scorers = build_scorers(names, skipped, model, sweep.threads, work / preset_name)
    lengths = [n for n in sweep.lengths if n <= model.config.max_words]  # a preset with max_words < 30 (demo) skips the rest
    result = {"preset": preset_name, "config": model.config.to_dict(), "weights": f"random (seed {sweep.seed})",
              "ort_pair_graph_values": route, "skipped": skipped, "lengths": lengths, "points": [], "cache_seconds": {}}
    bar = tqdm(total=len(lengths) * len(sweep.batches) * len(scorers), desc=f"pairs {preset_name}",
               unit="point", disable=not progress)  # scorers are timed in turns (common.time_round_robin)
    for length in lengths:
        inputs = random_inputs(model.config, np.full(max(sweep.batches), length), seed=sweep.seed + length)
        caches = {s.name: s.prepare(inputs) for s in scorers}
        result["cache_seconds"][f"L{length}"] = caches
        for batch in sweep.batches:
            rows = np.arange(batch)
            baseline = None
            timings = time_round_robin({s.name: (lambda s=s: s.score(rows)) for s in scorers}, repeats=sweep.repeats,
                                       max_seconds=sweep.max_seconds, min_calls=sweep.min_calls)
            for scorer in scorers:
                point = {"length": length, "batch": batch, "scorer": scorer.name,
                         **measure(scorer, model.config, rows, inputs.lengths, peaks, timings[scorer.name])}
                point["protocol_pairs_per_s"] = protocol_rate(point["pairs_per_s"], caches[scorer.name])
                scores = scorer.score(rows)
                baseline = scores if baseline is None else baseline
                point["max_abs_diff_vs_paper"] = float(np.abs(scores - baseline).max()) if scorers[0].name == "paper-eager" else None
                result["points"].append(point)
            bar.update(len(scorers))
    bar.close()
    result["engine_reason"] = next((s.reason for s in scorers if s.name == "engine"), None)
    for scorer in scorers:
        getattr(scorer, "close", lambda: None)()
    return result


def best_batches(result: dict, length: int) -> dict[str, int]:
    """{scorer: the batch with the highest pairs/s} of a sweep_preset result at the swept length nearest `length`."""
    nearest = min(result["lengths"], key=lambda n: abs(n - length))
    best: dict[str, tuple[float, int]] = {}
    for p in result["points"]:
        if p["length"] == nearest and p["pairs_per_s"] > best.get(p["scorer"], (0.0, 0))[0]:
            best[p["scorer"]] = (p["pairs_per_s"], p["batch"])
    return {name: batch for name, (_, batch) in best.items()}


def real_length_pass(preset_name: str, lengths: np.ndarray, sweep: SweepConfig, peaks_report: dict, work: Path,
                     progress: bool = True, images: int = REAL_IMAGES) -> dict:
    """`images` image rows x len(lengths) captions of real lengths, every scorer, whole pass timed in interleaved
    rounds (at least sweep.repeats, more until each scorer has sweep.real_min_seconds timed; a slow scorer stops
    after 3 passes past sweep.max_seconds * 2). Captions are sorted by length and cut into blocks of
    sweep.real_block captions per call, each sliced to its longest caption (a bucket), except for the
    paper-as-written scorer, which pads every caption to 30. The same blocks for every scorer: no batch choice."""
    set_threads(sweep.threads)
    peaks = peaks_report["peak"]
    one_thread = peaks_report.get("peak_1thread", peaks)
    model = random_model(preset_name, sweep.seed)
    route = "gates" if model.w2r.pair_gathers_gates else "regions"
    names, skipped = usable_scorers(sweep.real_scorers, peaks_report, route)
    scorers = build_scorers(names, skipped, model, sweep.threads, work / preset_name)
    names = [scorer.name for scorer in scorers]
    inputs = random_inputs(model.config, lengths, seed=sweep.seed + 1000)
    order = np.argsort(lengths, kind="stable")
    blocks = [order[i:i + sweep.real_block] for i in range(0, len(order), sweep.real_block)]  # buckets: sorted runs
    result = {"preset": preset_name, "captions": int(len(lengths)), "images": images, "block": sweep.real_block,
              "threads": sweep.threads, "skipped": skipped, "mean_length": float(np.mean(lengths)), "scorers": {}}
    prepared = {}
    for scorer in scorers:
        name = scorer.name
        cache = scorer.prepare(inputs)
        scores = np.empty((images, len(lengths)), np.float32)
        scorer.score_pass(blocks[-1:], 1, np.empty((1, len(lengths)), np.float32))  # warm-up: sessions, first allocations
        prepared[name] = (scorer, cache, scores)
    bar = tqdm(desc=f"real lengths {preset_name}", unit="pass", disable=not progress)

    def whole_pass(name: str) -> None:
        scorer, _, scores = prepared[name]
        scorer.score_pass(blocks, images, scores)
        bar.update(1)

    # at least 5 passes of every scorer (the slowest included: ~5 s per pass for paper-eager), more for the fast ones
    timings = time_round_robin({name: (lambda name=name: whole_pass(name)) for name in names}, repeats=max(5, sweep.repeats),
                               warmup=0, max_seconds=sweep.max_seconds * 2, min_calls=5, min_seconds=sweep.real_min_seconds)
    bar.close()
    result["rounds"] = timings.pop("_rounds")
    baseline_scores = prepared[names[0]][2]
    pairs = images * len(lengths)
    for name in names:
        scorer, cache, scores = prepared[name]
        timing = timings[name]
        split: dict[str, float] = {}
        for rows in blocks:  # each bucket runs its longest caption's steps
            for precision, value in flops_by_precision(stage_flops(scorer, model.config, int(lengths[rows].max())),
                                                       scorer.precision_of).items():
                split[precision] = split.get(precision, 0.0) + value * len(rows) / len(lengths)
        flops = sum(split.values()) * pairs
        pairs_per_s = pairs / timing["median_s"]
        every_core = name == "engine"  # the engine uses every core; every other scorer one thread (sweep.threads)
        result["scorers"][name] = {
            "block": sweep.real_block, "pass_s": timing["median_s"], "pass_p90_s": timing["p90_s"], "pass_min_s": timing["min_s"],
            "pass_max_s": timing["max_s"], "pass_cpu_s": timing.get("cpu_median_s"), "calls": timing["calls"],
            "pairs_per_s": pairs_per_s, "pairs_per_s_min": pairs / timing["max_s"], "pairs_per_s_max": pairs / timing["min_s"],
            "pairs_per_cpu_s": pairs / timing["cpu_median_s"] if timing.get("cpu_median_s") else None,
            "protocol_pairs_per_s": protocol_rate(pairs_per_s, cache), "flops_per_pair": flops / pairs,
            "gflops_per_s": flops / timing["median_s"] / 1e9, "flops_per_pair_by_precision": split,
            "threads": "engine default (every core)" if every_core else sweep.threads,
            "peak_used": "peak" if every_core or sweep.threads > 1 else "peak_1thread",
            "fraction_of_peak": peak_fraction(split, peaks if every_core or sweep.threads > 1 else one_thread, timing["median_s"] / pairs),
            "precision_of": scorer.precision_of or "fp32",
            "max_abs_diff_vs_paper": float(np.abs(scores - baseline_scores).max()) if names[0] == "paper-eager" else None}
        if name == "engine":
            result["scorers"][name]["reason"] = scorer.reason
        getattr(scorer, "close", lambda: None)()
    return result


@command
def main(argv: list[str] | None = None) -> int:
    from benchmarks.peak import format_peaks, measure_peaks
    from training.config import PRESETS, preset

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the legacy exporter's C++ shape-inference warnings
    parser = ArgumentParser(prog="python -m benchmarks.pair_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default flickr8k")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[12, 30])
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[64])
    parser.add_argument("--scorers", nargs="+", choices=SCORER_NAMES, default=list(SPEED_SCORERS))
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS)
    parser.add_argument("--json", type=output_file, required=True)
    args = parser.parse_args(argv)
    presets = args.preset or ["flickr8k"]
    for name in presets:
        too_long = [n for n in args.lengths if not 1 <= n <= preset(name).max_words]
        if too_long:
            print(f"error: --lengths {too_long}: expected 1..{preset(name).max_words} words at preset {name}", file=sys.stderr)
            return 2
    if min(args.batches) < 1 or args.repeats < 1 or args.threads < 1:
        print("error: --batches, --repeats and --threads must be positive", file=sys.stderr)
        return 2
    sweep = SweepConfig(lengths=tuple(args.lengths), batches=tuple(args.batches), repeats=args.repeats,
                        scorers=tuple(args.scorers), threads=args.threads)
    peaks = measure_peaks(tuple(sorted({preset(n).w2r_hidden for n in presets})), max(args.batches), args.threads, square=False)
    print(format_peaks(peaks))
    with tempfile.TemporaryDirectory(prefix="bssan-bench-") as work:
        results = [sweep_preset(name, sweep, peaks, Path(work)) for name in presets]
    for result in results:
        for p in result["points"]:
            print(f"{result['preset']:<9} L={p['length']:<3} B={p['batch']:<4} {p['scorer']:<20} {p['pairs_per_s']:9.1f} pairs/s "
                  f"p50 {p['latency_median_s'] * 1e3:8.2f} ms p90 {p['latency_p90_s'] * 1e3:8.2f} ms "
                  f"{p['gflops_per_s']:6.1f} GFLOP/s {100 * p['fraction_of_peak']:5.1f}% of peak")
    write_json_atomic(args.json, {"machine": machine_info(args.threads), "peak": peaks, "pair_scoring": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
