"""Feature extraction speed per stage and end to end, before (SSD on OpenCV DNN) and after (SSD on ONNX
Runtime, worker threads), with the parity of the two on the same photos.

    python -m benchmarks.extraction [--data ../shared/data/flickr8k] [--assets build/assets] [--images 160]
        [--reference-images 48] [--threads 2] [--batch 16] --json results/extraction/cpu.json
        [--plot results/extraction/stages.png]

On Flickr8K photos (the test split, in order):
- stages: each stage of engine.features' image path timed alone, one batch at a time (wall and the
  process's CPU time per image: on a shared machine the CPU time is the figure that load does not inflate): decode (PIL, EXIF, RGB), backbone preprocessing, SSD resize,
  SSD graph, SSD NMS, EfficientNet-Lite0, RoIAlign; "before" = the OpenCV DNN detector
  (blobFromImages + forward + clean) and the graphs with `threads` intra-op threads, as engine.features
  ran until issue 14. Words (GloVe / MiniLM, 5 captions per image) are timed per image too.
- end to end: `Extractor.images_pipelined` over `images` photos (what `python -m engine.features`
  runs: `threads` workers, each batch decoded and run through the graphs on one thread), and the
  "before" path (one batch at a time: decode, OpenCV SSD, 2-thread graphs) over `reference_images`.
- parity: on the `reference_images` photos both paths' detections (count, classes, boxes, scores), the
  selected boxes, regions and objects; the largest differences, and whether they are within
  PARITY_TOLERANCE.
The machine is shared: the load average at start and end is in the JSON; run it for short bounded
counts (100-200 photos) at normal priority.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_THREADS, REPO_ROOT, machine_info, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_ASSETS = REPO_ROOT / "build" / "assets"
PARITY_TOLERANCE = 1e-4  # boxes and scores: max abs; objects: max abs / max |objects|; regions: exactly equal
CAPTIONS_PER_IMAGE = 5
TARGET_IMAGES_PER_S = 15.0  # issue 14, on 2 cores


def _photos(data: Path, count: int) -> list[Path]:
    names = [n for n in (data / "split_test.txt").read_text(encoding="utf-8").split() if (data / "images" / n).is_file()]
    return [data / "images" / n for n in names[:count]]


class _Clock:
    """Per-stage wall and process-CPU seconds (every thread of the process: OpenCV's and ONNX Runtime's pools too)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, stage: str, fn, *args):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - start
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - start_cpu
        return result

    def per_image(self, images: int) -> dict:
        return {stage: {"wall_ms": 1000 * self.wall[stage] / images, "cpu_ms": 1000 * self.cpu[stage] / images} for stage in self.wall}


def stage_profile_after(extractor, paths: list[Path], batch: int) -> dict:
    """engine.features' stages, one batch at a time in this thread (the graphs' sessions: 1 intra-op thread)."""
    from engine.detect import select_boxes, ssd_postprocess
    from engine.detect import SSD_ONNX_BOXES, SSD_ONNX_INPUT, SSD_ONNX_SCORES
    from engine.vision import load_image

    detector, prep = extractor.detector, extractor.backbone.preprocessing
    clock = _Clock()
    for start in range(0, len(paths), batch):
        images = [clock("decode", load_image, p) for p in paths[start:start + batch]]
        tensor = clock("backbone preprocess", lambda: np.stack([prep.apply(image) for image in images]))
        pixels = clock("ssd resize", lambda: np.stack([detector.prepare(np.asarray(image)) for image in images]))
        boxes, scores = clock("ssd graph", detector.session.run, [SSD_ONNX_BOXES, SSD_ONNX_SCORES], {SSD_ONNX_INPUT: pixels})
        found = clock("ssd nms", lambda: [ssd_postprocess(boxes[i], scores[i], detector.min_score, detector.settings)
                                          for i in range(len(images))])
        chosen = clock("select boxes", lambda: np.stack([select_boxes(f, extractor.config.boxes_per_image)[0] for f in found]))
        feature_map = clock("backbone graph", extractor.backbone.run, tensor)
        clock("roialign graph", extractor.objects.run, feature_map, chosen)
    return clock.per_image(len(paths))


