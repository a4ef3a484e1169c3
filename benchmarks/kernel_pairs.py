"""The W2R kernel's pooled pairs over fresh images: microseconds per pair, for one or more builds of the kernel.

    python -m engine.kernels build
    python -m benchmarks.kernel_pairs --artifact build/artifacts/reference [--library OLD.so NEW.so] \
        [--images 8091] [--pairs 64] [--rounds 150] --out results/benchmarks/kernel_pairs

What a re-rank costs per pair, without the rest of a query: each call scores `--pairs` captions (random word rows,
8-15 words) against as many images drawn at random from `--images` random image rows of the artifact's sizes
(regions_attn [D, E], regions_values [D, 4H]: ~175 KB an image at the reference sizes, so each call reads its images
from memory, as a re-rank over a large gallery does), on one thread. The builds run in a random order in every round,
each on its own fresh images, and their scores on the same inputs are compared first (max |diff|). Several builds of
the same source (another commit's w2r_grid.c compiled with engine.kernels.FLAGS) make an A/B; the default is this
machine's build of the current source. Prints and writes OUT/kernel_pairs.json and OUT/kernel_pairs.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info
from engine.cli import ArgumentParser, command, positive_int
from engine.files import write_json_atomic


def run(artifact: Path, libraries: list[Path], images: int, pairs: int, rounds: int, seed: int = 0) -> dict:
    from engine.artifact import load_artifact
    from engine.kernels import W2RKernel, load_library

    art = load_artifact(artifact)
    kernels = [W2RKernel.from_artifact(art, library=load_library(path)) for path in libraries]
    first = kernels[0]
    hidden, config = first.hidden, art.info.model.config
    hidden4, regions, word_dim = 4 * hidden, int(config["region_count"]), int(config["word_dim"])
    # regions_values: G = R W_ih_u^T [D, 4H]; a "regions" artifact's rows are R itself [D, M], projected per call
    value_dim = hidden4 if first.input_weight_u_t is None else first.input_weight_u_t.shape[0]
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((images, regions, word_dim), dtype=np.float32) * 0.05  # [I, D, E]
    values = rng.standard_normal((images, regions, value_dim), dtype=np.float32) * 0.05  # [I, D, 4H] (or [I, D, M])
    lengths = rng.integers(8, 16, pairs).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    words = rng.standard_normal((int(lengths.sum()), word_dim), dtype=np.float32) * 0.1
    gates = rng.standard_normal((int(lengths.sum()), hidden4), dtype=np.float32) * 0.1
    rows = rng.choice(images, pairs, replace=False)
    scores = [k.run(keys, values, words, gates, lengths, offsets, image_rows=rows)[0] for k in kernels]
    seconds: list[list[float]] = [[] for _ in kernels]
    for _ in range(rounds):
        for j in rng.permutation(len(kernels)):
            rows = rng.choice(images, pairs, replace=False)
            started = time.perf_counter()
            kernels[j].run(keys, values, words, gates, lengths, offsets, image_rows=rows)
            seconds[j].append(time.perf_counter() - started)
    out = {"machine": machine_info(), "artifact": str(artifact), "images": images, "pairs_per_call": pairs, "rounds": rounds,
           "sizes": {"regions": regions, "word_dim": word_dim, "hidden": hidden, "image_kb": round(regions * (word_dim + value_dim) * 4 / 1024, 1)},
           "builds": []}
    for path, score, times in zip(libraries, scores, seconds):
        per_pair = np.asarray(times) / pairs * 1e6
        build = {"library": str(path), "us_per_pair_median": round(float(np.median(per_pair)), 2),
                 "us_per_pair_p10": round(float(np.percentile(per_pair, 10)), 2),
                 "us_per_pair_p90": round(float(np.percentile(per_pair, 90)), 2),
                 "max_abs_diff_vs_first": float(np.abs(score - scores[0]).max())}
        out["builds"].append(build)
        print(f"{Path(path).name}: {build['us_per_pair_median']} us a pair (p10 {build['us_per_pair_p10']}, p90 "
              f"{build['us_per_pair_p90']}), max |diff| vs the first {build['max_abs_diff_vs_first']:.2e}", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    builds = report["builds"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(builds), 4))
    x = np.arange(len(builds))
    medians = [b["us_per_pair_median"] for b in builds]
    errors = [[m - b["us_per_pair_p10"] for m, b in zip(medians, builds)], [b["us_per_pair_p90"] - m for m, b in zip(medians, builds)]]
    bars = ax.bar(x, medians, 0.6, yerr=errors, capsize=4)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, labels=[Path(b["library"]).stem[-24:] for b in builds], fontsize=7, rotation=15)
    ax.set(ylabel="us per pair (median, p10-p90)", title=f"W2R kernel, pooled pairs over fresh images ({report['pairs_per_call']} a call)")
    ax.grid(alpha=.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@command
def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.kernel_pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=REPO_ROOT / "build" / "artifacts" / "reference")
    p.add_argument("--library", type=Path, nargs="+", help="kernel builds to compare (default: this machine's build of the current source)")
    p.add_argument("--images", type=positive_int, default=8091)
    p.add_argument("--pairs", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=150)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "kernel_pairs")
    args = p.parse_args(argv)
    from engine.kernels import build

    libraries = args.library or [build()]
    for path in libraries:
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such kernel library (build one with python -m engine.kernels build)")
    report = run(args.artifact, libraries, args.images, args.pairs, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "kernel_pairs.json", report)
    plot(report, args.out / "kernel_pairs.png")
    print(f"wrote {args.out / 'kernel_pairs.json'} and {args.out / 'kernel_pairs.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
