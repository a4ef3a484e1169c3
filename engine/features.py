"""The extraction command: images and captions -> a feature store (engine/store.py), per split.

    python -m engine.features --images DIR --captions FILE [--format flickr8k|karpathy]
        [--splits train dev test] --out STORE [--assets build/assets] [--word-features glove50 minilm]
        [--detector-runtime auto|onnxruntime|opencv]
        [--batch-size N] [--threads N] [--ray [ADDRESS] [--ray-workers N]]   # --ray: image batches on Ray (docs/ray.md)
    python -m engine.features --format folder --images PHOTOS [--captions LINES] --out STORE   # no split lists:
        every image of PHOTOS is split "all"; LINES (optional) holds '<image file><TAB><caption>' lines

Per image: load + preprocess (engine/vision), detect boxes (engine/detect; top P, padded), the
backbone graph gives the feature map -> regions [R, C], the RoIAlign graph gives objects [P, C].
Per caption: THE tokenizer (engine/text) -> lengths, and one words_<set> array per word-feature set.

- Batched, with a tqdm bar (images/s, ETA); --threads worker threads each take a whole batch (decode, SSD
  through ONNX Runtime, backbone, RoIAlign), one more batch queued (benchmarks/extraction.py measures it).
- Resumable: arrays are memory maps filled batch by batch; after each batch they are flushed and
  the batch index is appended to STORE/<split>/progress.json. After kill -9, the same command
  continues from the first unfinished batch. A word set is computed into `words_<set>.partial`
  and renamed when complete, so a half-written set is never visible. One writer per store:
  STORE/.lock is held while the command runs, and a second one is refused; holding it, the
  command deletes temp files a killed writer left. Progress files are fsynced with their folder.
  Ctrl-C prints "interrupted; rerun the same command to continue" and exits 130.
- Checked before any work: every number (--batch-size, --boxes, --threads, --max-words >= 1,
  --min-score in [0, 1]) at parse time, and --out (a folder that can be written).
- Deterministic: same inputs and assets give the same bytes (ONNX Runtime CPU and OpenCV DNN give
  bit-equal outputs run to run, for any thread count or batch split; checked here).
- Content-hashed: each split records the sha256 of its image files and of its captions; a rerun
  with unchanged inputs recomputes nothing and says so. Adding a word-feature set later computes
  only that set. Changed images or captions recompute only what depends on them.
- A bad image never stops the run: it is reported (file and reason), its regions and objects are
  zeros, its boxes are the padding boxes with objects_real 0, and it is listed in the manifest
  under splits.<split>.bad_images (consumers drop or keep it knowingly).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from engine.cli import ArgumentParser, check_output_dir, command, positive_int, unit_float
from engine.data import FOLDER_SPLIT, Dataset, read_flickr8k, read_folder, read_karpathy
from engine.detect import (
    DEFAULT_MIN_SCORE, SSD_ONNX_STEM, OnnxDetector, SsdMobileNetV2, SsdMobileNetV2Onnx, find_ssd_onnx, padding_boxes, select_boxes,
)
from engine.errors import AssetError, CaptionError, DataError, InputError, StoreError
from engine.files import exclusive_lock, file_sha256, write_json_atomic, write_point
from engine.store import MANIFEST_NAME, StoreWriter, check_finite
from engine.text import DEFAULT_ASSETS_DIR, MAX_WORDS, load_word_features, tokenize_all
from engine.vision import (
    EXIF_ORIENTATION, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ObjectFeatures, RegionBackbone, load_batch, regions_from_feature_map,
)

DEFAULT_BACKBONE = "efficientnet-lite0-7x7"  # the asset stem written by python -m export.backbones
DEFAULT_BOXES = 10  # the paper's P: top-10 detector boxes per image
DEFAULT_BATCH = 16  # images per graph call: larger gains nothing on 2 cores, costs resume granularity
WORD_CHUNK = 1024  # captions per word-feature call (MiniLM batches inside)
DETECTOR_RUNTIMES = ("auto", "onnxruntime", "opencv")
GRAPH_THREADS = 1  # intra-op threads per graph session: the parallelism is ExtractConfig.threads workers
PROGRESS_NAME = "progress.json"
LOCK_NAME = ".lock"
# describe() keys that are local paths, not content (the content is identified by sha256 fields)
WORD_SET_LOCAL_KEYS = ("cache", "onnx")
ObserveBatch = Callable[[str, int], None]


class CaptionFormat(str, enum.Enum):
    FLICKR8K = "flickr8k"  # captions.txt `<image>#<n>\t<caption>` + split_<split>.txt beside it
    KARPATHY = "karpathy"  # dataset_*.json of the Karpathy splits
    FOLDER = "folder"  # every image of --images as one split; --captions optional, `<image><TAB><caption>` lines


@dataclass
class ExtractConfig:
    images: Path
    captions: Path | None  # None: a plain folder of images without captions (format folder)
    out: Path
    format: CaptionFormat = CaptionFormat.FLICKR8K
    splits: tuple[str, ...] = ("train", "dev", "test")
    assets: Path = DEFAULT_ASSETS_DIR
    backbone: str = DEFAULT_BACKBONE
    detector_onnx: Path | None = None  # a Faster R-CNN ONNX file instead of SSD (see engine/detect.py)
    # SSD's runtime: "auto" = ONNX Runtime when <assets>/ssd-mobilenet-v2-coco.json exists (python -m export.detector;
    # ~4x faster, same boxes within 1e-5), else OpenCV DNN with a note; "onnxruntime" or "opencv" to insist on one
    detector_runtime: str = "auto"
    boxes_per_image: int = DEFAULT_BOXES
    min_score: float = DEFAULT_MIN_SCORE
    word_features: tuple[str, ...] = ("glove50",)
    max_words: int = MAX_WORDS
    batch_size: int = DEFAULT_BATCH
    threads: int = 2  # this machine's core count: worker threads, each running whole batches through one-thread
    # graph sessions (bit-equal to any other split; ~1.5x the images/s of 2 intra-op threads, measured); OpenCV DNN's threads
    backend: str = "onnxruntime-cpu"  # the graphs' ONNX Runtime provider (engine.backends.onnxruntime.session_backend)
    cache_dir: Path | None = None  # word-vector cache (engine/text); None = its default

    def __post_init__(self) -> None:
        """The library's check of what the command line checks at parse time: a bad number never runs."""
        for name in ("boxes_per_image", "max_words", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ExtractConfig.{name}={value!r}: expected an integer >= 1")
        if not (isinstance(self.min_score, (int, float)) and 0.0 <= self.min_score <= 1.0):
            raise InputError(f"ExtractConfig.min_score={self.min_score!r}: expected a number in [0, 1]")
        if self.detector_runtime not in DETECTOR_RUNTIMES:
            raise InputError(f"ExtractConfig.detector_runtime={self.detector_runtime!r}: expected one of {DETECTOR_RUNTIMES}")


@dataclass
class SplitReport:
    images: int
    computed: int = 0  # images run through the graphs in this call (0 when up to date)
    bad_images: list[dict] = field(default_factory=list)
    mean_real_boxes: float = 0.0
    oov: dict[str, float] = field(default_factory=dict)
    up_to_date: bool = False


def progress_bar(**kwargs) -> tqdm:
    """tqdm on stderr with rate and ETA; into a log file (not a tty) one line per 30 s, never silent for long."""
    return tqdm(file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0, miniters=1, **kwargs)


def read_dataset(config: ExtractConfig) -> Dataset:
    if config.format == CaptionFormat.FOLDER:
        if len(config.splits) != 1:
            raise DataError(f"--splits {list(config.splits)}: a plain folder of images is one split; expected one name")
        return read_folder(config.images, config.captions, split=config.splits[0])
    if config.captions is None:
        raise DataError(f"--captions: missing; expected the captions file of the {config.format.value} format")
    if config.format == CaptionFormat.FLICKR8K:
        return read_flickr8k(config.captions.parent, config.images, splits=tuple(config.splits), captions_file=config.captions.name)
    dataset = read_karpathy(config.captions, config.images)
    absent = [s for s in config.splits if s not in dataset.splits]
    if absent:
        raise DataError(f"{config.captions}: no split {absent}; the file has {sorted(dataset.splits)}")
    return dataset


def images_sha256(dataset: Dataset, names: list[str]) -> str:
    """One digest over every image's name and bytes, in order: any change to any file changes it."""
    digest = hashlib.sha256()
    for name in names:
        path = dataset.images_dir / name
        digest.update(name.encode() + b"\0" + (file_sha256(path).encode() if path.is_file() else b"missing") + b"\n")
    return digest.hexdigest()


def captions_sha256(captions: list[str], caption_image: np.ndarray) -> str:
    digest = hashlib.sha256()
    for caption, image in zip(captions, caption_image.tolist()):
        digest.update(f"{image}\t{caption}\n".encode())
    return digest.hexdigest()



def run_ahead(pool: ThreadPoolExecutor, work: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """work(item) of each item, yielded in order, with up to ahead + 1 items submitted to `pool` at once. A consumer
    that stops early (an exception, a break) cancels what is queued; the calls already running finish and are dropped."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()

class Extractor:
    """The loaded graphs, detector and word-feature sets; `describe()` is the store's extractor entry."""

    def __init__(self, config: ExtractConfig):
        self.config = config
        self.workers = config.threads
        self.backbone = RegionBackbone.from_manifest(config.assets / f"{config.backbone}.json", GRAPH_THREADS, config.backend)
        self.objects = ObjectFeatures.from_manifest(config.assets / "roi_align.json", GRAPH_THREADS, config.backend)
        self.detector = make_detector(config)
        self.word_sets = {}
        for name in config.word_features:
            word_set = load_word_features(name, config.assets, config.cache_dir, config.backend, threads=config.threads)
            self.word_sets[word_set.name] = word_set

    def describe(self) -> dict:
        return {
            "name": "engine.features",
            "backbone": self.backbone.describe(),
            "objects": self.objects.describe(),
            "detector": self.detector.describe(),
            "boxes_per_image": self.config.boxes_per_image,
            "max_words": self.config.max_words,
            "image_loading": {
                "min_side": MIN_IMAGE_SIDE, "max_pixels": MAX_IMAGE_PIXELS, "exif_orientation": EXIF_ORIENTATION,
                "transparency": "composited on white",
                "bad_image": "zero regions and objects, padding boxes, objects_real 0, listed in splits.<split>.bad_images",
            },
            "runtime": {"onnxruntime": importlib.metadata.version("onnxruntime"), "numpy": np.__version__},
        }

    def load(self, paths: list[Path]) -> LoadedBatch:
        """The CPU work before the graphs (decode, backbone preprocessing, the detector's resize); runs in the
        loader thread of `images_pipelined` while the previous batch is in the graphs."""
        batch, decoded, bad = load_batch(paths, self.backbone.preprocessing)
        good = [i for i, image in enumerate(decoded) if image is not None]
        rgb = [np.asarray(decoded[i]) for i in good]
        pixels = (np.stack([self.detector.prepare(image) for image in rgb]) if rgb else None) \
            if isinstance(self.detector, SsdMobileNetV2Onnx) else rgb
        return LoadedBatch(len(paths), batch, good, pixels, bad)

    def infer(self, loaded: LoadedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """A loaded batch through the detector, backbone and RoIAlign graphs (see `images`)."""
        count = self.config.boxes_per_image
        boxes = np.tile(padding_boxes(count), (loaded.size, 1, 1))  # [B, P, 4]
        real = np.zeros(loaded.size, dtype=np.int16)
        if loaded.good:
            found_all = (self.detector.run_prepared(loaded.detector_input) if isinstance(self.detector, SsdMobileNetV2Onnx)
                         else self.detector.detect(loaded.detector_input))
            for i, found in zip(loaded.good, found_all):
                boxes[i], real[i] = select_boxes(found, count)
        feature_map = self.backbone.run(loaded.images)  # [B, C, h, w]
        objects = self.objects.run(feature_map, boxes)  # [B, P, C]
        regions = regions_from_feature_map(feature_map)  # [B, R, C]
        for i in loaded.bad:
            regions[i], objects[i] = 0.0, 0.0
        return regions, objects, boxes, real, loaded.bad

    def images_serial(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """`images` in the calling thread only."""
        return self.infer(self.load(paths))

    def images(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """A batch of image files -> regions [B, R, C], objects [B, P, C], boxes [B, P, 4], real [B], bad {i: reason}.
        Cut into `threads` contiguous parts run side by side (the graphs give bit-equal outputs for any split)."""
        parts = min(self.workers, len(paths))
        if parts <= 1:
            return self.images_serial(paths)
        bounds = np.linspace(0, len(paths), parts + 1).round().astype(int)
        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="bssan-images") as pool:
            results = list(pool.map(self.images_serial, [paths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
        bad = {int(start) + i: reason for start, result in zip(bounds, results) for i, reason in result[4].items()}
        return (*(np.concatenate([result[k] for result in results]) for k in range(4)), bad)

    def words_pipelined(self, name: str, chunks: Iterable[list[str]]):
        """`word_sets[name].encode` of each chunk of captions, in order, the next chunk encoded while the caller stores
        this one (MiniLM's encode runs `threads` calls at once itself); an error is raised at its own chunk, and a
        consumer that stops early waits for the chunk in flight, which is dropped (engine.distributed's RayExtractor: on Ray)."""
        word_set, max_words = self.word_sets[name], self.config.max_words
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bssan-words") as pool:
            yield from run_ahead(pool, lambda captions: word_set.encode(list(captions), max_words), chunks, ahead=1)

    def images_pipelined(self, batches: Iterable[list[Path]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str]]]:
        """`images` of each batch, in order, with `threads` batches in the graphs at once (each on one worker
        thread: decode, detector, backbone, RoIAlign) and one more queued, so no core waits while the caller
        stores a batch. The same outputs as `images`, batch by batch. A consumer that stops early (an
        exception, a break) waits for the batches in flight, which are dropped."""
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bssan-images") as pool:
            yield from run_ahead(pool, lambda paths: self.images_serial(list(paths)), batches, ahead=self.workers)


@dataclass
class LoadedBatch:
    """A batch after `Extractor.load`: what the graphs need, nothing decoded twice."""

    size: int
    images: np.ndarray  # float32 [B, 3, S, S], the backbone's input (zeros for a bad image)
    good: list[int]  # indices of the images that could be read
    detector_input: object  # uint8 [G, 300, 300, 3] for the ONNX SSD, else the RGB arrays of the good images
    bad: dict[int, str]


def make_detector(config: ExtractConfig):
    """The detector `config` asks for: a user's ONNX file, else SSD through ONNX Runtime (the converted graph
    in the assets folder) or OpenCV DNN, per `config.detector_runtime` (module docstring of engine/detect.py)."""
    if config.detector_onnx:
        return OnnxDetector(config.detector_onnx, config.min_score, GRAPH_THREADS, config.backend)
    manifest = find_ssd_onnx(config.assets)
    if config.detector_runtime == "opencv" or (config.detector_runtime == "auto" and manifest is None):
        if config.detector_runtime == "auto":
            print(f"note: {config.assets}/{SSD_ONNX_STEM}.json not found: the SSD detector runs on OpenCV DNN (~4x slower, "
                  f"same boxes); build it with python -m export.detector --out {config.assets}", file=sys.stderr)
        return SsdMobileNetV2(config.min_score, config.threads)
    if manifest is None:
        raise AssetError(f"{config.assets}/{SSD_ONNX_STEM}.json: not found; expected the converted SSD graph "
                         f"(python -m export.detector --out {config.assets}) for detector runtime onnxruntime")
    return SsdMobileNetV2Onnx(manifest, config.min_score, GRAPH_THREADS, config.backend)


def rerunnable_extractor(extractor: dict, where, instead: str) -> tuple[dict, dict]:
    """(backbone, detector) records of a store's extractor whose image pipeline can be rerun on new files;
    AssetError naming `where` otherwise. `instead` ends the message: what the caller can do instead."""
    backbone, detector = extractor.get("backbone") or {}, extractor.get("detector") or {}
    if extractor.get("name") != "engine.features" or "graph" not in backbone:
        raise AssetError(f"{where}: the model's features came from {extractor.get('name')!r}, which has no image "
                         f"pipeline to rerun; expected features made by python -m engine.features ({instead})")
    if detector.get("name") != "ssd-mobilenet-v2-coco":
        raise AssetError(f"{where}: the model's boxes came from detector {detector.get('name')!r}; from image files "
                         f"only ssd-mobilenet-v2-coco is rerun ({instead})")
    return backbone, detector


def image_array_shapes(n_img: int, extractor: Extractor) -> dict[str, tuple[int, ...]]:
    grid, channels, count = extractor.backbone.grid, extractor.backbone.channels, extractor.config.boxes_per_image
    return {"regions": (n_img, grid * grid, channels), "objects": (n_img, count, channels), "boxes": (n_img, count, 4), "objects_real": (n_img,)}


def has_arrays(split_dir: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Every named .npy exists with its shape (a manifest entry alone does not prove the files are there)."""
    for name, shape in shapes.items():
        try:
            if np.load(split_dir / f"{name}.npy", mmap_mode="r").shape != shape:
                return False
        except (OSError, ValueError):
            return False
    return True


def extract_images(writer: StoreWriter, split: str, paths: list[Path], digest: str, extractor: Extractor,
                   observe: ObserveBatch | None) -> tuple[list[dict], int]:
    """Fill the image arrays of a split, resuming from its progress file; returns (bad images, images computed)."""
    progress_path = writer.root / split / PROGRESS_NAME
    progress = json.loads(progress_path.read_text(encoding="utf-8")) if progress_path.is_file() else {}
    shapes = image_array_shapes(len(paths), extractor)
    if progress.get("images_sha256") != digest or not has_arrays(writer.root / split, shapes):  # arrays gone: their batches too
        progress = {"images_sha256": digest, "batch_size": extractor.config.batch_size, "done": [], "bad": {}}
    batch_size = progress["batch_size"]  # a resumed run keeps the batch layout it started with
    if batch_size != extractor.config.batch_size:
        print(f"{split}: resuming with batch size {batch_size} from {progress_path}", file=sys.stderr)
    arrays = {name: writer.open_array(split, name, shape) for name, shape in shapes.items()}
    done = set(progress["done"])
    todo = [b for b in range((len(paths) + batch_size - 1) // batch_size) if b not in done]
    already = len(paths) - sum(min(batch_size, len(paths) - b * batch_size) for b in todo)
    computed = 0
    rows_of = [slice(b * batch_size, min((b + 1) * batch_size, len(paths))) for b in todo]
    computed_batches = extractor.images_pipelined(paths[rows] for rows in rows_of)  # next batch decoded meanwhile
    with progress_bar(total=len(paths), initial=already, desc=f"{split} images", unit="img") as bar, \
            contextlib.closing(computed_batches):
        for b, rows, (regions, objects, boxes, real, bad) in zip(todo, rows_of, computed_batches):
            check_finite(regions, f"{split} regions of batch {b}")
            check_finite(objects, f"{split} objects of batch {b}")
            arrays["regions"][rows], arrays["objects"][rows] = regions, objects
            arrays["boxes"][rows], arrays["objects_real"][rows] = boxes, real
            for array in arrays.values():
                array.flush()
            write_point()
            for i, reason in bad.items():
                name = paths[rows.start + i].name
                progress["bad"][name] = reason.replace(str(paths[rows.start + i].parent) + os.sep, "")
                tqdm.write(f"bad image: {reason}", file=sys.stderr)
            progress["done"].append(b)
            write_json_atomic(progress_path, progress, fsync=True)  # after the flush: a listed batch is on disk
            computed += rows.stop - rows.start
            bar.update(rows.stop - rows.start)
            bar.set_postfix(bad=len(progress["bad"]), refresh=False)
            if observe is not None:
                observe(split, b)
    bad_images = [{"name": name, "reason": progress["bad"][name]} for name in sorted(progress["bad"])]
    return bad_images, computed


def _identity(description: dict) -> dict:
    return {k: v for k, v in description.items() if k not in WORD_SET_LOCAL_KEYS}


def extract_words(writer: StoreWriter, split: str, captions: list[str], lengths: np.ndarray, word_set, max_words: int,
                  encode_chunks: Callable[[Iterable[list[str]]], Iterator] | None = None) -> dict:
    """Compute words_<set> for a split into a .partial file, then rename; returns its manifest entry.
    `encode_chunks`: the encoded chunks, in order (Extractor.words_pipelined); default word_set.encode each."""
    path = writer.root / split / f"words_{word_set.name}.npy"
    partial = path.with_name(f"words_{word_set.name}.partial")  # not *.npy: never listed as a set
    vectors = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(captions), max_words, word_set.dim))
    oov = total = 0
    starts = range(0, len(captions), WORD_CHUNK)
    chunks = (encode_chunks or (lambda parts: (word_set.encode(part, max_words) for part in parts)))(
        captions[start:start + WORD_CHUNK] for start in starts)
    for start in progress_bar(iterable=starts, desc=f"{split} words {word_set.name}", unit="chunk"):
        try:
            chunk = next(chunks)
        except CaptionError as exc:  # its index counts from the chunk: name the split's caption and its image
            if exc.index is None:
                raise
            raise CaptionError(f"split {split} caption {start + exc.index} ({captions[start + exc.index][:60]!r}): {exc.reason}") from None
        if not np.array_equal(chunk.lengths, lengths[start:start + WORD_CHUNK]):
            raise StoreError(f"{word_set.name}: word counts differ from engine.text.tokenize for captions {start}..; expected one tokenizer")
        check_finite(chunk.vectors, f"{split} words_{word_set.name} of captions {start}..")
        vectors[start:start + len(chunk.lengths)] = chunk.vectors
        oov, total = oov + chunk.oov, total + chunk.total
    vectors.flush()
    del vectors
    write_point()
    os.replace(partial, path)
    write_point()
    return {"features": _identity(word_set.describe()), "oov_words": oov, "words": total, "oov_rate": oov / max(total, 1)}


def extract_split(writer: StoreWriter, split: str, dataset: Dataset, extractor: Extractor, observe: ObserveBatch | None) -> SplitReport:
    config = extractor.config
    entries = dataset.splits[split]
    names = [entry.name for entry in entries]
    captions = [caption for entry in entries for caption in entry.captions]
    caption_image = np.repeat(np.arange(len(entries), dtype=np.int32), [len(e.captions) for e in entries])  # [N_cap]
    lengths = np.array([len(words) for words in tokenize_all(captions, config.max_words)], dtype=np.int32)  # [N_cap]
    inputs = {"images_sha256": images_sha256(dataset, names), "captions_sha256": captions_sha256(captions, caption_image),
              "captions_file": config.captions.name if config.captions is not None else None}
    previous = writer.manifest["splits"].get(split, {})
    old_inputs = previous.get("inputs", {})
    split_dir = writer.root / split
    images_done = old_inputs.get("images_sha256") == inputs["images_sha256"] and has_arrays(split_dir, image_array_shapes(len(names), extractor))
    captions_done = old_inputs.get("captions_sha256") == inputs["captions_sha256"] and has_arrays(
        split_dir, {"caption_image": caption_image.shape, "lengths": lengths.shape})
    old_sets = previous.get("word_sets", {}) if captions_done else {}
    sets_todo = [name for name, word_set in extractor.word_sets.items()
                 if old_sets.get(name, {}).get("features") != _identity(word_set.describe())
                 or not has_arrays(split_dir, {f"words_{name}": (len(captions), config.max_words, word_set.dim)})]
    if images_done and captions_done and not sets_todo:
        (split_dir / PROGRESS_NAME).unlink(missing_ok=True)  # a run killed after finishing the split, before this
        return SplitReport(len(names), bad_images=previous["bad_images"], mean_real_boxes=previous["mean_real_boxes"],
                           oov={n: s["oov_rate"] for n, s in old_sets.items()}, up_to_date=True)
    if previous:  # the split is being rewritten in place: unlist it first, so no reader trusts half of it
        del writer.manifest["splits"][split]
        write_json_atomic(writer.root / MANIFEST_NAME, writer.manifest)
    if not captions_done:
        for stale in split_dir.glob("words_*.npy"):
            stale.unlink()  # word sets of other captions
        old_sets = {}
    writer.write_lines(split, "image_names", names)
    writer.write_lines(split, "captions", captions)
    writer.open_array(split, "caption_image", caption_image.shape)[:] = caption_image
    writer.open_array(split, "lengths", lengths.shape)[:] = lengths
    if images_done:
        bad_images, computed = previous["bad_images"], 0
    else:
        bad_images, computed = extract_images(writer, split, [dataset.images_dir / n for n in names], inputs["images_sha256"], extractor, observe)
    word_sets = {name: entry for name, entry in old_sets.items() if name not in sets_todo}
    for name in sets_todo:
        word_sets[name] = extract_words(writer, split, captions, lengths, extractor.word_sets[name], config.max_words,
                                        functools.partial(extractor.words_pipelined, name))
    bad_names = {bad["name"] for bad in bad_images}
    real = np.asarray(writer.open_array(split, "objects_real", (len(names),)))[[n not in bad_names for n in names]]
    mean_real = float(real.mean()) if real.size else 0.0  # over the images that could be read
    writer.finish_split(split, {"images": len(names), "captions": len(captions), "inputs": inputs, "bad_images": bad_images,
                                "mean_real_boxes": mean_real, "word_sets": dict(sorted(word_sets.items()))})
    (split_dir / PROGRESS_NAME).unlink(missing_ok=True)
    return SplitReport(len(names), computed, bad_images, mean_real, {n: s["oov_rate"] for n, s in word_sets.items()})


@contextlib.contextmanager
def lock_store(root: Path):
    """An exclusive lock on STORE/.lock while the block runs (the OS drops it even on kill -9), with the
    temp files of a killed writer removed. Two writers would each keep their own progress list and redo
    each other's batches."""
    busy = f"{root}: another engine.features process is writing this store; wait for it to finish or use another --out"
    with exclusive_lock(root / LOCK_NAME, busy, StoreError):
        for stale in list(root.glob(".*.tmp-*")) + list(root.glob("*/.*.tmp-*")):  # left by a writer killed mid-write
            if stale.is_file():
                stale.unlink(missing_ok=True)
        yield


def extract(config: ExtractConfig, observe: ObserveBatch | None = None,
            make_extractor: Callable[[ExtractConfig], Extractor] = Extractor) -> dict[str, SplitReport]:
    """Run the extraction (or the part of it not done yet); `observe(split, batch)` is called after each stored batch.
    `make_extractor`: engine.distributed's RayExtractor runs the image batches on Ray (--ray), same store bytes."""
    check_output_dir(config.out)
    dataset = read_dataset(config)
    for warning in dataset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    extractor = make_extractor(config)
    with lock_store(config.out):
        writer = StoreWriter(config.out, extractor.describe())
        return {split: extract_split(writer, split, dataset, extractor, observe) for split in config.splits}


@command(interrupted="interrupted; rerun the same command to continue")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m engine.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of the image files")
    parser.add_argument("--captions", type=Path, help="captions.txt (flickr8k, split_*.txt beside it), a Karpathy JSON, or "
                        "for --format folder an optional file of '<image file><TAB><caption>' lines")
    parser.add_argument("--format", choices=[f.value for f in CaptionFormat], default=CaptionFormat.FLICKR8K.value)
    parser.add_argument("--splits", nargs="+", help=f"default train dev test; {FOLDER_SPLIT!r} for --format folder")
    parser.add_argument("--out", type=Path, required=True, help="store directory (created, or resumed)")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS_DIR, help="graphs from python -m export.backbones / export.text")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="asset stem: efficientnet-lite0-7x7, efficientnet-lite0-14x14, vgg19-14x14")
    parser.add_argument("--detector-onnx", type=Path, help="a Faster R-CNN ONNX file instead of SSD-MobileNet-v2 (I/O: engine/detect.py)")
    parser.add_argument("--detector-runtime", choices=DETECTOR_RUNTIMES, default="auto", help="SSD on ONNX Runtime (the graph of "
                        "python -m export.detector in --assets; auto: when it is there) or on OpenCV DNN (same boxes, ~4x slower)")
    parser.add_argument("--boxes", type=positive_int, default=DEFAULT_BOXES, help="P, boxes per image")
    parser.add_argument("--min-score", type=unit_float, default=DEFAULT_MIN_SCORE, help="detector score for a box to count as real")
    parser.add_argument("--word-features", nargs="+", default=["glove50"], help="glove50, minilm, or a GloVe/word2vec text file")
    parser.add_argument("--max-words", type=positive_int, default=MAX_WORDS)
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="image batches on a Ray cluster "
                        "(HOST:PORT of its head, 'auto'; no ADDRESS: a local instance); same store bytes (docs/ray.md)")
    parser.add_argument("--ray-workers", type=positive_int, help="--ray: actors of --threads CPUs each (default: as many as fit)")
    args = parser.parse_args(argv)
    if args.ray is not None:  # before any work: Ray installed, the address reachable
        from engine.distributed import check_ray

        check_ray(args.ray)
    fmt = CaptionFormat(args.format)
    splits = tuple(args.splits or ((FOLDER_SPLIT,) if fmt is CaptionFormat.FOLDER else ("train", "dev", "test")))
    config = ExtractConfig(
        images=args.images, captions=args.captions, out=args.out, format=fmt, splits=splits, assets=args.assets,
        backbone=args.backbone, detector_onnx=args.detector_onnx, detector_runtime=args.detector_runtime,
        boxes_per_image=args.boxes, min_score=args.min_score,
        word_features=tuple(args.word_features), max_words=args.max_words, batch_size=args.batch_size, threads=args.threads,
    )
    start = time.perf_counter()
    if args.ray is not None:
        from engine.distributed.features import extract_on_ray

        reports = extract_on_ray(config, args.ray, args.ray_workers)
    else:
        reports = extract(config)
    seconds = time.perf_counter() - start
    for split, report in reports.items():
        oov = ", ".join(f"{name} OOV {rate:.2%}" for name, rate in report.oov.items())
        state = "up to date, nothing recomputed" if report.up_to_date else f"{report.computed} images computed"
        print(f"{split}: {report.images} images ({state}), {len(report.bad_images)} bad, "
              f"mean real boxes {report.mean_real_boxes:.2f} of {config.boxes_per_image}, {oov}")
    computed = sum(r.computed for r in reports.values())
    rate = f", {computed / seconds:.1f} images/s" if computed else ""
    print(f"{config.out}: done in {seconds:.0f} s{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
