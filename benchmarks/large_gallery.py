"""Peak memory of `python -m engine.score` on large synthetic galleries: in memory vs --image-shards.

    python -m benchmarks.large_gallery [--images 50000 200000 1000000] [--captions 100] [--shortlist-k 20]
        [--shard-size 2048] [--work DIR] [--max-seconds 1800] [--real-store /work/stores/flickr8k --real-split train]
        --json results/ray/large_gallery.json [--plot results/ray/large_gallery.png]

The gallery: a feature store of N synthetic images with C captions (the test suite's generator: image classes shared
with their captions, small feature sizes), and an artifact exported here from a randomly initialised BSSAN + dual
encoder of the "demo" preset. The command, its code paths and its output are the real ones; only the per-image sizes
are small (the cache row is measured and reported), which is what keeps a million images within minutes here.

For each N, two runs of the same command, each in its own process (`--direction t2i --shortlist-k K --top-k 10 --out`):
in memory (the whole ImageCache encoded in RAM), then with `--image-shards` (a fresh shard folder). Each run's peak
resident set comes from wait4 (ru_maxrss: the most RAM the process held, file-backed pages of its memory maps
included), with its wall time; the two outputs must be byte-identical. A run is skipped once --max-seconds of the
whole benchmark have passed. The JSON also gives, for the reference artifact's real sizes, what the in-memory run would
hold (N x its cache row) against the sharded run's bound (a shard being encoded) - labelled a PROJECTION: computed,
not measured. Times are wall clock on a shared machine (load averages recorded); peak memory does not depend on load.

--real-store: the same two runs at real sizes, on a split of a real feature store (Flickr8K's train split: 6,000 photos)
through the reference artifact (build/artifacts/reference: fused scores, MiniLM queries), with three --query captions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

CHUNK = 100_000  # images generated at a time
REFERENCE = REPO_ROOT / "build" / "artifacts" / "reference"


def build_store(root: Path, images: int, captions: int, seed: int = 0) -> Path:
    """N images (regions 9x16, objects 4x16: the demo preset) and C captions of the first C images (GloVe-sized words),
    image and caption features sharing a latent class, written chunk by chunk."""
    from engine.store import StoreWriter

    rng = np.random.default_rng(seed)
    classes, regions, objects, dim, words, word_dim = 6, 9, 4, 16, 8, 12
    region_proto, object_proto, word_proto = (rng.normal(size=(classes, d)) for d in (dim, dim, word_dim))
    writer = StoreWriter(root, extractor={"name": "synthetic", "seed": seed})
    label = rng.integers(0, classes, size=images)
    r = writer.open_array("test", "regions", (images, regions, dim))
    o = writer.open_array("test", "objects", (images, objects, dim))
    b = writer.open_array("test", "boxes", (images, objects, 4))
    for start in range(0, images, CHUNK):
        n, part = min(CHUNK, images - start), label[start:start + CHUNK]
        r[start:start + n] = region_proto[part][:, None, :] * rng.uniform(0, 2, size=(n, regions, 1)) + rng.normal(size=(n, regions, dim))
        o[start:start + n] = object_proto[part][:, None, :] + rng.normal(size=(n, objects, dim))
        b[start:start + n] = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    writer.open_array("test", "objects_real", (images,))[:] = objects
    owner = np.arange(captions, dtype=np.int32) % images
    writer.open_array("test", "caption_image", (captions,))[:] = owner
    lengths = rng.integers(2, words + 1, size=captions).astype(np.int32)
    writer.open_array("test", "lengths", (captions,))[:] = lengths
    w = rng.normal(size=(captions, words, word_dim)) + word_proto[label[owner]][:, None, :]
    w[np.arange(words)[None, :] >= lengths[:, None]] = 0.0
    writer.open_array("test", "words_glove50", (captions, words, word_dim))[:] = w
    writer.write_lines("test", "image_names", [f"img_{i:07d}.jpg" for i in range(images)])
    writer.write_lines("test", "captions", [f"caption {j} of image {owner[j]}" for j in range(captions)])
    writer.finish_split("test", {"images": images, "captions": captions})
    return root


def build_artifact(root: Path, store: Path) -> Path:
    """A random BSSAN + dual encoder of the demo preset, exported (as tests/engine/conftest.py's tiny artifact)."""
    import torch

    from engine.store import FeatureStore
    from export.pipeline import ExportOptions, export_artifact
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset
    from training.model import BSSAN

    torch.manual_seed(0)
    model = BSSAN(preset("demo")).eval()
    shortlist = DualEncoder(dual_encoder_preset("demo")).eval()
    features = FeatureStore(store)
    bssan = save_checkpoint(root / "bssan", model, TrainConfig(), store=features)
    dual = save_checkpoint(root / "shortlist", shortlist, TrainConfig(), store=features)
    export_artifact(ExportOptions(model_dir=bssan, out=root / "artifact", precisions=("fp32",), shortlist_dir=dual,
                                  tensorrt="off", assets_dir=None, progress=False))
    return root / "artifact"


# wait4 in a small launcher: a child forked from this process (torch loaded) would report this process's pages as its peak
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, usage.ru_utime, usage.ru_stime, os.waitstatus_to_exitcode(status))
"""


def run(argv: list[str], log: Path) -> dict:
    """One engine.score process: peak RSS (wait4's ru_maxrss), wall time, CPU time."""
    start = time.perf_counter()
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "engine.score", *argv], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    wall = time.perf_counter() - start
    peak_kb, user, system, code = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"engine.score {' '.join(argv)}: exit {code}; {log.read_text()[-2000:]}")
    return {"peak_rss_mb": round(int(peak_kb) / 1024, 1), "wall_s": round(wall, 1), "user_s": round(float(user), 1),
            "system_s": round(float(system), 1)}


