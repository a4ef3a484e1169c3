"""What a running service holds: the scorer, the gallery, the caption collection, the search
service, and the first indexing of the gallery folder (a background thread; /readyz waits for it)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path

from engine.cache import CaptionCache
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
        scorer = Scorer.load(config.model, backend=config.backend, precision=config.precision, threads=config.threads)
        try:
            scorer.require_shortlist()
            gallery = Gallery.open(index_dir, scorer.fingerprint, scorer.cache_precision, index_kind=config.index_kind,
                                   index_options={"hnsw_m": config.hnsw_m, "ef_search": config.ef_search,
                                                  "threads": config.threads})
            captions = load_captions(Path(config.captions), scorer, Path(index_dir)) if config.captions else None
        except BaseException:
            scorer.close()
            raise
        return cls(config, scorer, gallery, captions)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress = {"indexed": done, "total": total}

    def start_indexing(self) -> None:
        """Index the gallery folder's new images in the background (first start, or resuming one)."""
        if self.folder is None or self.gallery.folder_state().get("done"):
            self.ready = True
            return

        def run():
            try:
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
