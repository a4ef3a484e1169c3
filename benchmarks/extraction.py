"""Feature extraction speed per stage and end to end, before and after issue 14, with the parity of the two.

    python -m benchmarks.extraction [--data ../shared/data/flickr8k] [--assets build/assets] [--images 160]
        [--reference-images 48] [--threads 2] [--batch 16] [--cli] [--reference-store ../stores/flickr8k]
        --json results/extraction/cpu.json [--plot results/extraction/stages.png]

On Flickr8K photos (the test split, in order):
- stages: each stage of engine.features' image path timed alone, one batch at a time (wall and the
  process's CPU time per image: on a shared machine the CPU time is the figure that load does not inflate): decode (PIL, EXIF, RGB), backbone preprocessing, SSD resize,
  SSD graph, SSD NMS, EfficientNet-Lite0, RoIAlign; "before" = the OpenCV DNN detector
  (blobFromImages + forward + clean) and the graphs with `threads` intra-op threads, as engine.features
  ran until issue 14. Words per image (its 5 captions): GloVe, and MiniLM after (engine.text: one 1-thread
  session, `threads` calls at once, calls cut by piece count) and before (ONNX Runtime's default threads,
  64 captions per call padded to the longest, as engine.text ran until issue 14), with their parity.
- end to end: `Extractor.images_pipelined` over `images` photos (what `python -m engine.features`
  runs: `threads` workers, each batch decoded and run through the graphs on one thread), then the same
  photos' captions through `Extractor.words_pipelined` (glove50, minilm: the reference model's word sets),
  and the "before" image path (one batch at a time: decode, OpenCV SSD, 2-thread graphs) over `reference_images`.
- --cli: `python -m engine.features --word-features glove50 minilm` itself on the same photos (a Flickr8K-format
  folder of them in a temporary directory), timed from outside; its store compared with --reference-store
  (today's Flickr8K store, made by the OpenCV detector): every array of those photos and their captions.
- parity: on the `reference_images` photos both paths' detections (count, classes, boxes, scores), the
  selected boxes, regions and objects; the largest differences, and whether they are within
  PARITY_TOLERANCE.
The machine is shared: the load average at start and end is in the JSON, and for each timed part the CPU
time the REST of the machine used meanwhile (/proc/stat busy time less this process's and its children's).
Run it for short bounded counts (100-400 photos) at normal priority.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
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


def _machine_busy_s() -> float | None:
    """CPU seconds every CPU of the machine has been busy since boot (/proc/stat; None where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _Span:
    """Wall, this process's CPU (its children's too) and the rest of the machine's CPU over a block."""

    def __enter__(self):
        self.start, self.times, self.busy = time.perf_counter(), os.times(), _machine_busy_s()
        return self

    def __exit__(self, *exc):
        end = os.times()
        self.seconds = time.perf_counter() - self.start
        self.cpu = (end.user + end.system) - (self.times.user + self.times.system)
        self.children_cpu = (end.children_user + end.children_system) - (self.times.children_user + self.times.children_system)
        busy = _machine_busy_s()
        self.others_cpu = None if busy is None or self.busy is None else max(0.0, busy - self.busy - self.cpu - self.children_cpu)
        return False

    def record(self, images: int) -> dict:
        return {"seconds": self.seconds, "images_per_s": images / self.seconds,
                "process_cpu_ms_per_image": 1000 * (self.cpu + self.children_cpu) / images,
                "cpu_share": (self.cpu + self.children_cpu) / self.seconds,
                "other_processes_cores": None if self.others_cpu is None else self.others_cpu / self.seconds}


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


def _test_captions(data: Path, paths: list[Path]) -> list[str]:
    """The first CAPTIONS_PER_IMAGE captions of each photo, photo by photo (as the store lists them)."""
    from engine.data import read_flickr8k

    dataset = read_flickr8k(data, data / "images", splits=("test",))
    by_name = {entry.name: entry.captions[:CAPTIONS_PER_IMAGE] for entry in dataset.splits["test"]}
    return [caption for path in paths for caption in by_name[path.name]]


def before_minilm(word_set):
    """encode(captions) as engine.text's MiniLMWords ran until issue 14: one session with ONNX Runtime's default
    intra-op threads (every core, spinning), captions sorted by piece count in calls of 64 padded to the longest."""
    from engine.backends.onnxruntime import open_session
    from engine.text import MINILM_OUTPUT, MAX_WORDS, WordBatch, tokenize_all

    session = open_session(word_set.onnx_path)

    def encode(captions: list[str], max_words: int = MAX_WORDS) -> WordBatch:
        words = tokenize_all(captions, max_words)
        encodings = word_set.tokenizer.encode_batch(words, is_pretokenized=True)
        lengths = np.array([len(w) for w in words], dtype=np.int32)
        vectors = np.zeros((len(words), max_words, word_set.dim), dtype=np.float32)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), 64):
            chunk = order[start:start + 64]
            pieces = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), pieces), dtype=np.int64)
            mask = np.zeros((len(chunk), pieces), dtype=np.int64)
            pool = np.zeros((len(chunk), max_words, pieces), dtype=np.float32)
            for row, i in enumerate(chunk):
                encoding = encodings[i]
                ids[row, :len(encoding.ids)] = encoding.ids
                mask[row, :len(encoding.ids)] = 1
                word_of = np.array([-1 if w is None else w for w in encoding.word_ids])
                piece = np.flatnonzero(word_of >= 0)
                pool[row, word_of[piece], piece] = 1.0
            pool /= np.maximum(pool.sum(axis=2, keepdims=True), 1.0)
            hidden = session.run([MINILM_OUTPUT], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            vectors[chunk] = pool @ hidden
        return WordBatch(vectors, lengths, oov=0, total=int(lengths.sum()))

    return encode


def _time_words(encode, captions: list[str], images: int) -> tuple[dict, np.ndarray]:
    from engine.text import MAX_WORDS

    encode(captions[:8], MAX_WORDS)  # warm-up: sessions, caches
    with _Span() as span:
        batch = encode(captions, MAX_WORDS)
    return {"captions": len(captions), "wall_ms_per_image": 1000 * span.seconds / images,
            "process_cpu_ms_per_image": 1000 * span.cpu / images}, batch.vectors


def words_profile(data: Path, assets: Path, paths: list[Path], threads: int) -> dict:
    """Word features per image (its 5 captions): THE tokenizer + each word set, wall and process CPU; MiniLM
    after (the engine's, `threads` calls at once), its graph calls' share (one thread), before, and their parity."""
    from engine.text import MiniLMWords, load_word_features

    captions, images = _test_captions(data, paths), len(paths)
    out: dict = {}
    try:
        out["glove50"], _ = _time_words(load_word_features("glove50").encode, captions, images)
    except Exception as exc:  # noqa: BLE001  a missing package: say so in the report
        out["glove50"] = {"skipped": str(exc).splitlines()[0]}
    try:
        minilm = load_word_features("minilm", assets, threads=threads)
    except Exception as exc:  # noqa: BLE001  a missing package or graph: say so in the report
        out["minilm"] = {"skipped": str(exc).splitlines()[0]}
        return out
    out["minilm"], after = _time_words(minilm.encode, captions, images)
    out["minilm"]["threads"] = threads
    one = MiniLMWords(minilm.onnx_path, threads=1)  # the split of one thread's CPU: graph calls vs the rest
    run, graph_cpu = one.session.run, [0.0]

    def timed_run(*args, **kwargs):
        start = time.process_time()
        try:
            return run(*args, **kwargs)
        finally:
            graph_cpu[0] += time.process_time() - start

    one.session.run = timed_run
    out["minilm_one_thread"], _ = _time_words(one.encode, captions, images)
    graph_cpu[0] = 0.0
    one.encode(captions)
    out["minilm_one_thread"]["graph_cpu_ms_per_image"] = 1000 * graph_cpu[0] / images
    out["minilm_before"], before = _time_words(before_minilm(minilm), captions, images)
    out["minilm_parity"] = {"captions": len(captions), "identical": bool(np.array_equal(after, before)),
                            "max_abs_diff": float(np.abs(after - before).max()), "tolerance": PARITY_TOLERANCE,
                            "within_tolerance": bool(np.abs(after - before).max() <= PARITY_TOLERANCE)}
    return out


def end_to_end_after(extractor, paths: list[Path], batch: int) -> tuple[dict, list]:
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    with _Span() as span:
        outputs = list(extractor.images_pipelined(batches))
    return {"images": len(paths), "batch": batch, "workers": extractor.workers, **span.record(len(paths))}, outputs


def end_to_end_with_words(extractor, paths: list[Path], captions: list[str], batch: int) -> dict:
    """What `python -m engine.features` computes for these photos, in process: the image batches, then each word set
    of the extractor over their captions in WORD_CHUNK chunks (no store written)."""
    from engine.features import WORD_CHUNK

    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    parts = {}
    with _Span() as whole:
        with _Span() as span:
            for _ in extractor.images_pipelined(batches):
                pass
        parts["images"] = span.record(len(paths))
        for name in extractor.word_sets:
            with _Span() as span:
                for _ in extractor.words_pipelined(name, (captions[i:i + WORD_CHUNK] for i in range(0, len(captions), WORD_CHUNK))):
                    pass
            parts[f"words {name}"] = span.record(len(paths))
    return {"images": len(paths), "captions": len(captions), "batch": batch, "workers": extractor.workers,
            "word_sets": list(extractor.word_sets), **whole.record(len(paths)), "parts": parts}


def end_to_end_before(images_fn, paths: list[Path], batch: int) -> tuple[dict, list]:
    with _Span() as span:
        outputs = [images_fn(paths[i:i + batch]) for i in range(0, len(paths), batch)]
    return {"images": len(paths), "batch": batch, **span.record(len(paths))}, outputs


def run_cli(data: Path, assets: Path, paths: list[Path], threads: int, batch: int, work: Path) -> dict:
    """`python -m engine.features` on these photos only (a Flickr8K-format folder: their captions, split_test.txt),
    --word-features glove50 minilm, timed from outside (process start to exit) and by its own last line."""
    names = {path.name for path in paths}
    lines = [line for line in (data / "captions.txt").read_text(encoding="utf-8").splitlines()
             if line.split("#", 1)[0] in names]
    (work / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (work / "split_test.txt").write_text("\n".join(path.name for path in paths) + "\n", encoding="utf-8")
    store = work / "store"
    command_line = [sys.executable, "-m", "engine.features", "--images", str(data / "images"), "--captions", str(work / "captions.txt"),
                    "--splits", "test", "--out", str(store), "--assets", str(assets), "--word-features", "glove50", "minilm",
                    "--threads", str(threads), "--batch-size", str(batch)]
    with _Span() as span:
        done = subprocess.run(command_line, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"}
    own = re.search(r"done in (\d+) s, ([\d.]+) images/s", done.stdout)
    return {"images": len(paths), "command": " ".join(["python", *command_line[1:]]), **span.record(len(paths)),
            "cli_printed_images_per_s": float(own.group(2)) if own else None, "stdout": done.stdout.strip().splitlines(),
            "store": str(store)}


def compare_stores(store: Path, reference: Path, split: str = "test") -> dict:
    """Every array of `store`'s photos against the same photos and captions in `reference` (today's store)."""
    def lines(root: Path, name: str) -> list[str]:
        return (root / split / f"{name}.txt").read_text(encoding="utf-8").splitlines()

    if not (reference / split / "image_names.txt").is_file():
        return {"skipped": f"no {reference}/{split}"}
    names, ref_names = lines(store, "image_names"), lines(reference, "image_names")
    rows = [ref_names.index(name) for name in names]
    ref_owner = np.load(reference / split / "caption_image.npy")
    ref_caption_rows = np.concatenate([np.flatnonzero(ref_owner == row) for row in rows])
    captions, ref_captions = lines(store, "captions"), lines(reference, "captions")
    out: dict = {"images": len(names), "captions": len(captions),
                 "captions_identical": captions == [ref_captions[i] for i in ref_caption_rows]}
    for array, index in (("regions", rows), ("objects", rows), ("boxes", rows), ("objects_real", rows), ("lengths", ref_caption_rows),
                         ("words_glove50", ref_caption_rows), ("words_minilm", ref_caption_rows)):
        try:
            new, old = np.load(store / split / f"{array}.npy"), np.load(reference / split / f"{array}.npy", mmap_mode="r")[index]
        except OSError as exc:
            out[array] = {"skipped": str(exc).splitlines()[0]}
            continue
        entry = {"identical": bool(np.array_equal(new, old)), "max_abs_diff": float(np.abs(new.astype(np.float64) - old).max())}
        if new.dtype == np.float16:  # how many float16 steps apart (the store's precision)
            def ordered(values: np.ndarray) -> np.ndarray:  # float16 bits as integers in the order of the values
                bits = np.asarray(values).view(np.uint16).astype(np.int32)
                return np.where(bits & 0x8000, -(bits & 0x7FFF), bits & 0x7FFF)

            steps = np.abs(ordered(new) - ordered(old))
            entry.update(values_differing=float((steps > 0).mean()), max_fp16_steps=int(steps.max()))
        out[array] = entry
    return out


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
                   words: bool = True, cli: bool = False, reference_store: Path | None = None) -> dict:
    from engine.features import ExtractConfig, Extractor, find_ssd_onnx

    if not (data / "images").is_dir() or not (assets / "roi_align.json").is_file():
        return {"skipped": f"needs {data}/images and {assets} (python -m export.backbones --out {assets})"}
    if find_ssd_onnx(assets) is None:
        return {"skipped": f"no {assets}/ssd-mobilenet-v2-coco.json (python -m export.detector --out {assets})"}
    paths = _photos(data, images + batch)
    warm, paths = paths[:batch], paths[batch:]
    reference = paths[:min(reference_images, len(paths))]
    word_sets = ("glove50", "minilm") if words and (assets / "minilm.onnx").is_file() else ()
    config = ExtractConfig(images=data / "images", captions=None, out=Path("/nonexistent-not-written"), assets=assets,
                           word_features=word_sets, threads=threads, batch_size=batch, detector_runtime="onnxruntime")
    extractor = Extractor(config)
    extractor.images(warm)  # sessions, first allocations
    before = before_pipeline(assets, threads)
    before[0](warm[:4])
    report: dict = {"load_average_at_start": list(os.getloadavg()), "threads": threads, "batch": batch}
    report["end_to_end_after"], after_outputs = end_to_end_after(extractor, paths, batch)
    if word_sets:
        for name in word_sets:  # warm-up: sessions
            next(iter(extractor.words_pipelined(name, [_test_captions(data, warm[:2])])))
        report["end_to_end_with_words"] = end_to_end_with_words(extractor, paths, _test_captions(data, paths), batch)
    report["end_to_end_before"], before_outputs = end_to_end_before(before[0], reference, batch)
    report["speedup"] = report["end_to_end_after"]["images_per_s"] / report["end_to_end_before"]["images_per_s"]
    report["speedup_cpu"] = (report["end_to_end_before"]["process_cpu_ms_per_image"]
                             / report["end_to_end_after"]["process_cpu_ms_per_image"])
    for part in ("end_to_end_after", "end_to_end_with_words", "end_to_end_before"):  # NOT measured: what the CPU cost would give on idle cores
        if part in report:
            report[part]["projected_images_per_s_on_idle_cores"] = threads * 1000 / report[part]["process_cpu_ms_per_image"]
    report["target_images_per_s"] = TARGET_IMAGES_PER_S
    if cli:
        with tempfile.TemporaryDirectory(prefix="bssan-extraction-") as work:
            report["cli"] = run_cli(data, assets, paths, threads, batch, Path(work))
            if "store" in report["cli"] and reference_store is not None:
                report["cli"]["parity_with_reference_store"] = {"reference": str(reference_store),
                                                                **compare_stores(Path(report["cli"]["store"]), reference_store)}
    report["stages_after"] = stage_profile_after(extractor, reference, batch)
    report["stages_before"] = stage_profile_before(before, reference, batch)
    report["parity"] = parity(before_outputs, after_outputs, extractor, reference)
    report["words"] = words_profile(data, assets, reference, threads) if words else {"skipped": "not asked for"}
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
    words = report["words"]
    if "process_cpu_ms_per_image" in words.get("glove50", {}):
        rows.append(("words glove50 (5 captions, unchanged)", words["glove50"]["process_cpu_ms_per_image"], words["glove50"]["process_cpu_ms_per_image"]))
    if "process_cpu_ms_per_image" in words.get("minilm", {}):
        rows.append(("words minilm (5 captions)", words["minilm_before"]["process_cpu_ms_per_image"], words["minilm"]["process_cpu_ms_per_image"]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [2.2, 1.2]})
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] for r in rows], 0.4, label="before: SSD on OpenCV DNN, 2-thread graphs, MiniLM ORT default threads", color="#c44e52")
    ax.barh(y + 0.2, [r[2] for r in rows], 0.4, label="after: SSD on ONNX Runtime, 1-thread graphs, MiniLM 1-thread calls", color="#4c72b0")
    for yy, r in zip(y, rows):
        ax.text(max(r[1], r[2]) + 1, yy, f"{r[1]:.1f} -> {r[2]:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("CPU ms per image (process CPU time, each stage alone, one batch of 16 at a time)")
    ax.set_xlim(0, 1.25 * max(max(r[1], r[2]) for r in rows))
    ax.legend(loc="center right", fontsize=7)
    bars = [("before\nimages", report["end_to_end_before"], "#c44e52"),
            (f"after\nimages\n({report['end_to_end_after']['workers']} workers)", report["end_to_end_after"], "#4c72b0")]
    if "end_to_end_with_words" in report:
        bars.append(("after\nimages +\nwords", report["end_to_end_with_words"], "#55a868"))
    if "images_per_s" in report.get("cli", {}):
        bars.append(("CLI\n(process,\nall of it)", report["cli"], "#8172b2"))
    x = np.arange(len(bars))
    ax2.bar(x, [b[1]["images_per_s"] for b in bars], color=[b[2] for b in bars])
    ax2.axhline(TARGET_IMAGES_PER_S, color="k", ls="--", lw=1, label=f"target {TARGET_IMAGES_PER_S:g}/s")
    ax2.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax2.set_ylabel("images/s end to end")
    for xx, b in zip(x, bars):
        ax2.text(xx, b[1]["images_per_s"], f"{b[1]['images_per_s']:.1f}", ha="center", va="bottom")
        if "projected_images_per_s_on_idle_cores" in b[1]:
            ax2.plot([xx - 0.35, xx + 0.35], [b[1]["projected_images_per_s_on_idle_cores"]] * 2, color="grey", ls=":", lw=1.5)
    ax2.plot([], [], color="grey", ls=":", label="cores x 1000 / CPU-ms\n(not measured)")
    ax2.set_ylim(0, max(40.0, 1.15 * max(b[1].get("projected_images_per_s_on_idle_cores", b[1]["images_per_s"]) for b in bars)))
    ax2.legend(fontsize=7, loc="upper left")
    load = report["load_average_at_start"][0], report["load_average_at_end"][0]
    others = [part["other_processes_cores"] for part in (report.get(k, {}) for k in ("end_to_end_after", "end_to_end_with_words", "cli"))
              if part.get("other_processes_cores") is not None]
    busy = f"other processes {min(others):.2f}-{max(others):.2f} cores while timed, " if others else ""
    fig.suptitle(f"Feature extraction per stage, Flickr8K test photos, {report['threads']} cores ({busy}"
                 f"1-min load average {load[0]:.1f} -> {load[1]:.1f}, which lags)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _difference(entry: dict) -> str:
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if entry.get("identical"):
        return "identical"
    text = f"max abs diff {entry['max_abs_diff']:.2g}"
    if entry.get("values_differing"):
        text += f" ({entry['values_differing']:.3%} of values, <= {entry['max_fp16_steps']} fp16 steps)"
    return text


def _cores(part: dict) -> str:
    cores = part.get("other_processes_cores")
    return "unknown" if cores is None else f"{cores:.2f} cores"


def print_extraction(report: dict) -> None:
    if "skipped" in report:
        print(f"feature extraction: SKIPPED ({report['skipped']})")
        return
    after, before, p = report["end_to_end_after"], report["end_to_end_before"], report["parity"]
    print(f"feature extraction end to end: {after['images_per_s']:.1f} images/s ({after['images']} photos, {after['workers']} workers; "
          f"{after['process_cpu_ms_per_image']:.0f} CPU-ms/image, {after['cpu_share']:.2f} cores held) vs before "
          f"{before['images_per_s']:.1f} images/s ({before['images']} photos, {before['process_cpu_ms_per_image']:.0f} CPU-ms/image, "
          f"{before['cpu_share']:.2f} cores held): x{report['speedup']:.1f} (CPU x{report['speedup_cpu']:.1f}) "
          f"(load {report['load_average_at_start'][0]:.1f}; other processes {_cores(after)})")
    for name, stages in (("after", report["stages_after"]), ("before", report["stages_before"])):
        print(f"  stages {name} (ms/image, wall / cpu): " + ", ".join(f"{s} {v['wall_ms']:.1f}/{v['cpu_ms']:.1f}" for s, v in stages.items()))
    if "end_to_end_with_words" in report:
        whole = report["end_to_end_with_words"]
        print(f"  with words ({', '.join(whole['word_sets'])}, {whole['captions']} captions): {whole['images_per_s']:.1f} images/s, "
              f"{whole['process_cpu_ms_per_image']:.0f} CPU-ms/image, {whole['cpu_share']:.2f} cores held: "
              + ", ".join(f"{name} {part['seconds']:.1f} s ({part['cpu_share']:.2f} cores)" for name, part in whole["parts"].items())
              + f"; other processes {_cores(whole)}")
    judged = [(name, report[part]["images_per_s"]) for name, part in (("images + words", "end_to_end_with_words"), ("CLI", "cli"))
              if "images_per_s" in report.get(part, {})] or [("images only", after["images_per_s"])]
    print(f"  target {TARGET_IMAGES_PER_S:g} images/s: " + ", ".join(
        f"{name} {rate:.1f} {'MET' if rate >= TARGET_IMAGES_PER_S else 'NOT MET'}" for name, rate in judged))
    cli = report.get("cli")
    if cli:
        if "failed" in cli:
            print(f"  CLI: FAILED {cli['failed']}")
        else:
            print(f"  CLI python -m engine.features (glove50 + minilm) on {cli['images']} photos: {cli['images_per_s']:.1f} images/s "
                  f"process start to exit ({cli['seconds']:.1f} s, {cli['process_cpu_ms_per_image']:.0f} CPU-ms/image; it printed "
                  f"{cli['cli_printed_images_per_s']}; other processes {_cores(cli)})")
            store = cli.get("parity_with_reference_store", {})
            if "images" in store:
                print(f"  CLI store vs {store['reference']} ({store['images']} photos, {store['captions']} captions, captions identical "
                      f"{store['captions_identical']}): " + ", ".join(f"{name} {_difference(v)}" for name, v in store.items() if isinstance(v, dict)))
    words = report["words"]
    for name in ("glove50", "minilm", "minilm_before"):
        if isinstance(words.get(name), dict):
            w = words[name]
            print(f"  words {name}: " + (f"{w['wall_ms_per_image']:.1f} ms wall / {w['process_cpu_ms_per_image']:.1f} CPU-ms per image "
                                         f"({CAPTIONS_PER_IMAGE} captions)" if "wall_ms_per_image" in w else f"SKIPPED ({w.get('skipped')})"))
    if "minilm_parity" in words:
        mp, one = words["minilm_parity"], words["minilm_one_thread"]
        print(f"  minilm one thread: {one['process_cpu_ms_per_image']:.1f} CPU-ms per image, graph calls {one['graph_cpu_ms_per_image']:.1f}; "
              f"parity after vs before on {mp['captions']} captions: {'WITHIN' if mp['within_tolerance'] else 'OUTSIDE'} {mp['tolerance']:g}, "
              f"{_difference(mp)}")
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
    parser.add_argument("--cli", action="store_true", help="also time python -m engine.features (glove50 + minilm) on the "
                        "same photos and compare its store with --reference-store")
    parser.add_argument("--reference-store", type=Path, default=REPO_ROOT.parent / "stores" / "flickr8k",
                        help="today's Flickr8K store, compared with the --cli store (skipped when absent)")
    parser.add_argument("--json", type=output_file, required=True)
    parser.add_argument("--plot", type=output_file, help="bar plot per stage (PNG)")
    args = parser.parse_args(argv)
    info = machine_info(args.threads)
    report = run_extraction(args.data, args.assets, args.images, args.reference_images, args.threads, args.batch, not args.no_words,
                            args.cli, args.reference_store)
    print_extraction(report)
    if args.plot and "skipped" not in report:
        print(f"plot: {plot_stages(report, args.plot)}")
    write_json_atomic(args.json, {"machine": info, "extraction": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