def before_pipeline(assets: Path, threads: int):
    """The image path as engine.features ran it before issue 14: SSD on OpenCV DNN, graphs with `threads`
    intra-op threads, one batch at a time. Returns images(paths) -> (regions, objects, boxes, real) and the parts."""
    from engine.detect import SsdMobileNetV2, padding_boxes, select_boxes
    from engine.vision import ObjectFeatures, RegionBackbone, load_batch, regions_from_feature_map

    backbone = RegionBackbone.from_manifest(assets / "efficientnet-lite0-7x7.json", threads)
    objects = ObjectFeatures.from_manifest(assets / "roi_align.json", threads)
    detector = SsdMobileNetV2(threads=threads)

    def images(paths: list[Path]):
        batch, decoded, bad = load_batch(paths, backbone.preprocessing)
        boxes = np.tile(padding_boxes(10), (len(paths), 1, 1))
        real = np.zeros(len(paths), np.int16)
        good = [i for i, image in enumerate(decoded) if image is not None]
        found = detector.detect([np.asarray(decoded[i]) for i in good])
        for i, f in zip(good, found):
            boxes[i], real[i] = select_boxes(f, 10)
        feature_map = backbone.run(batch)
        return regions_from_feature_map(feature_map), objects.run(feature_map, boxes), boxes, real, found

    return images, backbone, objects, detector


def stage_profile_before(parts, paths: list[Path], batch: int) -> dict:
    from engine.detect import select_boxes
    from engine.vision import load_image

    _, backbone, objects, detector = parts
    prep = backbone.preprocessing
    clock = _Clock()
    for start in range(0, len(paths), batch):
        images = [clock("decode", load_image, p) for p in paths[start:start + batch]]
        tensor = clock("backbone preprocess", lambda: np.stack([prep.apply(image) for image in images]))
        found = clock("ssd opencv dnn (resize, graph, nms)", detector.detect, [np.asarray(image) for image in images])
        chosen = clock("select boxes", lambda: np.stack([select_boxes(f, 10)[0] for f in found]))
        feature_map = clock("backbone graph", backbone.run, tensor)
        clock("roialign graph", objects.run, feature_map, chosen)
    return clock.per_image(len(paths))


def words_profile(data: Path, assets: Path, images: int) -> dict:
    """Word features per image (its 5 captions): THE tokenizer + each word set, one thread's wall and CPU."""
    from engine.data import read_flickr8k
    from engine.text import MAX_WORDS, load_word_features

    dataset = read_flickr8k(data, data / "images", splits=("test",))
    captions = [c for entry in dataset.splits["test"][:images] for c in entry.captions[:CAPTIONS_PER_IMAGE]]
    out = {}
    for name in ("glove50", "minilm"):
        try:
            word_set = load_word_features(name, assets)
        except Exception as exc:  # noqa: BLE001  a missing package or graph: say so in the report
            out[name] = {"skipped": str(exc).splitlines()[0]}
            continue
        word_set.encode(captions[:8], MAX_WORDS)  # warm-up: sessions, caches
        start, start_cpu = time.perf_counter(), time.process_time()
        word_set.encode(captions, MAX_WORDS)
        out[name] = {"captions": len(captions), "wall_ms_per_image": 1000 * (time.perf_counter() - start) / images,
                     "process_cpu_ms_per_image": 1000 * (time.process_time() - start_cpu) / images}
    return out