def cache_row_bytes(artifact: Path, store: Path) -> int:
    """Bytes of one image's cache (every image-graph output), measured on 64 images."""
    from engine.runtime import Scorer
    from engine.store import FeatureStore

    split = FeatureStore(store).split("test")
    with Scorer.load(artifact, "onnxruntime-cpu", threads=1) as scorer:
        cache = scorer.encode_image_features(split.regions[:64], split.objects[:64])
    return cache.nbytes // 64


def reference_projection(sizes: list[int], shard_size: int) -> dict | None:
    """PROJECTION (computed, not measured): the reference artifact's cache row x N in memory vs one shard."""
    if not (REFERENCE / "manifest.json").is_file():
        return None
    import json

    dims = json.loads((REFERENCE / "manifest.json").read_text())["dims"]
    floats = (dims["region_count"] * (dims["word_dim"] + dims["w2r_values"]) + dims["object_count"] * (dims["o2w_hidden"] + dims["o2w_first"])
              + dims["shortlist_dim"])
    row = 4 * floats
    return {"label": "PROJECTION (computed from the reference artifact's dims, not measured)", "cache_row_bytes_fp32": row,
            "in_memory_gallery_gb": {str(n): round(n * row / 1e9, 1) for n in sizes},
            "sharded_bound_gb": round(shard_size * row / 1e9, 2),
            "note": "the in-memory run holds N x the row (plus the process); the sharded run holds one shard while encoding, "
                    "one unit (64 images) while re-ranking, one 1,024-image tile of vectors while ranking"}


QUERIES = ("A dog runs through the grass with a ball in its mouth .", "Two children play in the water at the beach .",
           "A man in a red jacket climbs a rock wall .")


