"""One process vs Ray local (2 workers) for the two batch jobs: images/s, pairs/s, and Ray's overhead per row.

    python -m benchmarks.ray_scaling [--data ../shared/data/flickr8k] [--assets build/assets] [--images 48]
        [--batch 8] [--model build/artifacts/reference] [--store /work/stores/flickr8k] [--score-images 32]
        [--score-captions 320] --json results/ray/scaling.json [--plot results/ray/scaling.png]

- extraction: `engine.features.extract` on the first --images photos of Flickr8K's test split (image arrays
  only: word features run on the driver either way) in one process (2 threads) vs `extract_on_ray` on a
  local Ray instance of 2 CPUs, 2 workers of 1 thread; the two stores must be byte-identical.
- scoring: the reference artifact's exhaustive score matrix of --score-images x --score-captions of the
  Flickr8K store's test split, in engine.score's journal units (UNIT_IMAGES rows), one process (2 threads)
  vs a ScorePool of 2 workers of 1 thread; the matrices must be byte-identical.
- overhead: a worker that returns a zero array of a unit's result size at once, through the same
  Cluster.run: what Ray adds per unit (scheduling, pickling, the object store) and per row.
Each Ray figure is given end to end (actor start-up included; Ray's own start-up is reported apart)
and steady (from the first unit's result to the last). The per-node figure is a PROJECTION: cores x
(1 / CPU seconds per image or pair measured in one process), assuming one 1-thread worker per core and
no contention; it is labelled as such in the JSON. The machine is shared: load averages are recorded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "flickr8k"
LOCAL_CPUS = 2  # this machine's cores: the local instance has them all
WORKERS = 2


class EchoWorker:
    """A worker that does nothing but return `shape` zeros of float32: Ray's cost of a unit alone."""

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)

    def run(self, work):
        return np.zeros(self.shape, dtype=np.float32)


def timed_units(results, count: int) -> dict:
    """Drain `results` (an iterator of `count` units); wall, time to the first unit, steady time after it."""
    start = time.perf_counter()
    stamps = []
    out = []
    for result in results:
        stamps.append(time.perf_counter() - start)
        out.append(result)
    assert len(out) == count
    steady = (stamps[-1] - stamps[0]) / (count - 1) if count > 1 else None
    return {"wall_s": stamps[-1], "first_unit_s": stamps[0], "steady_s_per_unit": steady, "results": out}


def gallery(data: Path, count: int, root: Path) -> tuple[Path, Path]:
    names = [n.strip() for n in (data / "split_test.txt").read_text().splitlines() if (data / "images" / n.strip()).is_file()][:count]
    (root / "images").mkdir(parents=True)
    for name in names:
        (root / "images" / name).symlink_to(data / "images" / name)
    (root / "split_test.txt").write_text("".join(n + "\n" for n in names))
    keep = set(names)
    lines = [line for line in (data / "captions.txt").read_text(encoding="utf-8").splitlines() if line.split("#")[0] in keep]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "images", root / "captions.txt"


def store_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def bench_extraction(args, work: Path) -> dict:
    from engine.distributed.features import extract_on_ray
    from engine.features import ExtractConfig, extract

    images, captions = gallery(args.data, args.images, work / "gallery")
    config = ExtractConfig(images=images, captions=captions, out=work / "one", splits=("test",), assets=args.assets,
                           word_features=(), batch_size=args.batch, threads=LOCAL_CPUS)
    cpu0, start = time.process_time(), time.perf_counter()
    extract(config)
    one_wall, one_cpu = time.perf_counter() - start, time.process_time() - cpu0
    stamps: list[float] = []
    start = time.perf_counter()
    extract_on_ray(dataclasses.replace(config, out=work / "ray", threads=1), "local", WORKERS,
                   observe=lambda split, b: stamps.append(time.perf_counter() - start))
    ray_wall = time.perf_counter() - start
    n, batches = args.images, len(stamps)
    steady = (n - min(args.batch, n)) / (stamps[-1] - stamps[0]) if batches > 1 else None
    return {"images": n, "batch": args.batch, "units": batches,
            "one_process": {"threads": LOCAL_CPUS, "wall_s": one_wall, "images_per_s": n / one_wall,
                            "cpu_s_per_image": one_cpu / n},
            "ray_local": {"workers": WORKERS, "threads_per_worker": 1, "wall_s": ray_wall, "images_per_s": n / ray_wall,
                          "first_batch_s": stamps[0], "steady_images_per_s": steady},
            "identical_store": store_bytes(work / "one") == store_bytes(work / "ray")}