def end_to_end_after(extractor, paths: list[Path], batch: int) -> tuple[dict, list]:
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    start, start_cpu = time.perf_counter(), time.process_time()
    outputs = list(extractor.images_pipelined(batches))
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"images": len(paths), "batch": batch, "workers": extractor.workers, "seconds": seconds,
            "images_per_s": len(paths) / seconds, "process_cpu_ms_per_image": 1000 * cpu / len(paths),
            "cpu_share": cpu / seconds}, outputs


def end_to_end_before(images_fn, paths: list[Path], batch: int) -> tuple[dict, list]:
    start, start_cpu = time.perf_counter(), time.process_time()
    outputs = [images_fn(paths[i:i + batch]) for i in range(0, len(paths), batch)]
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"images": len(paths), "batch": batch, "seconds": seconds, "images_per_s": len(paths) / seconds,
            "process_cpu_ms_per_image": 1000 * cpu / len(paths), "cpu_share": cpu / seconds}, outputs


def parity(before: list, after: list, extractor, paths: list[Path]) -> dict:
    """Both paths on the same photos: detections, selected boxes, regions, objects."""
    from engine.vision import load_image

    regions_b, objects_b, boxes_b, real_b = (np.concatenate([o[k] for o in before]) for k in range(4))
    regions_a, objects_a, boxes_a, real_a = (np.concatenate([o[k] for o in after]) for k in range(4))
    n = len(regions_b)
    found_b = [f for o in before for f in o[4]]
    found_a = extractor.detector.detect([np.asarray(load_image(p)) for p in paths[:n]])
    same_detections = sum(len(x.scores) == len(y.scores) and x.classes.tolist() == y.classes.tolist() for x, y in zip(found_b, found_a))
    diffs = [(np.abs(x.boxes - y.boxes).max(), np.abs(x.scores - y.scores).max()) for x, y in zip(found_b, found_a)
             if len(x.scores) == len(y.scores) and len(x.scores)]
    result = {
        "images": n,
        "images_with_identical_detections": same_detections,
        "detections": int(sum(len(f.scores) for f in found_b)),
        "detection_boxes_max_abs_diff": float(max((d[0] for d in diffs), default=0.0)),
        "detection_scores_max_abs_diff": float(max((d[1] for d in diffs), default=0.0)),
        "selected_boxes_max_abs_diff": float(np.abs(boxes_a[:n] - boxes_b).max()),
        "objects_real_equal": bool(np.array_equal(real_a[:n], real_b)),
        "regions_max_abs_diff": float(np.abs(regions_a[:n] - regions_b).max()),
        "objects_max_rel_diff": float(np.abs(objects_a[:n] - objects_b).max() / np.abs(objects_b).max()),
        "tolerance": PARITY_TOLERANCE,
    }
    result["within_tolerance"] = bool(
        same_detections == n and result["objects_real_equal"] and result["regions_max_abs_diff"] <= PARITY_TOLERANCE
        and max(result["detection_boxes_max_abs_diff"], result["detection_scores_max_abs_diff"],
                result["selected_boxes_max_abs_diff"], result["objects_max_rel_diff"]) <= PARITY_TOLERANCE)
    return result