def real_run(args, work: Path) -> dict:
    """In memory vs --image-shards at real sizes: a real store split through the reference artifact, t2i for QUERIES."""
    from engine.store import FeatureStore

    images = FeatureStore(args.real_store).split(args.real_split).num_images
    base = ["--model", str(args.real_model), "--images", str(args.real_store), "--split", args.real_split, "--direction", "t2i",
            "--top-k", "10", "--shortlist-k", str(args.shortlist_k), "--backend", "onnxruntime-cpu", "--threads", "2"]
    for query in QUERIES:
        base += ["--query", query]
    row = {"store": str(args.real_store), "split": args.real_split, "images": images, "model": str(args.real_model),
           "queries": list(QUERIES), "load_before": list(os.getloadavg())}
    row["in_memory"] = run(base + ["--out", str(work / "real-memory.jsonl")], work / "real-memory.log")
    row["sharded"] = run(base + ["--out", str(work / "real-sharded.jsonl"), "--image-shards", str(work / "real-shards"),
                                 "--shard-size", str(args.shard_size)], work / "real-sharded.log")
    row["identical_output"] = (work / "real-memory.jsonl").read_bytes() == (work / "real-sharded.jsonl").read_bytes()
    cache = sum(f.stat().st_size for f in (work / "real-shards").rglob("*.npy"))
    row["cache_row_bytes"] = cache // images
    row["gallery_cache_mb"] = round(cache / 2**20, 1)
    row["load_after"] = list(os.getloadavg())
    print(f"real ({args.real_split}, {images:,} images): in memory {row['in_memory']['peak_rss_mb']:,.0f} MiB "
          f"({row['in_memory']['wall_s']} s), sharded {row['sharded']['peak_rss_mb']:,.0f} MiB ({row['sharded']['wall_s']} s); "
          f"caches {row['gallery_cache_mb']:,.0f} MiB; identical output: {row['identical_output']}", flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["runs"] if "sharded" in r]
    n = [r["images"] for r in rows]
    real = result.get("real")
    fig, axes = plt.subplots(1, 2 if real else 1, figsize=(11 if real else 7, 4.5), gridspec_kw={"width_ratios": [2, 1]} if real else None)
    ax = axes[0] if real else axes
    memory = [(r["images"], r["in_memory"]["peak_rss_mb"]) for r in rows if "in_memory" in r]
    if memory:
        ax.plot(*zip(*memory), "o-", label="in memory (the whole ImageCache)")
    ax.plot(n, [r["sharded"]["peak_rss_mb"] for r in rows], "s-", label=f"--image-shards (shards of {result['shard_size']})")
    ax.plot(n, [r["images"] * result["cache_row_bytes"] / 2**20 for r in rows], ":", color="gray", label="the gallery's caches")
    for r in rows:
        ax.annotate(f"{r['in_memory']['peak_rss_mb']:,.0f}", (r["images"], r["in_memory"]["peak_rss_mb"]), textcoords="offset points",
                    xytext=(-10, 6), fontsize=7)
        ax.annotate(f"{r['sharded']['peak_rss_mb']:,.0f}", (r["images"], r["sharded"]["peak_rss_mb"]), textcoords="offset points",
                    xytext=(-10, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("gallery images (synthetic)")
    ax.set_ylabel("peak resident memory (MiB)")
    ax.set_title(f"t2i, {result['captions']} queries, K={result['shortlist_k']}; synthetic sizes: "
                 f"{result['cache_row_bytes']:,} B of cache per image", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if real:
        ax = axes[1]
        values = [real["in_memory"]["peak_rss_mb"], real["sharded"]["peak_rss_mb"], real["gallery_cache_mb"]]
        bars = ax.bar(["in memory", "--image-shards", "its caches"], values, color=["C0", "C1", "gray"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(f"real sizes: Flickr8K {real['split']} ({real['images']:,} images),\nreference artifact, "
                     f"{len(real['queries'])} queries ({real['cache_row_bytes'] // 1000} kB per image)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"engine.score peak memory, in memory vs --image-shards (same output bytes); {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main_args(argv=None):
    parser = ArgumentParser(prog="python -m benchmarks.large_gallery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--captions", type=positive_int, default=100)
    parser.add_argument("--shortlist-k", type=positive_int, default=20)
    parser.add_argument("--shard-size", type=positive_int, default=2048)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="skip the runs that would start after this")
    parser.add_argument("--real-store", type=Path, help="also measure a real feature store's split through --real-model")
    parser.add_argument("--real-split", default="train")
    parser.add_argument("--real-model", type=Path, default=REFERENCE)
    parser.add_argument("--json", type=output_file, required=True)
    parser.add_argument("--plot", type=output_file)
    return parser.parse_args(argv)


@command
def main(argv=None) -> int:
    args = main_args(argv)
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="large-gallery-"))
    result = {"machine": machine_info(), "captions": args.captions, "shortlist_k": args.shortlist_k, "shard_size": args.shard_size,
              "command": "python -m engine.score --model A --images STORE --direction t2i --top-k 10 --shortlist-k K "
                         "--backend onnxruntime-cpu --threads 2 --out OUT.jsonl [--image-shards DIR --shard-size S]",
              "runs": []}
    try:
        artifact = None
        for n in sorted(args.images):
            if time.perf_counter() - began > args.max_seconds:
                result["runs"].append({"images": n, "skipped": f"past --max-seconds {args.max_seconds:g}"})
                continue
            case = work / f"n{n}"
            store = build_store(case / "store", n, args.captions)
            if artifact is None:
                artifact = build_artifact(work / "model", store)
                result["cache_row_bytes"] = cache_row_bytes(artifact, store)
            base = ["--model", str(artifact), "--images", str(store), "--direction", "t2i", "--top-k", "10",
                    "--shortlist-k", str(args.shortlist_k), "--backend", "onnxruntime-cpu", "--threads", "2"]
            row = {"images": n, "load_before": list(os.getloadavg())}
            row["in_memory"] = run(base + ["--out", str(case / "memory.jsonl")], case / "memory.log")
            row["sharded"] = run(base + ["--out", str(case / "sharded.jsonl"), "--image-shards", str(case / "shards"),
                                         "--shard-size", str(args.shard_size)], case / "sharded.log")
            row["identical_output"] = (case / "memory.jsonl").read_bytes() == (case / "sharded.jsonl").read_bytes()
            row["gallery_cache_mb"] = round(n * result["cache_row_bytes"] / 2**20, 1)
            row["shards"] = len(list((case / "shards").glob("shard-*")))
            row["load_after"] = list(os.getloadavg())
            print(f"{n:>9,} images: in memory {row['in_memory']['peak_rss_mb']:,.0f} MiB ({row['in_memory']['wall_s']} s), "
                  f"sharded {row['sharded']['peak_rss_mb']:,.0f} MiB ({row['sharded']['wall_s']} s, {row['shards']} shards); "
                  f"caches {row['gallery_cache_mb']:,.0f} MiB; identical output: {row['identical_output']}", flush=True)
            result["runs"].append(row)
            shutil.rmtree(case, ignore_errors=True)
        if args.real_store is not None:
            result["real"] = real_run(args, work)
        result["reference_projection"] = reference_projection(sorted(args.images), args.shard_size)
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
        write_json_atomic(args.json, result)
        if args.plot:
            plot(result, args.plot)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.get("identical_output", True) for r in result["runs"] + [result.get("real", {})]) else 1


if __name__ == "__main__":
    sys.exit(main())
