"""The service's persistent gallery: encoded images by id, a FAISS first stage, durable writes.

    gallery = Gallery.open(index_dir, fingerprint=scorer.fingerprint, precision=scorer.cache_precision,
                           index_kind="flat")
    gallery.put([("cat.jpg", scorer.encode_images([path]), photo_bytes)])   # add or replace; durable on return
    gallery.remove("cat.jpg")                                              # durable on return
    view, slots, sims = gallery.search(query_vectors, k)                   # ImageCache view + first-stage top-k
    gallery.put_rows(image_cache)                                          # an import: many rows, one snapshot
    gallery.index_folder(folder, scorer.encode_images)                     # first start: resumable, progress bar
    gallery.checkpoint()                                                   # snapshot, log segments dropped (also on close)
    gallery.wait_checkpoint(); gallery.wait_compaction()                   # both run in threads: wait for them

On disk (`index_dir`):

    snapshot/        an ImageCache (engine/cache.py; written to a temp dir, fsynced, swapped in) of every slot as
                     numbered, a dead one (replaced or removed, not yet compacted) with id "": slots are the index's labels
    log.bin          the open log segment: a length- and crc-framed record per write (engine/serve/records.py)
    log-<n>.bin      sealed segments (n grows): writes before a checkpoint that has not deleted them yet
    blobs/<sha>      uploaded photos (the page shows them), written before their log record
    folder.json      the folder's first indexing: {"folder", "done", "skipped": {file: reason}, "removed": [ids]}
    first-stage.faiss, first-stage.json   an approximate index (HNSW, trained IVF) with what it was built as and
                     the sha256 of its file and of the vectors it indexes (slots 0..n-1, dead ones included); saved at
                     close and after an import (when the snapshot holds exactly its slots), by a checkpoint's thread
                     when it has none or grew by INDEX_SAVE_GROWTH since (a copy taken under the lock), and by a
                     rebuild (IVF training, compaction) before it is swapped in (a compaction's renumbered slots are
                     checkpointed right after its swap). An open whose slots (the snapshot's, then the log's) start
                     with those n vectors loads it, removes the dead slots again and adds the rest instead of
                     rebuilding (HNSW links / IVF k-means: minutes at 1M); anything else (other --hnsw-m or
                     --ivf-lists, other vectors, a damaged file) rebuilds as before, one log line saying why

Durability: a write is acknowledged only after its log record is fsynced, so an acknowledged
write survives kill -9. On open the snapshot is loaded and the segments replayed, sealed ones oldest
first, then log.bin; a torn last record (a write killed before its fsync returned, never
acknowledged) fails its length or crc check and is cut off. Replaying is idempotent (the last
record of an id decides it), so replaying records the snapshot already holds ends in the same state.

Checkpoints run one at a time (checkpoint_lock), every snapshot_every records in a thread, and in
put_rows and close, which wait for theirs. Under the lock, log.bin is sealed (renamed log-<n>.bin,
a fresh log.bin takes the writes) and the slots noted (ids, `count`, the arrays: a slot below
`count` is never written again and arrays are replaced, never resized); without it, those rows are
saved as the snapshot (hundreds of MB at Flickr8K) while searches and writes go on; then the
removals the sealed segments hold go to folder.json (below), and the segments are deleted. A kill
at any step is safe: until the snapshot's swap (a rename) the old snapshot and every segment
written since its seal are on disk; after it, the new one holds the state at the new seal, the
sealed segments left replay onto it idempotently and log.bin holds the writes since. A segment goes
only after a snapshot holding it is on disk; a failed checkpoint leaves its segment to the next one.
An import's rows (put_rows) are in no segment: they are durable once its checkpoint's swap is done.

Memory: rows live in growable arrays ("slots"); a replaced or removed image's slot is dead
until compaction (when a quarter is dead) copies the live rows to fresh arrays and rebuilds
the index; snapshots and opens keep dead slots too (at most that quarter), so the slot numbers
(the index's labels) change only at a compaction. Readers get views of the arrays as they were (never written in place), so a search
runs outside the lock while writes go on.

Compaction runs in a thread, one at a time: under the lock it notes the live slots (a slot below
`count` is never written again, so references to the arrays suffice); without it, it copies the
rows and builds the new index (HNSW links, IVF k-means: minutes at 1M), while searches use the
old index (dead slots filtered) and writes go on, each also noted in its journal; the journal is
replayed onto the new rows (once without the lock, then under it only what came during that
replay), which are swapped in: exactly the compaction under the lock when it began, then those
writes. An IVF index due for training (VectorIndex.training_due: it reached train_at or grew
4-fold; writes add with train=False) is rebuilt the same way without moving rows: a new index over
the same slots is trained in the thread while the old one answers; it gets the slots written since
(the same two steps) and, at the swap, every removal. Neither writes the snapshot or the log (they hold
their inputs), so a crash during one loses nothing acknowledged; each saves its new index before the swap
(first-stage.faiss, above: a cache that open checks by sha256, never the only copy of anything). A failed rebuild leaves the
old rows and index in service; writes retry it after RETRY_FIRST_S, doubled per failure in a row.

The folder's first indexing (index_folder) and an import (engine/serve/state.py) add only images
that are not in the gallery and were not removed through the API since that indexing began
(begin_folder): a removal is a "del" record in the log, and until the indexing is done each
checkpoint copies those ids to folder.json's "removed" before it deletes a segment, so a restart
never brings a removed folder image back. An upload of a folder image's name wins over its file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cache import CACHE_JSON, ImageCache
from engine.errors import InputError
from engine.files import file_sha256, fsync_dir
from engine.serve.index import VectorIndex
from engine.serve.records import (encode_record, log_segments, read_log, remove_directory_durable, segment_path,
                                  write_file_durable)

log = logging.getLogger("engine.serve")
SNAPSHOT_EVERY = 1000  # log records before a checkpoint: replay stays < ~1 s and the log < ~200 MB at the reference sizes
COMPACT_FRACTION = 0.25  # compact when this share of the slots is dead (their rows cost memory and FAISS work)
COMPACT_MIN = 64  # ... and at least this many: small galleries do not rebuild on every removal
FOLDER_CHUNK = 16  # images encoded and logged per step of the first indexing (one fsync per step)
VECTORS = "image_vectors"  # the shortlist graph's output: the first stage's vectors
INDEX_SAVE_GROWTH = 0.25  # a checkpoint saves the approximate index when it has grown by this much since its file (or has none)
INDEX_FILE, INDEX_JSON = "first-stage.faiss", "first-stage.json"  # a saved approximate index (flat: rebuilt, a copy)
COMPACTION_THREAD = "gallery-compaction"
CHECKPOINT_THREAD = "gallery-checkpoint"
RETRY_FIRST_S = 30.0  # a failed rebuild is retried by a write after this long, doubled per failure in a row ...
RETRY_MAX_S = 3600.0  # ... up to an hour: a rebuild that keeps failing (no memory at 1M) does not start on every write


def _sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (no copy when it is contiguous)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def check_image_id(image_id: str) -> str:
    """An id is 1..255 characters, no slash, backslash or control character, not '.' or '..'."""
    if (not isinstance(image_id, str) or not 1 <= len(image_id) <= 255 or image_id in (".", "..")
            or any(c in "/\\" or ord(c) < 32 for c in image_id)):
        raise InputError(f"image id {image_id!r}: expected 1-255 characters without '/', '\\' or control characters")
    return image_id


class _Compaction:
    """A rebuild in flight: the slots when it began (`count`, the arrays holding them). A compaction has the live
    ones (ids, slots) and journals the writes applied since, in order: ("put", ids, rows) or ("del", id); a
    retraining (live None) keeps the slots and reads the ones written since off the gallery at the swap."""

    def __init__(self, count: int, buffers: dict[str, np.ndarray], ids: list[str] | None = None,
                 live: np.ndarray | None = None):
        self.count, self.buffers, self.ids, self.live = count, buffers, ids, live
        self.journal: list[tuple] = []
        self.thread: threading.Thread | None = None


class _Checkpoint:
    """A checkpoint in flight: the slots when the log was sealed (ids, "" for a dead slot; the arrays holding them)
    and the sealed segments that its snapshot covers."""

    def __init__(self, ids: list[str], buffers: dict[str, np.ndarray], segments: list[Path]):
        self.ids, self.buffers, self.segments = ids, buffers, segments


class Gallery:
    """Encoded images by id (rows in slots), their first-stage index, the log and the snapshot."""

    def __init__(self, root: Path, fingerprint: str, precision: str, index_kind: str = "flat", index_options: dict | None = None,
                 snapshot_every: int = SNAPSHOT_EVERY, row_dtypes: dict[str, str] | None = None):
        self.root, self.fingerprint, self.precision = Path(root), fingerprint, precision
        self.index_kind, self.index_options, self.snapshot_every = index_kind, dict(index_options or {}), snapshot_every
        # arrays stored at another dtype than encoded (engine.serve --gallery-rows fp16: the W2R rows at half the memory)
        self.row_dtypes = {name: np.dtype(dtype) for name, dtype in (row_dtypes or {}).items()}
        self.lock = threading.RLock()
        self.buffers: dict[str, np.ndarray] = {}  # name -> [capacity, ...]
        self.count = 0  # slots used (live and dead)
        self.slot_ids: list[str] = []  # "" for a dead slot
        self.slots: dict[str, int] = {}  # id -> live slot
        self.index: VectorIndex | None = None
        self.log_records = 0  # in log.bin
        self.log_handle = None
        self.sealed: list[Path] = []  # sealed segments no snapshot holds yet, oldest first
        self.checkpoint_lock = threading.Lock()  # one checkpoint at a time: held from its seal to its last deletion
        self.index_file_lock = threading.Lock()  # one writer of first-stage.faiss / .json at a time
        self.index_on_disk = None  # (weakref to the VectorIndex, its size) that first-stage.faiss holds: not hashed again
        self.checkpoint_thread: threading.Thread | None = None  # the one a write started
        self.snapshot_stale = False  # a compaction renumbered the slots since the last seal: the next checkpoint is due now
        self.opening = False  # open() applies rows without the index, then builds or loads it (_index_at_open)
        self.compaction: _Compaction | None = None  # the one in flight
        self.rebuild_failures = 0  # failed rebuilds in a row; the next may start at retry_at (time.monotonic)
        self.retry_at = 0.0
        self.folder: dict | None = None  # folder.json as last written or read (None: there is none)
        self.tombstones: set[str] | None = None  # ids removed through the API while the folder's first indexing is pending

    # ------------------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, root: str | os.PathLike, fingerprint: str, precision: str, **options) -> "Gallery":
        gallery = cls(Path(root), fingerprint, precision, **options)
        gallery.opening = True  # the rows first (snapshot, then the log), the index once they are all in
        gallery.root.mkdir(parents=True, exist_ok=True)
        (gallery.root / "blobs").mkdir(exist_ok=True)
        snapshot = gallery.root / "snapshot"
        if (snapshot / CACHE_JSON).is_file() or snapshot.with_name(".snapshot.old").is_dir():
            cache = ImageCache.load(snapshot, expect=fingerprint, precision=precision, mmap=True)
            gallery._apply_snapshot(cache)
        gallery.sealed = log_segments(gallery.root)  # a checkpoint's that did not finish: they come first
        removed = set()
        for path in [*gallery.sealed, gallery.log_path]:
            records = read_log(path)
            for header, arrays in records:
                if header["op"] == "put":
                    gallery._apply_put([header["id"]], {k: v[None] for k, v in arrays.items()})
                else:
                    gallery._apply_remove(header["id"])
                    removed.add(header["id"])
        gallery._index_at_open()
        gallery.log_records = len(records)  # the last read: log.bin's
        gallery.log_handle = open(gallery.log_path, "ab")
        fsync_dir(gallery.root)  # a new log.bin's name is on disk before a write to it is acknowledged
        folder = gallery.root / "folder.json"
        gallery.folder = json.loads(folder.read_text(encoding="utf-8")) if folder.is_file() else None
        if gallery.folder is not None and not gallery.folder.get("done"):  # removals since the last checkpoint are in the log
            gallery.tombstones = set(gallery.folder.get("removed", [])) | removed
        if gallery.index is not None and gallery.index.dead:  # as after these removals at run time: compacted in a
            with gallery.lock:                                # thread once a quarter is dead (the slots stay as numbered
                gallery._maybe_compact()                      # meanwhile, so a saved index still fits them)
        elif gallery.index is not None and gallery.index.training_due:
            gallery._swap_index(gallery._reindexed(gallery.buffers[VECTORS][:gallery.count]))
        return gallery

    @property
    def log_path(self) -> Path:
        return self.root / "log.bin"

    def close(self) -> None:
        """Checkpoint (so the next start replays nothing written before) and close the log. A checkpoint in flight
        ends first; searches and writes go on during the save."""
        with self.checkpoint_lock:
            with self.lock:
                if self.log_handle is None:
                    return
                job = self._seal() if self.log_records or self.sealed or self.snapshot_stale else None
            if job is not None:
                self._complete(job)
            with self.lock:
                self.log_handle.close()
                self.log_handle = None
                self._save_index()  # no write comes after this point: the index is the snapshot's, or it is not saved
                self.compaction = None  # a rebuild still running is dropped when it ends (no snapshot or log: at most its index file)

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
            self.buffers = {k: np.empty((max(16, more),) + v.shape[1:], self.row_dtypes.get(k, v.dtype)) for k, v in arrays.items()}
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

    def _apply_put(self, ids: list[str], arrays: dict[str, np.ndarray], train: bool = False) -> None:
        """Rows into fresh slots, their vectors into the index (not while opening: _index_at_open). train: the index
        may train here (a build: a rebuild's thread); writes never do (a due IVF training is a rebuild: _maybe_compact)."""
        if VECTORS not in arrays:
            raise InputError(f"image rows without {VECTORS!r}; expected an artifact with shortlist graphs (export --shortlist)")
        self._ensure_capacity(arrays, len(ids))
        indexed = not self.opening
        if indexed and self.index is None:
            self.index = VectorIndex(self.index_kind, arrays[VECTORS].shape[1], **self.index_options)
        start = self.count
        for name, array in arrays.items():
            self.buffers[name][start:start + len(ids)] = array
        old = [self.slots[i] for i in ids if i in self.slots]
        for slot in old:
            self.slot_ids[slot] = ""
        if indexed:
            if old:
                self.index.remove(old)
            self.index.add(np.asarray(arrays[VECTORS], np.float32), train=train)
        for offset, image_id in enumerate(ids):
            if image_id in self.slots and self.slots[image_id] >= start:  # the same id twice in one call: the last wins
                if indexed:
                    self.index.remove([self.slots[image_id]])
                self.slot_ids[self.slots[image_id]] = ""
            self.slots[image_id] = start + offset
            self.slot_ids.append(image_id)
        self.count += len(ids)
        assert (not indexed or len(self.index) == self.count) and self.count == len(self.slot_ids)
        if self.compaction is not None and self.compaction.live is not None:  # the rows as stored: slots never written again
            self.compaction.journal.append(("put", list(ids), {k: v[start:self.count] for k, v in self.buffers.items()}))

    def _apply_snapshot(self, cache: ImageCache) -> None:
        """Open: the snapshot's slots as they were numbered (a dead one has id ""); the index comes later (_index_at_open)."""
        if VECTORS not in cache.arrays:
            raise InputError(f"{self.root / 'snapshot'}: image rows without {VECTORS!r}; expected an artifact with shortlist graphs")
        self._ensure_capacity(cache.arrays, len(cache))
        for name, array in cache.arrays.items():
            self.buffers[name][:len(cache)] = array
        self.slot_ids = list(cache.ids)
        self.slots = {image_id: slot for slot, image_id in enumerate(cache.ids) if image_id}
        self.count = len(cache)

    def _index_at_open(self) -> None:
        """Open, once the snapshot and the log are applied: the saved index when it was built over the first slots
        (_saved_index; it may cover slots that only the log holds), else a fresh one; the slots past it are added
        (training an IVF index when due) and the dead ones removed."""
        self.opening = False
        if not self.count:
            return
        vectors = self.buffers[VECTORS][:self.count]
        index = self._saved_index(vectors)
        if index is None:
            index = VectorIndex(self.index_kind, vectors.shape[1], **self.index_options)
        if len(index) < self.count:
            index.add(np.asarray(vectors[len(index):], np.float32), train=True)
        index.remove(np.array([slot for slot, image_id in enumerate(self.slot_ids[:self.count]) if not image_id], dtype=np.int64))
        self.index = index

    def _apply_remove(self, image_id: str) -> bool:
        slot = self.slots.pop(image_id, None)
        if slot is None:
            return False
        if self.index is not None:  # None while opening: _index_at_open removes the dead slots
            self.index.remove([slot])
        self.slot_ids[slot] = ""
        if self.compaction is not None and self.compaction.live is not None:
            self.compaction.journal.append(("del", image_id))
        return True

    # ------------------------------------------------------------------------------ the saved first-stage index
    BUILD_KEYS = ("kind", "dim", "hnsw_m", "ef_construction", "fixed_nlist")  # a saved index built otherwise is rebuilt

    def _saved_index(self, vectors: np.ndarray) -> VectorIndex | None:
        """The saved index (first-stage.faiss), if it was built with this gallery's build options over the first of
        these slots' `vectors` (the same, in order: sha256) and its file is intact; else None (the caller builds one),
        the reason logged. The slots past it are for the caller to add."""
        saved, meta_path = self.root / INDEX_FILE, self.root / INDEX_JSON
        if self.index_kind == "flat" or not meta_path.is_file() or not saved.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            want = VectorIndex(self.index_kind, vectors.shape[1], **self.index_options).build_record()
            count = int(meta["count"])
            differ = [k for k in self.BUILD_KEYS if meta.get(k) != want.get(k)]
            if count > len(vectors):
                differ.append(f"count ({count} > the gallery's {len(vectors)})")
            elif not differ and _sha256(vectors[:count]) != meta.get("vectors_sha256"):
                differ.append("vectors")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); rebuilding the first-stage index", meta_path, exc)
            return None
        if differ:
            log.info("%s: saved for another gallery or build (%s differ); rebuilding the first-stage index", saved, ", ".join(differ))
            return None
        if file_sha256(saved) != meta.get("index_sha256"):
            log.warning("%s: sha256 differs from %s (damaged); rebuilding the first-stage index", saved, meta_path.name)
            return None
        try:
            index = VectorIndex.load(saved, meta, **self.index_options)
        except InputError as exc:
            log.warning("%s; rebuilding the first-stage index", exc)
            return None
        log.info("%s: loaded (%d of the gallery's %d vectors), not rebuilt", saved, len(index), len(vectors))
        self.index_on_disk = (weakref.ref(index), len(index))
        return index

    def _write_index_file(self, index: VectorIndex, vectors: np.ndarray, serving: VectorIndex | None = None) -> None:
        """Save `index`, built over `vectors` (its labels 0..len-1, in that order), unless the saved one is that
        already. The caller makes sure nothing adds to `index` meanwhile (it holds the lock, or the index is not
        shared yet, or it is a copy of `serving`, the gallery's index, taken under the lock: then it is written only
        while `serving` is still the gallery's index and no rebuild runs, whose own index file would be older than
        its swap). Only an approximate index worth keeping (HNSW, trained IVF); its removals are not in the file (a
        snapshot's dead slots say them again at open). A failure is logged, never raised: the next open rebuilds."""
        if index.kind == "flat" or (index.kind == "ivf" and not index.trained) or not len(index):
            return
        saved, meta_path = self.root / INDEX_FILE, self.root / INDEX_JSON
        owner = serving or index
        with self.index_file_lock:
            if serving is not None and (self.index is not serving or self.compaction is not None):
                return  # a rebuild began or swapped in since the copy: its index (saved by it) is the one to keep
            on_disk = self.index_on_disk
            if on_disk is not None and on_disk[0]() is owner and on_disk[1] == len(index):
                return  # loaded at open or saved since, and unchanged (an index only grows; a rebuild is another object)
            try:
                record = {**index.build_record(), "vectors_sha256": _sha256(vectors[:len(index)])}
                meta_path.unlink(missing_ok=True)  # never a record naming another file's sha256
                index.save(saved)
                record["index_sha256"] = file_sha256(saved)
                write_file_durable(meta_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
                self.index_on_disk = (weakref.ref(owner), len(index))
            except (OSError, ValueError, InputError, RuntimeError) as exc:
                log.warning("saving the first-stage index to %s failed (%s); the next start rebuilds it", saved, exc)

    def _save_grown_index(self) -> None:
        """From a checkpoint's thread: save the approximate index when it has none on disk or has grown by
        INDEX_SAVE_GROWTH since, so a restart after kill -9 adds fewer vectors (HNSW built 1M in 271 s on 2 cores in
        session 15). The
        index is copied under the lock (FAISS must not write an index while a write adds to it; searches wait for the
        copy: 0.9 s for IVF at 1M x 514, measured in session 15; it holds the index's memory again, ~2 GB there, until
        written) and written without it; its slots are final (a slot below `count` is never written again)."""
        with self.lock:
            index = self.index
            if (index is None or self.log_handle is None or self.compaction is not None or index.kind == "flat"
                    or (index.kind == "ivf" and not index.trained)):
                return
            on_disk = self.index_on_disk
            saved = on_disk[1] if on_disk is not None and on_disk[0]() is index else 0
            if saved and len(index) < (1 + INDEX_SAVE_GROWTH) * saved:
                return
            copy, vectors = index.copy(), self.buffers[VECTORS]
        self._write_index_file(copy, vectors[:len(copy)], serving=index)

    def _save_index(self) -> None:
        """Under the lock: save the index when the snapshot on disk holds exactly its slots (nothing written since the
        last checkpoint; dead slots included): at close and after an import."""
        if self.index is not None and not self.log_records and not self.sealed and not self.snapshot_stale:
            self._write_index_file(self.index, self.buffers[VECTORS][:self.count])

    # ------------------------------------------------------------------------------ compaction
    def _live(self) -> np.ndarray:
        return np.array(sorted(self.slots.values()), dtype=np.int64)

    def _rebuilt(self, ids: list[str], arrays: dict[str, np.ndarray]) -> "Gallery":
        """An unopened Gallery (rows and index only, no files) holding `ids`' rows in fresh arrays, its index built:
        the minutes of a compaction at 1M (HNSW links, IVF k-means), so compactions call it without the lock."""
        fresh = Gallery(self.root, self.fingerprint, self.precision, self.index_kind, self.index_options, row_dtypes=self.row_dtypes)
        if ids:
            fresh._apply_put(ids, arrays, train=True)
        return fresh

    def _reindexed(self, vectors: np.ndarray) -> VectorIndex:
        """A new index over [N, dim] vectors (labels 0..N-1: the slots), trained for its size: a retraining's long part."""
        index = VectorIndex(self.index_kind, vectors.shape[1], **self.index_options)
        index.add(np.asarray(vectors, np.float32), train=True)
        return index

    def _swap_index(self, index: VectorIndex) -> None:
        """Under the lock: `index`, built over every slot, gets every removal (old and new: the dead labels of the
        index it replaces), then replaces it."""
        index.remove(np.flatnonzero(self.index.live == 0))
        assert len(index) == len(self.index) == self.count
        self.index = index

    def _swap_in(self, fresh: "Gallery") -> None:
        self.buffers, self.count, self.slot_ids, self.slots, self.index = (fresh.buffers, fresh.count, fresh.slot_ids,
                                                                           fresh.slots, fresh.index)

    def _maybe_compact(self) -> None:
        """Start a rebuild in the background (none running): a compaction when a quarter is dead, else a retraining
        when the IVF index is due for one."""
        if self.compaction is not None or self.index is None or time.monotonic() < self.retry_at:
            return
        if self.index.dead >= max(COMPACT_MIN, COMPACT_FRACTION * self.count):
            live = self._live()
            job = _Compaction(self.count, dict(self.buffers), [self.slot_ids[s] for s in live], live)
        elif self.index.training_due:
            job = _Compaction(self.count, dict(self.buffers))
        else:
            return
        job.thread = threading.Thread(target=self._run_compaction, args=(job,), name=COMPACTION_THREAD, daemon=True)
        self.compaction = job
        job.thread.start()

    def _run_compaction(self, job: _Compaction) -> None:
        try:
            if job.live is not None:  # no lock: the long part (row copies, the index build)
                target = self._rebuilt(job.ids, {k: v[job.live] for k, v in job.buffers.items()})
                if target.index is not None:  # not shared yet: nothing adds to it
                    self._write_index_file(target.index, target.buffers[VECTORS][:target.count])
            else:
                target = self._reindexed(job.buffers[VECTORS][:job.count])
                self._write_index_file(target, job.buffers[VECTORS][:job.count])  # not shared yet: nothing adds to it
            done = self._catch_up(job, target, job.count if job.live is None else 0)  # no lock: the writes made meanwhile
            with self.lock:
                if self.compaction is not job:  # the gallery was closed meanwhile
                    return
                self._catch_up(job, target, done)  # under the lock: only those made during the first catch-up
                if job.live is None:
                    self._swap_index(target)
                else:
                    self._swap_in(target)
                    self.snapshot_stale = True  # slots renumbered: a snapshot in the new numbering fits the index just saved
                self.compaction, self.rebuild_failures, self.retry_at = None, 0, 0.0
                self._maybe_checkpoint()
                self._maybe_compact()  # removals meanwhile may have killed a quarter of the new slots, or adds made IVF due
        except Exception:  # noqa: BLE001 - a failed rebuild leaves the old rows and index in service; logged
            with self.lock:
                if self.compaction is not job:
                    return
                self.compaction = None
                self.rebuild_failures += 1
                wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.rebuild_failures - 1))
                self.retry_at = time.monotonic() + wait
            log.exception("rebuilding the gallery %s (%s) failed (%d in a row); a write tries again in %.0f s or later",
                          self.root, "compaction" if job.live is not None else "IVF retraining", self.rebuild_failures, wait)

    def _catch_up(self, job: _Compaction, target, done: int) -> int:
        """Bring a rebuild's result up to the writes made since it began, from `done` on: a retraining's new index
        (`target`, a VectorIndex) gets the slots in [done, count) (a slot below count is never written again, so the
        arrays read are the ones noted under the lock); a compaction's fresh Gallery replays its journal from entry
        `done` (entries are only appended). Returns the point reached. Called once without the lock, so that the
        second call, under it just before the swap, has only the writes made during the first."""
        with self.lock:
            end = self.count if job.live is None else len(job.journal)
            vectors, ops = self.buffers.get(VECTORS), job.journal[done:end]
        if job.live is None:
            if end > done:
                target.add(np.asarray(vectors[done:end], np.float32), train=False)
            return end
        for op in ops:  # in order
            if op[0] == "put":
                target._apply_put(op[1], op[2])
            else:
                target._apply_remove(op[1])
        return end

    def wait_compaction(self, timeout: float | None = None) -> bool:
        """Wait for the rebuild in flight (and any it started) to be swapped in; False if one still runs."""
        return self._join(lambda: self.compaction.thread if self.compaction is not None else None, timeout)

    def _join(self, running, timeout: float | None) -> bool:
        """Join running() (a thread or None, read under the lock) until it is None; False if one outlives timeout."""
        while True:
            with self.lock:
                thread = running()
            if thread is None:
                return True
            thread.join(timeout)
            if thread.is_alive():
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
        durable when it returns through one snapshot write instead of one log record each (no photos); searches
        and writes go on during the save. new_only: as put's."""
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
            self._maybe_compact()
        self.checkpoint()  # its seal comes after the rows went in: its snapshot holds them
        with self.lock:  # an HNSW index built by the import: saved now (a crash need not rebuild it); IVF trains later
            if self.log_handle is not None:
                self._save_index()

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
        self._maybe_checkpoint()
        self._maybe_compact()

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        """Write a snapshot of the slots (dead ones as id "") and delete the log segments it holds; returns once it is on disk (after
        the checkpoint in flight, if any). Searches and writes go on during the save: never call it holding the lock."""
        with self.checkpoint_lock:
            with self.lock:
                if self.log_handle is None:  # closed: close() checkpointed
                    return
                job = self._seal()
            self._complete(job)

    def wait_checkpoint(self, timeout: float | None = None) -> bool:
        """Wait for the checkpoint a write started (and any it started); False if one still runs."""
        return self._join(lambda: self.checkpoint_thread, timeout)

    def _maybe_checkpoint(self) -> None:
        """Under the lock: when log.bin holds snapshot_every records (or a compaction renumbered the slots) and no
        checkpoint runs, seal it and save in a thread."""
        if (self.log_handle is None or (self.log_records < self.snapshot_every and not self.snapshot_stale)
                or not self.checkpoint_lock.acquire(blocking=False)):
            return
        try:
            job = self._seal()
        except BaseException:
            self.checkpoint_lock.release()
            raise
        self.checkpoint_thread = threading.Thread(target=self._run_checkpoint, args=(job,), name=CHECKPOINT_THREAD, daemon=True)
        self.checkpoint_thread.start()

    def _run_checkpoint(self, job: _Checkpoint) -> None:
        try:
            self._complete(job)
            self._save_grown_index()
        except Exception:  # noqa: BLE001 - the segments stay (replayed on open); the next checkpoint covers them; logged
            log.exception("checkpointing the gallery %s failed; its log segments stay for the next one", self.root)
        finally:
            with self.lock:
                self.checkpoint_thread = None
                self.checkpoint_lock.release()
                self._maybe_checkpoint()  # the log may have reached snapshot_every again meanwhile

    def _seal(self) -> _Checkpoint:
        """Under the lock, holding checkpoint_lock: log.bin (if it holds records) becomes the next sealed segment and a
        fresh one takes the writes; the slots now are what the snapshot will hold."""
        if self.log_records:
            segment = segment_path(self.root, self.sealed)
            self.log_handle.close()
            try:
                os.replace(self.log_path, segment)
            finally:
                self.log_handle = open(self.log_path, "ab")
            fsync_dir(self.root)  # both names on disk before a write to the new log.bin is acknowledged
            self.sealed.append(segment)
            self.log_records = 0
        self.snapshot_stale = False
        return _Checkpoint(self.slot_ids[:self.count], dict(self.buffers), list(self.sealed))

    def _complete(self, job: _Checkpoint) -> None:
        """Holding checkpoint_lock, not the lock: the snapshot (the long part), folder.json's removals, the segments deleted."""
        ids, count = job.ids, len(job.ids)
        # every slot as numbered, a dead one with id "" (its row stays until a compaction renumbers the slots): so the
        # saved index, whose labels are slots, still fits the snapshot after removals
        arrays = {k: v[:count] for k, v in job.buffers.items()}
        snapshot = self.root / "snapshot"
        if any(ids):
            ImageCache(ids, arrays, self.fingerprint, self.precision).save(snapshot)
        else:
            remove_directory_durable(snapshot)
        fsync_dir(self.root)
        with self.lock:  # the segments' removals (in the tombstones since their writes or since open) outlive them
            if self.tombstones is not None and self.tombstones != set(self.folder.get("removed", [])):
                self._write_folder({**self.folder, "removed": sorted(self.tombstones)})
            self.sealed = [s for s in self.sealed if s not in job.segments]
        for segment in job.segments:
            segment.unlink(missing_ok=True)
        fsync_dir(self.root)

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