def run_extraction(data: Path, assets: Path, images: int, reference_images: int, threads: int, batch: int,
                   words: bool = True) -> dict:
    from engine.features import ExtractConfig, Extractor, find_ssd_onnx

    if not (data / "images").is_dir() or not (assets / "roi_align.json").is_file():
        return {"skipped": f"needs {data}/images and {assets} (python -m export.backbones --out {assets})"}
    if find_ssd_onnx(assets) is None:
        return {"skipped": f"no {assets}/ssd-mobilenet-v2-coco.json (python -m export.detector --out {assets})"}
    paths = _photos(data, images + batch)
    warm, paths = paths[:batch], paths[batch:]
    reference = paths[:min(reference_images, len(paths))]
    config = ExtractConfig(images=data / "images", captions=None, out=Path("/nonexistent-not-written"), assets=assets,
                           word_features=(), threads=threads, batch_size=batch, detector_runtime="onnxruntime")
    extractor = Extractor(config)
    extractor.images(warm)  # sessions, first allocations
    before = before_pipeline(assets, threads)
    before[0](warm[:4])
    report: dict = {"load_average_at_start": list(os.getloadavg()), "threads": threads, "batch": batch}
    report["end_to_end_after"], after_outputs = end_to_end_after(extractor, paths, batch)
    report["end_to_end_before"], before_outputs = end_to_end_before(before[0], reference, batch)
    report["speedup"] = report["end_to_end_after"]["images_per_s"] / report["end_to_end_before"]["images_per_s"]
    report["speedup_cpu"] = (report["end_to_end_before"]["process_cpu_ms_per_image"]
                             / report["end_to_end_after"]["process_cpu_ms_per_image"])
    for part in ("end_to_end_after", "end_to_end_before"):  # NOT measured: what the CPU cost would give on idle cores
        report[part]["projected_images_per_s_on_idle_cores"] = threads * 1000 / report[part]["process_cpu_ms_per_image"]
    report["target_images_per_s"] = TARGET_IMAGES_PER_S
    report["stages_after"] = stage_profile_after(extractor, reference, batch)
    report["stages_before"] = stage_profile_before(before, reference, batch)
    report["parity"] = parity(before_outputs, after_outputs, extractor, reference)
    report["words"] = words_profile(data, assets, len(reference)) if words else {"skipped": "not asked for"}
    report["detector"] = extractor.detector.describe()
    report["load_average_at_end"] = list(os.getloadavg())
    return report


