"""The service's persistent gallery: encoded images by id, a FAISS first stage, durable writes.

    gallery = Gallery.open(index_dir, fingerprint=scorer.fingerprint, precision=scorer.cache_precision,
                           index_kind="flat")
    gallery.put([("cat.jpg", scorer.encode_images([path]), photo_bytes)])   # add or replace; durable on return
    gallery.remove("cat.jpg")                                              # durable on return
    view, slots, sims = gallery.search(query_vectors, k)                   # ImageCache view + first-stage top-k
    gallery.put_rows(image_cache)                                          # an import: many rows, one snapshot
    gallery.index_folder(folder, scorer.encode_images)                     # first start: resumable, progress bar
    gallery.checkpoint()                                                   # snapshot + empty log (also on close)
    gallery.wait_compaction()                                              # compaction runs in a thread: wait for it

On disk (`index_dir`):

    snapshot/        an ImageCache (engine/cache.py; written to a temp dir, fsynced, swapped in)
    log.bin          writes since the snapshot, a length- and crc-framed record each (engine/serve/records.py)
    blobs/<sha>      uploaded photos (the page shows them), written before their log record
    folder.json      the folder's first indexing: {"folder", "done", "skipped": {file: reason}, "removed": [ids]}

Durability: a write is acknowledged only after its log record is fsynced, so an acknowledged
write survives kill -9. On open the snapshot is loaded and the log replayed; a torn last record
(a write killed before its fsync returned, never acknowledged) fails its length or crc check
and is cut off. Replaying is idempotent (the last record of an id decides it), so a crash
between writing a snapshot and emptying the log replays records already in the snapshot and
ends in the same state.

Memory: rows live in growable arrays ("slots"); a replaced or removed image's slot is dead
until compaction (when a quarter is dead) copies the live rows to fresh arrays and rebuilds
the index. Readers get views of the arrays as they were (never written in place), so a search
runs outside the lock while writes go on.

Compaction runs in a thread, one at a time: under the lock it notes the live slots (a slot below
`count` is never written again, so references to the arrays suffice); without it, it copies the
rows and builds the new index (HNSW links, IVF k-means: minutes at 1M), while searches use the
old index (dead slots filtered) and writes go on, each also noted in its journal; under the lock
again the journal is replayed onto the new rows, which are swapped in: exactly the compaction
under the lock when it began, then those writes. It writes no file (the snapshot and log hold
its inputs), so a crash during it loses nothing acknowledged.

The folder's first indexing (index_folder) and an import (engine/serve/state.py) add only images
that are not in the gallery and were not removed through the API since that indexing began
(begin_folder): a removal is a "del" record in the log, and until the indexing is done each
checkpoint copies those ids to folder.json's "removed" before it empties the log, so a restart
never brings a removed folder image back. An upload of a folder image's name wins over its file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cache import CACHE_JSON, ImageCache
from engine.errors import InputError
from engine.serve.index import VectorIndex
from engine.serve.records import encode_record, fsync_dir, read_log, write_file_durable

log = logging.getLogger("engine.serve")
SNAPSHOT_EVERY = 1000  # log records before a checkpoint: replay stays < ~1 s and the log < ~200 MB at the reference sizes
COMPACT_FRACTION = 0.25  # compact when this share of the slots is dead (their rows cost memory and FAISS work)
COMPACT_MIN = 64  # ... and at least this many: small galleries do not rebuild on every removal
FOLDER_CHUNK = 16  # images encoded and logged per step of the first indexing (one fsync per step)
VECTORS = "image_vectors"  # the shortlist graph's output: the first stage's vectors
COMPACTION_THREAD = "gallery-compaction"


def check_image_id(image_id: str) -> str:
    """An id is 1..255 characters, no slash, backslash or control character, not '.' or '..'."""
    if (not isinstance(image_id, str) or not 1 <= len(image_id) <= 255 or image_id in (".", "..")
            or any(c in "/\\" or ord(c) < 32 for c in image_id)):
        raise InputError(f"image id {image_id!r}: expected 1-255 characters without '/', '\\' or control characters")
    return image_id


class _Compaction:
    """A compaction in flight: the live slots when it began (ids, slots, the arrays holding them) and the
    writes applied to the gallery since, in order: ("put", ids, rows) or ("del", id)."""

    def __init__(self, ids: list[str], live: np.ndarray, buffers: dict[str, np.ndarray]):
        self.ids, self.live, self.buffers = ids, live, buffers
        self.journal: list[tuple] = []
        self.thread: threading.Thread | None = None


class Gallery:
    """Encoded images by id (rows in slots), their first-stage index, the log and the snapshot."""

    def __init__(self, root: Path, fingerprint: str, precision: str, index_kind: str = "flat", index_options: dict | None = None,
                 snapshot_every: int = SNAPSHOT_EVERY):
        self.root, self.fingerprint, self.precision = Path(root), fingerprint, precision
        self.index_kind, self.index_options, self.snapshot_every = index_kind, dict(index_options or {}), snapshot_every
        self.lock = threading.RLock()
        self.buffers: dict[str, np.ndarray] = {}  # name -> [capacity, ...]
        self.count = 0  # slots used (live and dead)
        self.slot_ids: list[str] = []  # "" for a dead slot
        self.slots: dict[str, int] = {}  # id -> live slot
        self.index: VectorIndex | None = None
        self.log_records = 0
        self.log_handle = None
        self.compaction: _Compaction | None = None  # the one in flight
        self.folder: dict | None = None  # folder.json as last written or read (None: there is none)
        self.tombstones: set[str] | None = None  # ids removed through the API while the folder's first indexing is pending

    # ------------------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, root: str | os.PathLike, fingerprint: str, precision: str, **options) -> "Gallery":
        gallery = cls(Path(root), fingerprint, precision, **options)
        gallery.root.mkdir(parents=True, exist_ok=True)
        (gallery.root / "blobs").mkdir(exist_ok=True)
        snapshot = gallery.root / "snapshot"
        if (snapshot / CACHE_JSON).is_file() or snapshot.with_name(".snapshot.old").is_dir():
            cache = ImageCache.load(snapshot, expect=fingerprint, precision=precision, mmap=True)
            gallery._apply_put(cache.ids, cache.arrays)
        records = read_log(gallery.log_path)
        for header, arrays in records:
            if header["op"] == "put":
                gallery._apply_put([header["id"]], {k: v[None] for k, v in arrays.items()})
            else:
                gallery._apply_remove(header["id"])
        gallery.log_records = len(records)
        gallery.log_handle = open(gallery.log_path, "ab")
        folder = gallery.root / "folder.json"
        gallery.folder = json.loads(folder.read_text(encoding="utf-8")) if folder.is_file() else None
        if gallery.folder is not None and not gallery.folder.get("done"):  # removals since the last checkpoint are in the log
            gallery.tombstones = set(gallery.folder.get("removed", [])) | {h["id"] for h, _ in records if h["op"] == "del"}
        if gallery.index is not None and gallery.index.dead:
            gallery._compact()  # nothing is served yet: in this thread
        return gallery

    @property
    def log_path(self) -> Path:
        return self.root / "log.bin"

    def close(self) -> None:
        """Checkpoint (so the next start replays nothing) and close the log."""
        with self.lock:
            if self.log_handle is None:
                return
            if self.log_records:
                self.checkpoint()
            self.log_handle.close()
            self.log_handle = None
            self.compaction = None  # a rebuild still running is dropped when it ends (it writes no file)

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.slots

    def ids(self) -> list[str]:
        with self.lock:
            return [i for i in self.slot_ids[:self.count] if i]

    # ------------------------------------------------------------------------------ memory
    def _ensure_capacity(self, arrays: dict[str, np.ndarray], more: int) -> None:
        if not self.buffers:
            self.buffers = {k: np.empty((max(16, more),) + v.shape[1:], v.dtype) for k, v in arrays.items()}
        if set(arrays) != set(self.buffers):
            raise InputError(f"image rows with arrays {sorted(arrays)}; the gallery holds {sorted(self.buffers)}")
        capacity = len(next(iter(self.buffers.values())))
        if self.count + more > capacity:
            grown = max(self.count + more, 2 * capacity)
            # fresh arrays (never resized in place): views handed to readers stay valid
            for name, old in self.buffers.items():
                new = np.empty((grown,) + old.shape[1:], old.dtype)
                new[:self.count] = old[:self.count]
                self.buffers[name] = new

    def _apply_put(self, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
        if VECTORS not in arrays:
            raise InputError(f"image rows without {VECTORS!r}; expected an artifact with shortlist graphs (export --shortlist)")
        self._ensure_capacity(arrays, len(ids))
        if self.index is None:
            self.index = VectorIndex(self.index_kind, arrays[VECTORS].shape[1], **self.index_options)
        start = self.count
        for name, array in arrays.items():
            self.buffers[name][start:start + len(ids)] = array
        old = [self.slots[i] for i in ids if i in self.slots]
        if old:
            self.index.remove(old)
            for slot in old:
                self.slot_ids[slot] = ""
        self.index.add(np.asarray(arrays[VECTORS], np.float32))
        for offset, image_id in enumerate(ids):
            if image_id in self.slots and self.slots[image_id] >= start:  # the same id twice in one call: the last wins
                self.index.remove([self.slots[image_id]])
                self.slot_ids[self.slots[image_id]] = ""
            self.slots[image_id] = start + offset
            self.slot_ids.append(image_id)
        self.count += len(ids)
        assert len(self.index) == self.count == len(self.slot_ids)
        if self.compaction is not None:  # the rows as stored: views of slots that are never written again
            self.compaction.journal.append(("put", list(ids), {k: v[start:self.count] for k, v in self.buffers.items()}))

    def _apply_remove(self, image_id: str) -> bool:
        slot = self.slots.pop(image_id, None)
        if slot is None:
            return False
        self.index.remove([slot])
        self.slot_ids[slot] = ""
        if self.compaction is not None:
            self.compaction.journal.append(("del", image_id))
        return True

    # ------------------------------------------------------------------------------ compaction
    def _live(self) -> np.ndarray:
        return np.array(sorted(self.slots.values()), dtype=np.int64)

    def _rebuilt(self, ids: list[str], arrays: dict[str, np.ndarray]) -> "Gallery":
        """An unopened Gallery (rows and index only, no files) holding `ids`' rows in fresh arrays, its index built:
        the minutes of a compaction at 1M (HNSW links, IVF k-means), so compactions call it without the lock."""
        fresh = Gallery(self.root, self.fingerprint, self.precision, self.index_kind, self.index_options)
        if ids:
            fresh._apply_put(ids, arrays)
        return fresh

    def _swap_in(self, fresh: "Gallery") -> None:
        self.buffers, self.count, self.slot_ids, self.slots, self.index = (fresh.buffers, fresh.count, fresh.slot_ids,
                                                                           fresh.slots, fresh.index)

    def _compact(self) -> None:
        """Copy the live rows to fresh arrays and rebuild the index (slots renumbered), in this thread, under the lock."""
        live = self._live()
        self._swap_in(self._rebuilt([self.slot_ids[s] for s in live], {k: v[live] for k, v in self.buffers.items()}))

    def _maybe_compact(self) -> None:
        """Start a compaction in the background when a quarter is dead (and none is running)."""
        if (self.compaction is None and self.index is not None
                and self.index.dead >= max(COMPACT_MIN, COMPACT_FRACTION * self.count)):
            live = self._live()
            job = _Compaction([self.slot_ids[s] for s in live], live, dict(self.buffers))
            job.thread = threading.Thread(target=self._run_compaction, args=(job,), name=COMPACTION_THREAD, daemon=True)
            self.compaction = job
            job.thread.start()

    def _run_compaction(self, job: _Compaction) -> None:
        try:
            fresh = self._rebuilt(job.ids, {k: v[job.live] for k, v in job.buffers.items()})  # no lock: the long part
            with self.lock:
                if self.compaction is not job:  # the gallery was closed meanwhile
                    return
                for op in job.journal:  # the writes made during the rebuild, in order
                    if op[0] == "put":
                        fresh._apply_put(op[1], op[2])
                    else:
                        fresh._apply_remove(op[1])
                self._swap_in(fresh)
                self.compaction = None
                self._maybe_compact()  # removals during the rebuild may have killed a quarter of the new slots
        except Exception:  # noqa: BLE001 - a failed rebuild leaves the old rows and index in service; logged
            log.exception("compacting the gallery %s failed; the next write tries again", self.root)
            with self.lock:
                if self.compaction is job:
                    self.compaction = None

    def wait_compaction(self, timeout: float | None = None) -> bool:
        """Wait for the compaction in flight (and any it started) to be swapped in; False if one still runs."""
        while True:
            with self.lock:
                job = self.compaction
            if job is None:
                return True
            job.thread.join(timeout)
            if job.thread.is_alive():
                return False

    # ------------------------------------------------------------------------------ durable writes
    def blob_path(self, image_id: str) -> Path:
        return self.root / "blobs" / hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:40]

    def put(self, items: list[tuple[str, ImageCache, bytes | None]], new_only: bool = False) -> None:
        """Add or replace images: (id, a one-row ImageCache of this artifact, the photo's bytes or None).
        Durable when it returns: blobs first, then one fsynced log write for all the records. new_only (the
        folder's indexing): skip the ids that are in the gallery or were removed through the API."""
        records = []
        for image_id, cache, photo in items:
            check_image_id(image_id)
            if len(cache) != 1 or cache.fingerprint != self.fingerprint or cache.precision != self.precision:
                raise InputError(f"image {image_id!r}: expected one encoded row of artifact {self.fingerprint[:12]}")
            records.append(encode_record({"op": "put", "id": image_id}, {k: np.asarray(v[0]) for k, v in cache.arrays.items()}))
        with self.lock:  # writes are serialised (each ends in an fsync anyway): blob and record stay in step
            if new_only:
                keep = [i for i, (image_id, _, _) in enumerate(items) if self.wanted_from_folder(image_id)]
                items, records = [items[i] for i in keep], [records[i] for i in keep]
                if not items:
                    return
            for image_id, _, photo in items:
                if photo is not None:
                    write_file_durable(self.blob_path(image_id), photo)
            self._append(records)
            for image_id, cache, _ in items:
                self._apply_put([image_id], {k: np.asarray(v) for k, v in cache.arrays.items()})
            self._after_write()

    def put_rows(self, cache: ImageCache, new_only: bool = False) -> None:
        """Add or replace many images at once (an import): every row of `cache`, then a checkpoint, so they are
        durable when it returns through one snapshot write instead of one log record each (no photos).
        new_only: as put's."""
        if cache.fingerprint != self.fingerprint or cache.precision != self.precision:
            raise InputError(f"image rows of artifact {cache.fingerprint[:12]} at {cache.precision}: expected "
                             f"{self.fingerprint[:12]} at {self.precision}")
        for image_id in cache.ids:
            check_image_id(image_id)
        if len(set(cache.ids)) != len(cache.ids):
            raise InputError(f"image rows: {len(cache.ids) - len(set(cache.ids))} ids listed twice; expected each id once")
        if not len(cache):
            return
        with self.lock:
            if self.log_handle is None:
                raise InputError(f"{self.root}: the gallery is closed; expected an open gallery")
            keep = np.array([i for i, image_id in enumerate(cache.ids) if not new_only or self.wanted_from_folder(image_id)],
                            dtype=np.int64)
            if not len(keep):
                return
            arrays = {k: np.asarray(v) if len(keep) == len(cache) else np.asarray(v)[keep] for k, v in cache.arrays.items()}
            self._apply_put([cache.ids[i] for i in keep], arrays)
            self.checkpoint()
            self._maybe_compact()

    def remove(self, image_id: str) -> bool:
        """Remove an image by id; False if it is not in the gallery. Durable when it returns."""
        with self.lock:
            if image_id not in self.slots:
                return False
            self._append([encode_record({"op": "del", "id": image_id})])
            self._apply_remove(image_id)
            if self.tombstones is not None:  # durable as the log record; checkpoints copy it to folder.json
                self.tombstones.add(image_id)
            self._after_write()
            blob = self.blob_path(image_id)
            if blob.is_file():
                blob.unlink()
        return True

    def _append(self, records: list[bytes]) -> None:
        if self.log_handle is None:
            raise InputError(f"{self.root}: the gallery is closed; expected an open gallery")
        self.log_handle.write(b"".join(records))
        self.log_handle.flush()
        os.fsync(self.log_handle.fileno())
        self.log_records += len(records)

    def _after_write(self) -> None:
        if self.log_records >= self.snapshot_every:
            self.checkpoint()
        self._maybe_compact()

    def checkpoint(self) -> None:
        """Write a snapshot of the live rows and start an empty log (crash-safe at every step). The removals the
        log held for the folder's pending indexing go to folder.json first."""
        with self.lock:
            snapshot = self.root / "snapshot"
            if self.slots:
                if self.index.dead:  # the live rows only (a compaction may be running: it is not waited for)
                    live = self._live()
                    rows = ImageCache([self.slot_ids[s] for s in live], {k: v[live] for k, v in self.buffers.items()},
                                      self.fingerprint, self.precision)
                else:
                    rows = ImageCache(list(self.slot_ids[:self.count]), {k: v[:self.count] for k, v in self.buffers.items()},
                                      self.fingerprint, self.precision)
                rows.save(snapshot)
            elif snapshot.exists():
                shutil.rmtree(snapshot)
            fsync_dir(self.root)
            if self.tombstones is not None and self.tombstones != set(self.folder.get("removed", [])):
                self._write_folder({**self.folder, "removed": sorted(self.tombstones)})
            if self.log_handle is not None:
                self.log_handle.close()
            write_file_durable(self.log_path, b"")
            self.log_handle = open(self.log_path, "ab")
            self.log_records = 0

    # ------------------------------------------------------------------------------ reading
    def view(self) -> ImageCache:
        """The slots as they are now (dead ones have id ""): a consistent read-only view."""
        with self.lock:
            return ImageCache(self.slot_ids[:self.count], {k: v[:self.count] for k, v in self.buffers.items()},
                              self.fingerprint, self.precision)

    def search(self, vectors: np.ndarray, k: int) -> tuple[ImageCache, list[np.ndarray], list[np.ndarray]]:
        """(view, per query the live slots of the first-stage top-k, their inner products)."""
        with self.lock:
            view = self.view()
            if self.index is None or not len(self.slots):
                empty = [np.zeros(0, np.int64) for _ in range(len(vectors))]
                return view, empty, [np.zeros(0, np.float32) for _ in range(len(vectors))]
            labels, sims = self.index.search(vectors, min(k, len(self.slots)))
        keep = labels >= 0
        return view, [row[m] for row, m in zip(labels, keep)], [row[m] for row, m in zip(sims, keep)]

    def photo_path(self, image_id: str, folder: Path | None) -> Path | None:
        """The file shown for an image: its uploaded blob, else the gallery folder's file of that name."""
        if image_id not in self.slots:
            return None
        blob = self.blob_path(image_id)
        if blob.is_file():
            return blob
        if folder is not None and (folder / image_id).is_file():
            return folder / image_id
        return None

    # ------------------------------------------------------------------------------ the folder
    def folder_state(self) -> dict:
        with self.lock:
            return dict(self.folder) if self.folder is not None else {"done": False, "skipped": {}}

    def _write_folder(self, state: dict) -> None:
        """folder.json, durably (under the lock: the indexer and checkpoints both write it)."""
        write_file_durable(self.root / "folder.json", json.dumps(state, indent=2, ensure_ascii=False).encode("utf-8"))
        self.folder = state

    def begin_folder(self, folder: Path) -> dict:
        """Mark the folder's first indexing as pending (folder.json, durable) unless it is done; from then on a
        removal through the API is remembered until it is done (a restart keeps them). Call before serving."""
        with self.lock:
            if self.folder is None:
                self._write_folder({"folder": str(Path(folder).resolve()), "done": False, "skipped": {}, "removed": []})
            if not self.folder.get("done") and self.tombstones is None:
                self.tombstones = set(self.folder.get("removed", []))
            return dict(self.folder)

    def wanted_from_folder(self, image_id: str) -> bool:
        """Whether the folder's indexing (or an import) may add this id: not in the gallery, not removed through the API."""
        with self.lock:
            return image_id not in self.slots and not (self.tombstones is not None and image_id in self.tombstones)

    def index_folder(self, folder: Path, encode, suffixes, progress: bool = True, on_progress=None, stop=None) -> dict:
        """Encode the folder's images that are not in the gallery yet, FOLDER_CHUNK at a time, each
        chunk logged durably (kill -9 and restart: it continues). Images removed through the API meanwhile
        (this run or an earlier one) are not added, nor are files whose name was uploaded meanwhile. Once
        done, the folder is not read again. A file that cannot be decoded is skipped and listed."""
        state = self.begin_folder(folder)
        if state.get("done"):
            return state
        state = {"folder": str(Path(folder).resolve()), "done": False, "skipped": dict(state.get("skipped", {}))}
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        todo = [p for p in files if self.wanted_from_folder(p.name) and p.name not in state["skipped"]]
        for p in todo:
            try:
                check_image_id(p.name)
            except InputError as exc:
                state["skipped"][p.name] = str(exc)
        todo = [p for p in todo if p.name not in state["skipped"]]
        with tqdm(total=len(files), initial=len(files) - len(todo), desc="indexing gallery", unit="image", disable=not progress) as bar:
            if on_progress is not None:
                on_progress(bar.n, len(files))
            for start in range(0, len(todo), FOLDER_CHUNK):
                if stop is not None and stop.is_set():  # shutting down: the next start continues from here
                    return state
                chunk = todo[start:start + FOLDER_CHUNK]
                try:
                    encoded = [(chunk, encode(chunk))]
                except InputError:  # one bad file fails the batch: encode one by one to find it
                    encoded = []
                    for path in chunk:
                        try:
                            encoded.append(([path], encode([path])))
                        except InputError as exc:
                            state["skipped"][path.name] = str(exc).splitlines()[0]
                items = [(p.name, _row(cache, i), None) for paths, cache in encoded for i, p in enumerate(paths)]
                if items:
                    self.put(items, new_only=True)  # an upload or removal of one of them meanwhile wins
                bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(bar.n, len(files))
        state["done"] = True
        with self.lock:
            self._write_folder(state)
            self.tombstones = None  # the folder is not read again
        return state


def _row(cache: ImageCache, i: int) -> ImageCache:
    return ImageCache([cache.ids[i]], {k: v[i:i + 1] for k, v in cache.arrays.items()}, cache.fingerprint, cache.precision)
