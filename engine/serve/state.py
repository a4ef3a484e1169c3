"""What a running service holds: the scorer, the gallery, the caption collection, the search
service, and the first indexing of the gallery folder (a background thread; /readyz waits for it).

--import-store STORE: before the folder is indexed, the folder's images that a feature store
(python -m engine.features) already holds are encoded from the store's region/object features
(the image graphs only: ~100x faster than decoding and running the backbone and detector), so a
large folder is served in minutes. The store must come from the feature pipeline the model was
trained with (its extractor record is the artifact's preprocessing record, less the fingerprints
the exporter adds); the folder's other images are then encoded from their files as usual."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path

import numpy as np

from engine.cache import CaptionCache, ImageCache
from engine.errors import DataError, InputError
from engine.files import file_sha256
from engine.runtime import Scorer
from engine.serve.gallery import Gallery
from engine.serve.service import SearchService

log = logging.getLogger("engine.serve")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # as engine.score reads folders


def read_caption_lines(path: Path) -> list[str]:
    """One caption a line (blank lines skipped); not UTF-8 is a DataError naming the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected one caption a line") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); expected a file of captions, one a line") from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise DataError(f"{path}: no caption; expected one caption a line")
    return captions


def load_captions(path: Path, scorer: Scorer, index_dir: Path) -> CaptionCache:
    """The caption collection, encoded once and cached in the index folder (keyed by the file's sha256)."""
    key = hashlib.sha256(f"{file_sha256(path)}:{scorer.fingerprint}:{scorer.cache_precision}".encode()).hexdigest()[:16]
    cached = index_dir / f"captions-{key}"
    if cached.is_dir():
        return CaptionCache.load(cached, expect=scorer.fingerprint, precision=scorer.cache_precision, mmap=True)
    texts = read_caption_lines(path)
    cache = scorer.encode_captions(texts, ids=[f"{path.name}:{i + 1}" for i in range(len(texts))], progress=True)
    cache.save(cached)
    return cache


IMPORT_CHUNK = 1024  # store rows encoded per step of an import (the arrays of 1,024 images: ~190 MB at the reference sizes)


def _without_fingerprints(record):
    """The extractor record without what does not make the features: fingerprints, graph bytes' sha256 (checked apart:
    graph_differences) and the parity figures measured when the graphs were exported (`parity_*`: the same graphs exported
    beside another OpenCV give another last digit)."""
    if isinstance(record, dict):
        return {k: _without_fingerprints(v) for k, v in record.items()
                if k not in ("fingerprint", "graph_sha256") and not k.startswith("parity")}
    return record


def graph_differences(trained: dict, store: dict) -> list[str]:
    """Sections (backbone, objects) whose graphs are not the same: engine.assets.check_same_graph's rule on the two
    records alone: the same sha256, or else both fingerprints recorded and within tolerance of each other (session 14:
    the backbone exported on its Xeon had other bytes than the reference's, its probe outputs within ~2e-6)."""
    from engine.assets import FINGERPRINT_TOLERANCE, fingerprint_difference

    differ = []
    for section in sorted(set(trained) | set(store)):
        a, b = trained.get(section), store.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict) or a.get("graph_sha256") == b.get("graph_sha256"):
            continue
        fa, fb = a.get("fingerprint"), b.get("fingerprint")
        tolerance = float((fa or {}).get("tolerance", FINGERPRINT_TOLERANCE))
        if not (isinstance(fa, dict) and isinstance(fb, dict) and fingerprint_difference(fa, fb) <= tolerance):
            differ.append(f"{section} (graph sha256 differs and the fingerprints do not match)")
    return differ


GALLERY_ROWS = ("fp32", "fp16")
HALF_ROWS = ("regions_attn", "regions_values")  # a gallery image's W2R rows: ~93% of its bytes at the reference sizes