def plot_stages(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = []  # (stage, before CPU ms, after CPU ms)
    stages_after, stages_before = report["stages_after"], report["stages_before"]
    ssd_after = sum(stages_after[s]["cpu_ms"] for s in ("ssd resize", "ssd graph", "ssd nms"))
    for stage in ("decode", "backbone preprocess"):
        rows.append((stage, stages_before[stage]["cpu_ms"], stages_after[stage]["cpu_ms"]))
    rows.append(("SSD detector (resize, graph, NMS)", stages_before["ssd opencv dnn (resize, graph, nms)"]["cpu_ms"], ssd_after))
    for stage in ("select boxes", "backbone graph", "roialign graph"):
        rows.append((stage, stages_before[stage]["cpu_ms"], stages_after[stage]["cpu_ms"]))
    for name, words in report["words"].items():
        if isinstance(words, dict) and "process_cpu_ms_per_image" in words:
            rows.append((f"words {name} (5 captions, unchanged)", words["process_cpu_ms_per_image"], words["process_cpu_ms_per_image"]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2.4, 1]})
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] for r in rows], 0.4, label="before: SSD on OpenCV DNN, 2-thread graphs", color="#c44e52")
    ax.barh(y + 0.2, [r[2] for r in rows], 0.4, label="after: SSD on ONNX Runtime, 1-thread graphs", color="#4c72b0")
    for yy, r in zip(y, rows):
        ax.text(max(r[1], r[2]) + 1, yy, f"{r[1]:.1f} -> {r[2]:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("CPU ms per image (process CPU time, each stage alone, one batch of 16 at a time)")
    ax.legend(loc="lower right", fontsize=8)
    after, before = report["end_to_end_after"], report["end_to_end_before"]
    ax2.bar([0, 1], [before["images_per_s"], after["images_per_s"]], color=["#c44e52", "#4c72b0"])
    ax2.axhline(TARGET_IMAGES_PER_S, color="k", ls="--", lw=1, label=f"target {TARGET_IMAGES_PER_S:g}/s")
    ax2.set_xticks([0, 1], ["before", f"after\n({after['workers']} workers)"])
    ax2.set_ylabel("images/s end to end")
    for x, v in enumerate([before["images_per_s"], after["images_per_s"]]):
        ax2.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    for x, part in enumerate([before, after]):
        ax2.plot([x - 0.35, x + 0.35], [part["projected_images_per_s_on_idle_cores"]] * 2, color="grey", ls=":", lw=1.5)
    ax2.plot([], [], color="grey", ls=":", label="idle-core projection:\ncores x 1000 / CPU-ms,\nnot measured")
    ax2.set_ylim(0, max(40.0, 1.15 * max(p["projected_images_per_s_on_idle_cores"] for p in (before, after))))
    ax2.legend(fontsize=7, loc="upper left")
    load = report["load_average_at_start"][0], report["load_average_at_end"][0]
    fig.suptitle(f"Feature extraction per stage, Flickr8K test photos, {report['threads']} cores shared "
                 f"(1-min load {load[0]:.1f} -> {load[1]:.1f})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_extraction(report: dict) -> None:
    if "skipped" in report:
        print(f"feature extraction: SKIPPED ({report['skipped']})")
        return
    after, before, p = report["end_to_end_after"], report["end_to_end_before"], report["parity"]
    print(f"feature extraction end to end: {after['images_per_s']:.1f} images/s ({after['images']} photos, {after['workers']} workers; "
          f"{after['process_cpu_ms_per_image']:.0f} CPU-ms/image, {after['cpu_share']:.2f} cores held) vs before "
          f"{before['images_per_s']:.1f} images/s ({before['images']} photos, {before['process_cpu_ms_per_image']:.0f} CPU-ms/image, "
          f"{before['cpu_share']:.2f} cores held): x{report['speedup']:.1f} (CPU x{report['speedup_cpu']:.1f}); target {TARGET_IMAGES_PER_S:g}: "
          f"{'MET' if after['images_per_s'] >= TARGET_IMAGES_PER_S else 'NOT MET'} (load {report['load_average_at_start'][0]:.1f})")
    for name, stages in (("after", report["stages_after"]), ("before", report["stages_before"])):
        print(f"  stages {name} (ms/image, wall / cpu): " + ", ".join(f"{s} {v['wall_ms']:.1f}/{v['cpu_ms']:.1f}" for s, v in stages.items()))
    for name, words in report["words"].items():
        if isinstance(words, dict):
            print(f"  words {name}: " + (f"{words['wall_ms_per_image']:.1f} ms/image ({CAPTIONS_PER_IMAGE} captions)"
                                         if "wall_ms_per_image" in words else f"SKIPPED ({words.get('skipped')})"))
    print(f"  parity vs OpenCV DNN on {p['images']} photos: {'WITHIN' if p['within_tolerance'] else 'OUTSIDE'} {p['tolerance']:g}: "
          f"identical detections in {p['images_with_identical_detections']}/{p['images']}, boxes {p['detection_boxes_max_abs_diff']:.2g}, "
          f"scores {p['detection_scores_max_abs_diff']:.2g}, selected boxes {p['selected_boxes_max_abs_diff']:.2g}, "
          f"regions {p['regions_max_abs_diff']:.2g}, objects {p['objects_max_rel_diff']:.2g} (relative)")


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.extraction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--images", type=positive_int, default=160, help="photos timed end to end through the engine path")
    parser.add_argument("--reference-images", type=positive_int, default=48, help="photos through the OpenCV path (slow), "
                        "the per-stage profiles and the parity check")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--no-words", action="store_true", help="skip the word-feature timing")
    parser.add_argument("--json", type=output_file, required=True)
    parser.add_argument("--plot", type=output_file, help="bar plot per stage (PNG)")
    args = parser.parse_args(argv)
    info = machine_info(args.threads)
    report = run_extraction(args.data, args.assets, args.images, args.reference_images, args.threads, args.batch, not args.no_words)
    print_extraction(report)
    if args.plot and "skipped" not in report:
        print(f"plot: {plot_stages(report, args.plot)}")
    write_json_atomic(args.json, {"machine": info, "extraction": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