def bench_scoring(args) -> dict:
    from engine.distributed.score import ScorePool
    from engine.journal import UNIT_IMAGES
    from engine.runtime import Scorer
    from engine.store import FeatureStore

    split = FeatureStore(args.store).split("test")
    m, c = args.score_images, args.score_captions
    load = {"artifact_dir": args.model, "backend": "onnxruntime-cpu", "threads": LOCAL_CPUS}
    with Scorer.load(**load) as scorer:
        images = scorer.encode_image_features(split.regions[:m], split.objects[:m])
        word_set = scorer.artifact.manifest.get("word_features", {}).get("name", "glove50")
        captions = scorer.encode_word_features(split.words(word_set)[:c], split.lengths[:c])
        units = [np.arange(s, min(s + UNIT_IMAGES, m)) for s in range(0, m, UNIT_IMAGES)]
        cpu0 = time.process_time()
        one = timed_units((scorer.score_grid(images, captions, image_rows=rows, fuse=False) for rows in units), len(units))
        one_cpu = time.process_time() - cpu0
    pool = ScorePool("local", WORKERS, {**load, "threads": 1})
    pool.use_caches(images, captions)
    ray = timed_units(pool.score_grid(units), len(units))
    pairs, unit_pairs = m * c, UNIT_IMAGES * c
    same = all(np.array_equal(a, b) and a.tobytes() == b.tobytes() for a, b in zip(one.pop("results"), ray.pop("results")))
    return {"images": m, "captions": c, "pairs": pairs, "units": len(units), "pairs_per_unit": unit_pairs,
            "one_process": {"threads": LOCAL_CPUS, **one, "pairs_per_s": pairs / one["wall_s"], "cpu_s_per_pair": one_cpu / pairs},
            "ray_local": {"workers": WORKERS, "threads_per_worker": 1, **ray, "pairs_per_s": pairs / ray["wall_s"],
                          "steady_pairs_per_s": unit_pairs / ray["steady_s_per_unit"] if ray["steady_s_per_unit"] else None},
            "identical_scores": same}


def bench_overhead(units: int, shape: list[int], rows_per_unit: int, what: str) -> dict:
    from engine.distributed import Cluster

    cluster = Cluster.connect("local", 1, WORKERS)
    timing = timed_units(cluster.run(EchoWorker, {"shape": shape}, [{}] * units, what), units)
    timing.pop("results")
    per_unit = timing["steady_s_per_unit"]
    return {"units": units, "payload_bytes": int(np.prod(shape)) * 4, "rows_per_unit": rows_per_unit, **timing,
            "overhead_s_per_row": per_unit / rows_per_unit if per_unit else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "extraction", "images_per_s"), (axes[1], "scoring", "pairs_per_s")):
        part = result[key]
        steady = "steady_images_per_s" if unit == "images_per_s" else "steady_pairs_per_s"
        labels = ["1 process\n2 threads", "Ray local\n2 workers x 1\nend to end", "Ray local\nsteady"]
        values = [part["one_process"][unit], part["ray_local"][unit], part["ray_local"][steady] or 0.0]
        bars = ax.bar(labels, values, color=["#4477aa", "#ee6677", "#ccbb44"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(f"{key}: {unit.replace('_per_s', '/s')}")
    load = result["machine"]["load_average_at_start"]
    fig.suptitle(f"one process vs Ray local on {result['machine']['cores']} cores (shared machine, load at start "
                 f"{load[0]:.1f}, at end {result['load_average_at_end'][0]:.1f})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.ray_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--assets", type=Path, default=REPO_ROOT / "build" / "assets")
    parser.add_argument("--images", type=positive_int, default=48)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "build" / "artifacts" / "reference")
    parser.add_argument("--store", type=Path, default=REPO_ROOT.parent / "stores" / "flickr8k")
    parser.add_argument("--score-images", type=positive_int, default=32)
    parser.add_argument("--score-captions", type=positive_int, default=320)
    parser.add_argument("--json", type=output_file, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    import ray

    result = {"machine": machine_info(LOCAL_CPUS)}
    start = time.perf_counter()
    ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, log_to_driver=False)
    result["ray"] = {"version": ray.__version__, "init_s": time.perf_counter() - start, "local_cpus": LOCAL_CPUS}
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    try:
        result["extraction"] = bench_extraction(args, work)
        print("extraction:", {k: v for k, v in result["extraction"].items()}, flush=True)
        result["scoring"] = bench_scoring(args)
        print("scoring:", result["scoring"], flush=True)
        units = result["extraction"]["units"] * 3
        result["overhead"] = {
            "extraction_batch": bench_overhead(units, [args.batch, 49 + 10, 1280], args.batch, "echo batches"),
            "scoring_unit": bench_overhead(units, [8, args.score_captions], 8 * args.score_captions, "echo units"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    cores = os.cpu_count() or 1
    result["projection_per_node"] = {
        "label": "PROJECTION, not measured: cores x (1 / CPU seconds per item measured in one process); assumes one "
                 "1-thread worker per core, no contention, the driver and storage keeping up",
        "per_16_core_node_images_per_s": 16 / result["extraction"]["one_process"]["cpu_s_per_image"],
        "per_16_core_node_pairs_per_s": 16 / result["scoring"]["one_process"]["cpu_s_per_pair"],
        "this_machine_cores": cores,
    }
    result["load_average_at_end"] = list(os.getloadavg())
    write_json_atomic(args.json, result)
    print(f"{args.json}: written")
    if args.plot:
        plot(result, args.plot)
        print(f"{args.plot}: written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