def gallery_row_dtypes(gallery_rows: str, scorer: Scorer) -> dict[str, str] | None:
    """The Gallery's row_dtypes for --gallery-rows: fp16 stores HALF_ROWS at half the memory, which only the W2R
    kernel reads (it widens them itself: engine/kernels); InputError on any other scoring path."""
    if gallery_rows not in GALLERY_ROWS:
        raise InputError(f"--gallery-rows {gallery_rows!r}: expected one of {list(GALLERY_ROWS)}")
    if gallery_rows == "fp32":
        return None
    kernel = scorer.w2r_kernel
    if scorer.path != "kernel" or kernel is None or kernel.input_weight_u_t is not None:
        raise InputError(f"--gallery-rows fp16: the W2R kernel reads fp16 rows, and this scorer's path is {scorer.path} "
                         f"({scorer.path_reason}); expected --path kernel with a W2R kernel over regions_values")
    return {name: "float16" for name in HALF_ROWS}


def check_store_pipeline(artifact, store_manifest: dict, store_dir: Path) -> None:
    """InputError unless the store's features come from the pipeline the artifact's model was trained on."""
    info = artifact.manifest.get("preprocessing") or {}
    trained_record, store_record = info.get("extractor", info) or {}, store_manifest.get("extractor") or {}
    trained, store = _without_fingerprints(trained_record), _without_fingerprints(store_record)
    differ = sorted(k for k in set(trained) | set(store) if trained.get(k) != store.get(k))
    differ += graph_differences(trained_record, store_record)
    if not trained or differ:
        raise InputError(f"--import-store {store_dir}: its extractor differs from the model's preprocessing in "
                         f"{', '.join(differ or ['(no record)'])}; expected features made by the pipeline the model was trained with")


def import_store(scorer: Scorer, gallery: Gallery, store_dir: Path, names: set[str], progress: bool = True,
                 on_progress=None, stop=None) -> int:
    """Encode from the store's features every image of `names` (file names of the gallery folder) that the store holds
    and the gallery does not (nor removed through the API: Gallery.wanted_from_folder); put them in one durable step
    (those uploaded or removed meanwhile left out). Returns how many were encoded."""
    from tqdm import tqdm

    from engine.store import FeatureStore

    store = FeatureStore(store_dir)
    check_store_pipeline(scorer.artifact, store.manifest, Path(store_dir))
    todo = []  # (split features, rows)
    for split in store.splits:
        features = store.split(split)
        rows = [i for i, name in enumerate(features.image_names) if name in names and gallery.wanted_from_folder(name)]
        if rows:
            todo.append((features, np.asarray(rows, np.int64)))
    total = sum(len(rows) for _, rows in todo)
    if not total:
        return 0
    parts = []
    with tqdm(total=total, desc="importing store features", unit="image", disable=not progress) as bar:
        for features, rows in todo:
            regions, objects, image_names = features.regions, features.objects, features.image_names
            for start in range(0, len(rows), IMPORT_CHUNK):
                if stop is not None and stop.is_set():
                    return 0  # nothing written: the next start imports again
                chunk = rows[start:start + IMPORT_CHUNK]
                parts.append(scorer.encode_image_features(regions[chunk], objects[chunk], [image_names[i] for i in chunk]))
                bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(bar.n, total)
    cache = parts[0]
    if len(parts) > 1:
        cache = ImageCache([i for p in parts for i in p.ids], {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays},
                           parts[0].fingerprint, parts[0].precision)
    gallery.put_rows(cache, new_only=True)
    return total


