"""End to end on Flickr8K test: the 1K x 5K protocol exhaustive and with a shortlist, R@K of each,
and feature extraction images/s — through the engine runtime (engine.runtime.Scorer).

    python -m benchmarks.end_to_end [--artifact build/artifacts/reference] [--store stores/flickr8k]
        [--images 1000] [--shortlist 10 50 100] [--precision int8] --json OUT.json
    from benchmarks.end_to_end import flickr8k_test_lengths, retrieval_timing, extraction_rate

Needs a BSSAN artifact (python -m export models/reference --out build/artifacts/reference, or the
CMake build) and the Flickr8K feature store (python -m engine.features ... --out stores/flickr8k).
Each part that lacks its input is skipped with the reason in the JSON and on stdout.

- Retrieval: encode the test images and captions once (timed), then every image x caption
  (exhaustive BSSAN score_matrix, timed), then for each shortlist k both directions' first-stage
  top k re-scored by BSSAN and re-ranked by the artifact's fused score (timed). Every R@K comes
  from THE ranking protocol (engine.ranking.two_stage_metrics, with the artifact's fusion). The
  shortlist needs shortlist graphs in the artifact (a dual encoder exported with --shortlist);
  without them that part is skipped.
- Extraction: engine.features.Extractor.images_pipelined (decode, detector, backbone, RoIAlign; the
  path of python -m engine.features) on the first `images` test images after a warm-up batch;
  images/s (per stage, before/after and parity: benchmarks/extraction.py).

`flickr8k_test_lengths` gives the caption lengths the speed benchmarks use: the store's test
lengths.npy, else the raw captions through the project tokenizer, else the histogram below.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_THREADS, REPO_ROOT, machine_info, write_json_atomic
from engine.cli import ArgumentParser, command, nonnegative_int, output_file, positive_int

DEFAULT_MODEL = REPO_ROOT / "models" / "reference"
DEFAULT_SHORTLIST = REPO_ROOT / "models" / "reference-shortlist"  # a dual encoder (quickstart.sh's convention)
DEFAULT_ARTIFACT = REPO_ROOT / "build" / "artifacts" / "reference"
DEFAULT_STORE = REPO_ROOT / "stores" / "flickr8k"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "flickr8k"
SHORTLIST_KS = (10, 50, 100)
CAPTIONS_PER_IMAGE = 5  # Flickr8K
PROTOCOL_PAIRS = 1000 * 5000  # the 1K-image test protocol: 1,000 images x 5,000 captions
# Flickr8K test (1,000 images x 5 captions), words per caption from engine.text.tokenize, capped
# at 30; measured on /work/shared/data/flickr8k on 2026-11-29 (mean 10.84, median 10).
FLICKR8K_TEST_LENGTH_HISTOGRAM = {
    2: 3, 3: 25, 4: 55, 5: 129, 6: 336, 7: 407, 8: 456, 9: 545, 10: 578, 11: 536, 12: 457, 13: 367, 14: 316,
    15: 216, 16: 213, 17: 115, 18: 93, 19: 53, 20: 34, 21: 24, 22: 13, 23: 12, 24: 3, 25: 2, 26: 4, 28: 3, 29: 3, 30: 2}


def store_has_test(store: Path, split: str = "test") -> bool:
    """The store's manifest lists a finished `split` (arrays of an unfinished split may be half written)."""
    import json

    try:
        manifest = json.loads((Path(store) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return split in manifest.get("splits", {}) and (Path(store) / split / "lengths.npy").is_file()


def _all_test_lengths(store: Path, data: Path) -> tuple[np.ndarray, str]:
    if store_has_test(store):
        return np.load(store / "test" / "lengths.npy").astype(np.int64), f"{store}/test/lengths.npy"
    if (data / "captions.txt").is_file() and (data / "split_test.txt").is_file():
        from engine.data import read_flickr8k
        from engine.text import tokenize

        dataset = read_flickr8k(data, data / "images", splits=("test",))
        lengths = [max(1, len(tokenize(c))) for image in dataset.splits["test"] for c in image.captions]
        return np.asarray(lengths, np.int64), f"{data}/captions.txt test split, engine.text.tokenize"
    counts = FLICKR8K_TEST_LENGTH_HISTOGRAM
    return (np.repeat(np.array(list(counts)), np.array(list(counts.values()))).astype(np.int64),
            "benchmarks/end_to_end.py FLICKR8K_TEST_LENGTH_HISTOGRAM (no store, no raw data)")


def flickr8k_test_lengths(count: int, max_words: int, store: Path = DEFAULT_STORE, data: Path = DEFAULT_DATA,
                          seed: int = 0) -> tuple[np.ndarray, str]:
    """`count` caption lengths drawn (without replacement while possible, seed fixed) from Flickr8K
    test, capped at max_words; and where they came from."""
    lengths, source = _all_test_lengths(Path(store), Path(data))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(lengths, size=count, replace=count > len(lengths))
    return np.minimum(chosen, max_words), source


def resolve_artifact(artifact: Path | None, model: Path, work: Path) -> tuple[Path | None, str]:
    """An artifact directory to benchmark: `artifact` if it has a manifest, else `model` exported
    into `work` (fp32, fp16, int8; with the shortlist graphs of DEFAULT_SHORTLIST when it exists);
    else None and why."""
    if artifact is not None and (artifact / "manifest.json").is_file():
        return artifact, f"artifact {artifact}"
    if not (model / "config.json").is_file():
        return None, f"no artifact at {artifact} and no reference model at {model} (checkpoint directory)"
    from export.pipeline import ExportOptions, export_artifact

    out = work / "artifact"
    shortlist = DEFAULT_SHORTLIST if (DEFAULT_SHORTLIST / "config.json").is_file() else None
    export_artifact(ExportOptions(model_dir=model, out=out, precisions=("fp32", "fp16", "int8"), shortlist_dir=shortlist,
                                  tensorrt="off", progress=False))
    return out, f"exported from {model}{f' with the shortlist {shortlist}' if shortlist else ''} into a temporary directory"


def _lookup_rescore(scorer, image_cache, caption_cache, table: dict):
    """engine.ranking's rescore: BSSAN MS of listed pairs from `table` {(image, caption): MS} (what the timed
    run scored), any other pair scored now."""
    def rescore(image_index: np.ndarray, text_index: np.ndarray) -> np.ndarray:
        values = np.array([table.get(p, np.nan) for p in zip(image_index.tolist(), text_index.tolist())], dtype=np.float64)
        missing = np.isnan(values)
        if missing.any():
            values[missing] = scorer.score_pairs(image_cache, caption_cache,
                                                 np.stack([image_index[missing], text_index[missing]], axis=1), fuse=False)
        return values
    return rescore


def retrieval_timing(artifact: Path, store: Path, images: int, shortlist_ks: tuple[int, ...], precision: str = "fp32",
                     threads: int | None = None, progress: bool = True, split_name: str = "test") -> dict:
    """Wall times and R@K of the exhaustive protocol and of each shortlist k, on the first `images` images of a split."""
    from engine.journal import Journal, score_shortlists
    from engine.ranking import two_stage_metrics
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from training.evaluate import captions_per_image_of

    split = FeatureStore(store).split(split_name)
    cpi = captions_per_image_of(split)
    n_img = min(images, split.num_images)
    n_cap = n_img * cpi
    out = {"precision": precision, "split": split_name, "images": n_img, "captions": n_cap, "captions_per_image": cpi}
    with Scorer.load(artifact, backend="onnxruntime-cpu", precision=precision, threads=threads) as scorer:
        out["scorer"] = scorer.runner.describe()
        word_set = scorer.artifact.manifest.get("word_features", {}).get("name", "glove50")
        start = time.perf_counter()
        image_cache = scorer.encode_image_features(split.regions[:n_img], split.objects[:n_img])
        out["encode_images_s"] = time.perf_counter() - start
        start = time.perf_counter()
        caption_cache = scorer.encode_word_features(split.words(word_set)[:n_cap], split.lengths[:n_cap])
        out["encode_captions_s"] = time.perf_counter() - start
        start = time.perf_counter()
        bssan = scorer.score_matrix(image_cache, caption_cache, progress=progress, fuse=False)  # MS [N_img, N_cap]
        seconds = time.perf_counter() - start
        first = (scorer.first_stage(image_cache, caption_cache, np.arange(n_img), np.arange(n_cap))
                 if scorer.has_shortlist else None)  # [N_img, N_cap] dual-encoder cosines
        fusion = scorer.fusion
        out["fusion"] = fusion.to_dict()
        out["exhaustive"] = {"score_s": seconds, "pairs_per_s": bssan.size / seconds,
                             "metrics": two_stage_metrics(first if scorer.fuses else None, lambda i, t: bssan[i, t], None,
                                                          cpi, fusion, shape=bssan.shape)}
        if not scorer.has_shortlist:
            out["shortlist"] = {"skipped": "the artifact has no shortlist graphs (export with --shortlist DUAL_ENCODER_DIR)"}
            return out
        out["shortlist"] = {}
        for k in shortlist_ks:
            # every query's first-stage top K re-scored by BSSAN and re-ranked by the fused score, as engine.score does
            # it (engine.journal.score_shortlists: both directions' candidate pairs scored once, image by image; no journal)
            start = time.perf_counter()
            pairs, pair_bssan, _ = score_shortlists(scorer, image_cache, caption_cache, {"i2t": min(k, n_cap), "t2i": min(k, n_img)},
                                                    Journal(None, {}))
            seconds = time.perf_counter() - start
            table = dict(zip(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()), pair_bssan.tolist()))
            metrics = two_stage_metrics(first, _lookup_rescore(scorer, image_cache, caption_cache, table), k, cpi, fusion)
            out["shortlist"][f"k{k}"] = {"shortlist_k": k, "score_s": seconds, "pairs": len(pairs), "pairs_per_s": len(pairs) / seconds,
                                         "i2t": metrics["i2t"], "t2i": metrics["t2i"], "rsum": metrics["rsum"],
                                         "protocol": metrics["protocol"]}
    return out


def extraction_rate(data: Path, images: int, assets: Path | None = None, threads: int = DEFAULT_THREADS) -> dict:
    """images/s of engine.features' image path (decode, SSD, backbone, RoIAlign: `Extractor.images_pipelined`, as
    `python -m engine.features` runs it) on test images after a warm-up batch. Per stage and against the old
    OpenCV-DNN path: benchmarks/extraction.py."""
    from engine.data import read_flickr8k
    from engine.features import DEFAULT_BATCH, ExtractConfig, Extractor
    from engine.text import DEFAULT_ASSETS_DIR

    dataset = read_flickr8k(data, data / "images", splits=("test",))
    paths = [dataset.image_path(image) for image in dataset.splits["test"]][: images + DEFAULT_BATCH]
    config = ExtractConfig(images=data / "images", captions=data / "captions.txt", out=Path("/nonexistent-not-written"),
                           assets=assets or DEFAULT_ASSETS_DIR, word_features=(), threads=threads)
    extractor = Extractor(config)
    extractor.images(paths[:4])  # warm-up: sessions, detector, first allocations
    timed = paths[DEFAULT_BATCH: DEFAULT_BATCH + images] or paths[:images]
    start = time.perf_counter()
    for _ in extractor.images_pipelined([timed[i:i + DEFAULT_BATCH] for i in range(0, len(timed), DEFAULT_BATCH)]):
        pass
    seconds = time.perf_counter() - start
    return {"images": len(timed), "batch": DEFAULT_BATCH, "workers": extractor.workers, "seconds": seconds,
            "images_per_s": len(timed) / seconds, "backbone": extractor.backbone.describe().get("name", config.backbone),
            "detector": extractor.detector.describe()["runtime"], "load_average_at_end": list(os.getloadavg())}


def synthetic_setup(preset_name: str, images: int, captions_per_image: int, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """For timing only: a random-weight BSSAN + dual encoder of `preset_name` exported (fp32, int8)
    and a feature store whose test split has random features of that preset's shapes and captions
    of Flickr8K test lengths. Returns (artifact, store). R@K on it are chance level by construction."""
    import torch

    from engine.store import StoreWriter
    from export.pipeline import ExportOptions, export_artifact
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset
    from training.model import BSSAN

    config = preset(preset_name)
    torch.manual_seed(seed)
    save_checkpoint(work / "random-bssan", BSSAN(config).eval(), TrainConfig(), metrics={"weights": "random"})
    save_checkpoint(work / "random-shortlist", DualEncoder(dual_encoder_preset(preset_name)).eval(), TrainConfig(),
                    metrics={"weights": "random"})
    artifact = work / "random-artifact"
    export_artifact(ExportOptions(model_dir=work / "random-bssan", out=artifact, precisions=("fp32", "int8"),
                                  shortlist_dir=work / "random-shortlist", tensorrt="off", assets_dir=None, progress=False))
    rng = np.random.default_rng(seed)
    n_cap = images * captions_per_image
    lengths, _ = flickr8k_test_lengths(n_cap, config.max_words, seed=seed)
    writer = StoreWriter(work / "random-store", extractor={"name": "benchmarks.end_to_end synthetic", "seed": seed})
    regions = writer.open_array("test", "regions", (images, config.region_count, config.region_dim))
    regions[:] = rng.standard_normal(regions.shape, dtype=np.float32)
    objects = writer.open_array("test", "objects", (images, config.object_count, config.object_dim))
    objects[:] = rng.standard_normal(objects.shape, dtype=np.float32)
    writer.open_array("test", "boxes", (images, config.object_count, 4))[:] = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    writer.open_array("test", "objects_real", (images,))[:] = config.object_count
    writer.open_array("test", "caption_image", (n_cap,))[:] = np.repeat(np.arange(images), captions_per_image)
    writer.open_array("test", "lengths", (n_cap,))[:] = lengths
    words = writer.open_array("test", "words_glove50", (n_cap, config.max_words, config.word_dim))
    for start in range(0, n_cap, 1024):  # [block, L, E], zero past each length
        block = rng.standard_normal((min(1024, n_cap - start), config.max_words, config.word_dim), dtype=np.float32)
        block[np.arange(config.max_words)[None, :] >= lengths[start:start + 1024, None]] = 0.0
        words[start:start + 1024] = block
    writer.write_lines("test", "image_names", [f"random_{i:05d}.jpg" for i in range(images)])
    writer.write_lines("test", "captions", [f"random caption {j}" for j in range(n_cap)])
    writer.finish_split("test", {"images": images, "captions": n_cap})
    return artifact, work / "random-store"


ENGINE_PATHS = ("grid", "pair", "kernel")  # engine.runtime.Scorer's scoring paths, timed by path_check in this order


def fastest_equal_to_grid(pairs_per_s: dict[str, float], recall_equal_to_grid: dict[str, bool]) -> tuple[str, list[str]]:
    """(the fastest path whose R@K equal the grid path's, the timed paths left out because theirs differ). Grid always
    qualifies; of equal rates the first listed wins."""
    eligible = [p for p in pairs_per_s if p == "grid" or recall_equal_to_grid.get(p, False)]
    return max(eligible, key=lambda p: pairs_per_s[p]), [p for p in pairs_per_s if p not in eligible]


def path_check(artifact: Path, store: Path, images: int, split_name: str = "test", threads: int | None = None,
               rounds: int = 3, record: bool = True, build_kernel: bool = True) -> dict:
    """The engine's validated scoring paths (grid graphs, pair graphs, and the fused W2R kernel with the o2w grid graph
    where it runs here) on the first `images` images of a store split and their captions, through
    engine.runtime.Scorer as a user runs it (threads=None: every core): the wall time of the exhaustive score_matrix
    of each, in interleaved rounds, max |score diff| of each path vs grid, and whether R@K (BSSAN alone,
    engine.ranking's protocol) equal grid's. With `build_kernel`, the kernel library is built first (engine.kernels.build,
    once per machine); a kernel that cannot be built or loaded is {"kernel": {"skipped": reason}} and the others go on.
    With `record`, the fastest of the paths whose R@1/5/10 equal the grid path's is recorded for this machine and
    artifact (engine.paths), so that `Scorer(path="auto")` and `engine.score` take it."""
    from engine.errors import InputError
    from engine.paths import record_choice
    from engine.ranking import BSSAN_ALONE, two_stage_metrics
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from training.evaluate import captions_per_image_of

    split = FeatureStore(store).split(split_name)
    cpi = captions_per_image_of(split)
    n_img = min(images, split.num_images)
    n_cap = n_img * cpi

    scorers = {"pair": Scorer.load(artifact, backend="onnxruntime-cpu", threads=threads, path="pair")}
    try:
        scorers["grid"] = Scorer.load(artifact, backend="onnxruntime-cpu", threads=threads, path="grid")
    except InputError as exc:  # an artifact exported before grid graphs existed
        scorers["pair"].close()
        return {"skipped": str(exc)}
    out: dict = {"images": n_img, "captions": n_cap, "source": f"{store} {split_name}", "threads": threads}
    try:
        if build_kernel:
            from engine.kernels import build

            build()  # KernelError (an InputError): no C compiler, or it failed; the message says which
        scorers["kernel"] = Scorer.load(artifact, backend="onnxruntime-cpu", threads=threads, path="kernel")
    except (InputError, OSError) as exc:  # no compiler, a build it cannot write, a model or run the kernel does not serve
        out["kernel"] = {"skipped": str(exc)}
    out["paths"] = [p for p in ENGINE_PATHS if p in scorers]
    try:
        any_scorer = scorers["grid"]
        word_set = any_scorer.artifact.manifest.get("word_features", {}).get("name", "glove50")
        image_cache = any_scorer.encode_image_features(split.regions[:n_img], split.objects[:n_img])
        caption_cache = any_scorer.encode_word_features(split.words(word_set)[:n_cap], split.lengths[:n_cap])
        seconds: dict[str, list[float]] = {p: [] for p in scorers}
        matrices = {}
        for _ in range(rounds):
            for path, scorer in scorers.items():
                start = time.perf_counter()
                matrices[path] = scorer.score_matrix(image_cache, caption_cache, fuse=False)
                seconds[path].append(time.perf_counter() - start)
        metrics = {p: two_stage_metrics(None, lambda i, t, m=m: m[i, t], None, cpi, BSSAN_ALONE, shape=m.shape)
                   for p, m in matrices.items()}
        out["seconds"] = seconds
        out["pairs_per_s"] = {p: n_img * n_cap / float(np.median(seconds[p])) for p in out["paths"]}
        out["metrics"] = {p: {d: metrics[p][d] for d in ("i2t", "t2i")} for p in out["paths"]}
        out["max_abs_diff"] = float(np.abs(matrices["grid"] - matrices["pair"]).max())  # grid vs pair (older reports)
        out["max_abs_diff_vs_grid"] = {p: float(np.abs(matrices[p] - matrices["grid"]).max()) for p in out["paths"] if p != "grid"}
        out["recall_equal_to_grid"] = {p: all(metrics[p][d][k] == metrics["grid"][d][k] for d in ("i2t", "t2i")
                                              for k in ("r1", "r5", "r10")) for p in out["paths"]}
        out["identical_recall"] = all(out["recall_equal_to_grid"].values())  # every timed path ranks as grid does
        faster, excluded = fastest_equal_to_grid(out["pairs_per_s"], out["recall_equal_to_grid"])
        out["faster"] = faster  # the fastest path that ranks as grid does (the key predates the third path)
        reason = (f"python -m benchmarks.run measured on this machine {time.strftime('%Y-%m-%d', time.gmtime())}: "
                  + ", ".join(f"{p} {out['pairs_per_s'][p]:.0f}" for p in out["paths"])
                  + f" pairs/s, median of {rounds} interleaved {n_img} x {n_cap} passes"
                  + (f" ({', '.join(excluded)} left out: R@K differ from grid's)" if excluded else "")
                  + (f"; kernel not timed: {out['kernel']['skipped']}" if "kernel" in out else ""))
        out["reason"] = reason
        if record:
            written = record_choice(any_scorer.fingerprint, any_scorer.runner, faster, reason, out["pairs_per_s"])
            out["recorded_in"] = str(written) if written else "not recorded (BSSAN_PATHS=off)"
    finally:
        for scorer in scorers.values():
            scorer.close()
    return out


def run_end_to_end(artifact: Path | None, model: Path, store: Path, data: Path, images: int, shortlist_ks: tuple[int, ...],
                   precisions: tuple[str, ...], extraction_images: int, work: Path, threads: int,
                   synthetic_images: int = 0, synthetic_preset: str = "flickr8k", split: str = "test",
                   scorer_threads: int | None = None, path_images: int = 100) -> dict:
    """Every part whose inputs exist; the others as {"skipped": reason}. Without the reference model or
    the store, `synthetic_images` > 0 times the same protocol on a random-weight model (synthetic_setup)."""
    report: dict = {}
    if extraction_images < 1:
        report["extraction"] = {"skipped": "not asked for (0 extraction images)"}
    elif (data / "images").is_dir() and (REPO_ROOT / "build" / "assets" / "roi_align.json").is_file():
        report["extraction"] = extraction_rate(data, extraction_images, threads=threads)
    else:
        report["extraction"] = {"skipped": f"needs {data}/images and build/assets (python -m export.backbones --out build/assets)"}
    resolved, how = resolve_artifact(artifact, model, work)
    if resolved is None or not store_has_test(store, split):
        reason = how if resolved is None else f"no finished {split} split in the store {store} (python -m engine.features)"
        report["retrieval"] = {"skipped": reason}
        if synthetic_images:
            random_artifact, random_store = synthetic_setup(synthetic_preset, synthetic_images, CAPTIONS_PER_IMAGE, work)
            report["synthetic_retrieval"] = {
                "note": f"TIMING ONLY: random-weight {synthetic_preset} BSSAN and dual encoder on random features of that "
                        f"preset's shapes, Flickr8K test caption lengths; R@K are chance level and mean nothing",
                "preset": synthetic_preset,
                "runs": [retrieval_timing(random_artifact, random_store, synthetic_images, shortlist_ks, p, scorer_threads, progress=False)
                         for p in precisions]}
            for run in report["synthetic_retrieval"]["runs"]:
                run["projected_1k_x_5k_exhaustive_s"] = PROTOCOL_PAIRS / run["exhaustive"]["pairs_per_s"]
        return report
    # the grid, pair and kernel paths on real features: same R@K, which is fastest here (recorded: engine.paths)
    report["ranking_check"] = path_check(resolved, store, path_images, split, scorer_threads)
    report["retrieval"] = {"artifact": how, "split": split,
                           "runs": [retrieval_timing(resolved, store, images, shortlist_ks, p, scorer_threads, split_name=split)
                                    for p in precisions]}
    report["resolved_artifact"] = str(resolved)
    return report


@command
def main(argv: list[str] | None = None) -> int:
    import tempfile


    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the legacy exporter's C++ shape-inference warnings
    parser = ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported on the fly when --artifact has no manifest")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=positive_int, default=1000, help="images of the split (with their captions) in the protocol")
    parser.add_argument("--split", default="test", help="store split (dev: a real-data run before the test split exists)")
    parser.add_argument("--shortlist", type=positive_int, nargs="+", default=list(SHORTLIST_KS))
    parser.add_argument("--precision", nargs="+", choices=("fp32", "fp16", "int8"), default=["fp32", "int8"])
    parser.add_argument("--extraction-images", type=nonnegative_int, default=48)
    parser.add_argument("--synthetic-images", type=nonnegative_int, default=0,
                        help="without model or store: time the protocol on this many random images of a random-weight model")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS)
    parser.add_argument("--json", type=output_file, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bssan-e2e-") as work:
        report = run_end_to_end(args.artifact, args.model, args.store, args.data, args.images, tuple(args.shortlist),
                                tuple(args.precision), args.extraction_images, Path(work), args.threads,
                                synthetic_images=args.synthetic_images, split=args.split)
    print_end_to_end(report)
    write_json_atomic(args.json, {"machine": machine_info(args.threads), "end_to_end": report})
    return 0


def print_end_to_end(report: dict) -> None:
    extraction = report["extraction"]
    print(f"feature extraction: {extraction['images_per_s']:.2f} images/s ({extraction['images']} images)"
          if "images_per_s" in extraction else f"feature extraction: SKIPPED ({extraction['skipped']})")
    check = report.get("ranking_check")
    if check and "skipped" not in check:
        diffs = check.get("max_abs_diff_vs_grid", {"pair": check["max_abs_diff"]})
        print(f"scoring paths on {check['images']} x {check['captions']} ({check['source']}): "
              + " vs ".join(f"{p} {rate:.0f}" for p, rate in check["pairs_per_s"].items())
              + " pairs/s, max |score diff| vs grid " + ", ".join(f"{p} {d:.2g}" for p, d in diffs.items())
              + f", R@K identical: {check['identical_recall']}; fastest: {check['faster']} ({check.get('recorded_in', 'not recorded')})")
        if "skipped" in check.get("kernel", {}):
            print(f"  kernel path: SKIPPED ({check['kernel']['skipped']})")
    elif check:
        print(f"scoring paths: SKIPPED ({check['skipped']})")
    retrieval = report["retrieval"]
    if "skipped" in retrieval:
        print(f"end-to-end retrieval: SKIPPED ({retrieval['skipped']})")
        if "synthetic_retrieval" not in report:
            return
        print(f"instead, {report['synthetic_retrieval']['note']}:")
        retrieval = report["synthetic_retrieval"]
    for run in retrieval["runs"]:
        m = run["exhaustive"]["metrics"]
        projected = f" (1K x 5K projected {run['projected_1k_x_5k_exhaustive_s'] / 60:.0f} min)" if "projected_1k_x_5k_exhaustive_s" in run else ""
        print(f"{run['precision']} {run.get('split', 'test')} {run['images']} x {run['captions']} exhaustive: {run['exhaustive']['score_s']:.1f} s{projected}, "
              f"i2t R@1 {m['i2t']['r1']:.1f} R@5 {m['i2t']['r5']:.1f} R@10 {m['i2t']['r10']:.1f} | "
              f"t2i R@1 {m['t2i']['r1']:.1f} R@5 {m['t2i']['r5']:.1f} R@10 {m['t2i']['r10']:.1f}")
        if "skipped" in run["shortlist"]:
            print(f"  shortlist: SKIPPED ({run['shortlist']['skipped']})")
            continue
        for name, row in run["shortlist"].items():
            print(f"  shortlist {name}: {row['score_s']:.1f} s, i2t R@1 {row['i2t']['r1']:.1f} R@10 {row['i2t']['r10']:.1f} | "
                  f"t2i R@1 {row['t2i']['r1']:.1f} R@10 {row['t2i']['r10']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