class ServiceState:
    def __init__(self, config, scorer: Scorer, gallery: Gallery, captions: CaptionCache | None):
        self.config, self.scorer, self.gallery = config, scorer, gallery
        self.folder = Path(config.gallery) if config.gallery is not None else None
        self.service = SearchService(scorer, gallery, captions, config.limits)
        self.ready = False
        self.progress = {"indexed": 0, "total": None}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.text_batcher = self.image_batcher = None

    @classmethod
    def load(cls, config) -> "ServiceState":
        if config.gallery is not None and not Path(config.gallery).is_dir():
            raise InputError(f"--gallery {config.gallery}: not a folder; expected a folder of images")
        index_dir = config.index_dir or (Path(config.gallery) / ".bssan-index" if config.gallery is not None else None)
        if index_dir is None:
            raise InputError("--index: expected a folder for the gallery index (or --gallery DIR, whose .bssan-index is used)")
        if config.import_store is not None and config.gallery is None:
            raise InputError(f"--import-store {config.import_store}: expected --gallery DIR too (the folder whose images it imports)")
        from engine.backends.base import Backend, parse_backend

        # ONNX Runtime sessions without spinning: concurrent requests share the cores (often with other processes);
        # a busy-waiting idle thread takes a core from a request that has work (engine.backends.onnxruntime.open_session);
        # the text graphs (recurrences over a query's few words) on one thread: cheaper and no slower there
        onnxruntime = parse_backend(config.backend) in (Backend.ORT_CPU, Backend.ORT_CUDA)
        scorer = Scorer.load(config.model, backend=config.backend, precision=config.precision, threads=config.threads,
                             path=config.path, **({"spinning": False, "text_threads": 1} if onnxruntime else {}))
        try:
            scorer.require_shortlist()
            if config.import_store is not None:  # a wrong store is a one-line error now, not a failed background import
                from engine.store import FeatureStore

                check_store_pipeline(scorer.artifact, FeatureStore(config.import_store).manifest, Path(config.import_store))
            gallery = Gallery.open(index_dir, scorer.fingerprint, scorer.cache_precision, index_kind=config.index_kind,
                                   index_options={"hnsw_m": config.hnsw_m, "ef_search": config.ef_search, "nprobe": config.nprobe, "nlist": config.ivf_lists,
                                                  "threads": config.threads}, row_dtypes=gallery_row_dtypes(config.gallery_rows, scorer))
            captions = load_captions(Path(config.captions), scorer, Path(index_dir)) if config.captions else None
        except BaseException:
            scorer.close()
            raise
        return cls(config, scorer, gallery, captions)

    def _on_progress(self, done: int, total: int, stage: str = "indexing the gallery folder") -> None:
        self.progress = {"indexed": done, "total": total, "stage": stage}

    def start_indexing(self) -> None:
        """Index the gallery folder's new images in the background (first start, or resuming one)."""
        if self.folder is None or self.gallery.begin_folder(self.folder).get("done"):  # before any request: removals count
            self.ready = True
            return

        def run():
            try:
                if self.config.import_store is not None:
                    names = {p.name for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
                    imported = import_store(self.scorer, self.gallery, Path(self.config.import_store), names, self.config.progress,
                                            lambda done, total: self._on_progress(done, total, "importing store features"),
                                            self.stop)
                    log.info("imported %d images from the feature store %s", imported, self.config.import_store)
                self.gallery.index_folder(self.folder, self.scorer.encode_images, IMAGE_SUFFIXES,
                                          progress=self.config.progress, on_progress=self._on_progress, stop=self.stop)
                self.ready = not self.stop.is_set()
            except Exception:  # noqa: BLE001 - logged; /readyz stays 503 and says so
                log.exception("indexing %s failed", self.folder)
                self.progress = {**self.progress, "error": "indexing failed (see the server log)"}

        self.thread = threading.Thread(target=run, name="index-folder", daemon=True)
        self.thread.start()

    def put_photo(self, image_id: str, data: bytes, suffix: str) -> bool:
        """Encode an uploaded photo and add or replace it durably; True if it replaced one."""
        with tempfile.TemporaryDirectory(prefix="bssan-put-") as folder:
            path = Path(folder) / f"photo{suffix}"
            path.write_bytes(data)
            cache = self.scorer.encode_images([path], ids=[image_id])
        replaced = image_id in self.gallery
        self.gallery.put([(image_id, cache, data)])
        return replaced

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.gallery.close()
        self.scorer.close()
