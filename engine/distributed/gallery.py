"""Large galleries: an image cache in shards on disk, memory-mapped, and the first stage fanned out over the
shards with an exact top-K merge.

    gallery = ShardedGallery.build("gallery/", ids, 2048, fingerprint, precision, encode)  # encoded shard by shard
    gallery = ShardedGallery.save(image_cache, "gallery/", rows_per_shard=2048)           # or cut a cache in shards
    gallery = ShardedGallery.load("gallery/")
    indices, scores = gallery.top_k(query_vectors, k)              # in this process, shard after shard
    indices, scores = gallery.top_k(query_vectors, k, cluster)     # one Ray unit per shard (engine.distributed)
    hits = gallery.rows(indices[0])                                # an in-memory ImageCache of the listed rows

Layout: `gallery/shards.json` (count, fingerprint, precision, [{name, start, stop}]) written last, and one
ImageCache directory per shard (`shard-00000/`, saved atomically by engine.cache): a shard already saved
with its rows is kept by a rerun (`build` checks it before encoding anything).

Memory: only the shards' cache.json (ids, array shapes) stay loaded. A shard's arrays are memory-mapped when
it is used (`shard(n)`: np.load mmap_mode="r") and unmapped when that ImageCache is dropped, so what a pass
over the gallery holds is one shard's pages, whatever the gallery's size; a worker of a cluster maps only
its shard.

Exactness: every shard but the last has a multiple of FIRST_STAGE_TILE rows, so each dot product is computed
in the same tile, hence with the same bits, as Scorer.shortlist computes it over the whole cache
(engine.runtime.first_stage_top_k); each shard keeps its top K in rank_rows' order (score descending, lower
row first) and merge_top_k orders the union by the same key: the global top K under that total order lies in
the union, so the merge equals Scorer.shortlist (tests/engine/test_sharded.py). On Ray the workers run
their BLAS with the driver's thread count (OpenBLAS sums differently on 1 and 2 threads): `blas_threads`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from engine.cache import CACHE_JSON, ImageCache, _load_arrays, _read_meta
from engine.errors import InputError
from engine.files import write_json_atomic
from engine import runtime
from engine.runtime import first_stage_top_k, merge_top_k

SHARDS_JSON = "shards.json"
SHARDS_FORMAT = "bssan-image-shards"
VECTORS = "image_vectors"  # the shortlist graph's output: what the first stage ranks by


def check_rows_per_shard(rows: int, what: str = "rows_per_shard") -> int:
    """A shard size the first stage stays exact with: a positive multiple of FIRST_STAGE_TILE."""
    tile = runtime.FIRST_STAGE_TILE  # read at call time (tests shrink it)
    if not isinstance(rows, (int, np.integer)) or rows < 1 or rows % tile:
        raise InputError(f"{what} {rows!r}: expected a multiple of {tile} (the first stage's tile: a shard "
                         f"boundary inside a tile would change the dot products' rounding)")
    return int(rows)


def to_object_store(value):
    """ray.put(value): what a Ray unit's constructor receives for a large array or cache (one copy per node)."""
    import ray

    return ray.put(value)


def shard_bounds(count: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_shard, count)) for start in range(0, count, rows_per_shard)]


# ---------------------------------------------------------------------------------------------
# BLAS threads: the same on the workers as on the driver


def blas_threads() -> int | None:
    """This process's BLAS thread count (numpy's library), or None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else None


def use_blas_threads(count: int | None) -> None:
    """Run this process's BLAS with `count` threads (a Ray worker: its driver's count; Ray starts workers with one)."""
    if count:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=count, user_api="blas")


# ---------------------------------------------------------------------------------------------
# The first stage of one shard (a Ray unit, or a step of the in-process loop)


def shard_top_k(query_vectors: np.ndarray, image_vectors: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(global rows [Q, k'], dot products [Q, k']) of one shard's best k' = min(k, rows) images per query."""
    return first_stage_top_k(query_vectors, image_vectors, k, start=start)


class ShardTopKWorker:
    """A Ray unit per shard: map the shard's vectors, return its top k for every query."""

    def __init__(self, query_vectors, k: int, threads: int | None = None):
        use_blas_threads(threads)
        self.query_vectors, self.k = query_vectors, k

    def run(self, work: dict):
        if not isinstance(self.query_vectors, np.ndarray):
            import ray

            self.query_vectors = ray.get(self.query_vectors)
        vectors = np.load(Path(work["path"]) / f"{VECTORS}.npy", mmap_mode="r")
        return shard_top_k(self.query_vectors, vectors, work["start"], self.k)


@dataclass
class ShardedGallery:
    root: Path
    bounds: list[tuple[int, int]]  # [start, stop) of each shard, in row order
    names: list[str]  # each shard's folder under root
    metas: list[dict]  # each shard's cache.json, without its ids (count, arrays)
    fingerprint: str
    precision: str
    _ids: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def ids(self) -> list[str]:
        """Every image's id, in row order (read from the shards once, unless `load` was given them)."""
        if self._ids is None:
            self._ids = [i for name in self.names for i in _read_meta(self.root / name, "image", None, None)["ids"]]
        return self._ids

    def shard(self, number: int) -> ImageCache:
        """Shard `number` as an ImageCache of memory-mapped arrays (np.memmap: nothing read until used)."""
        a, b = self.bounds[number]
        return ImageCache(self.ids[a:b], _load_arrays(self.root / self.names[number], self.metas[number], mmap=True),
                          self.fingerprint, self.precision)

    def vectors(self, number: int) -> np.ndarray:
        """Shard `number`'s first-stage vectors, memory-mapped."""
        return _load_arrays(self.root / self.names[number], {"arrays": {VECTORS: self.metas[number]["arrays"][VECTORS]}},
                            mmap=True)[VECTORS]

    # ------------------------------------------------------------------------- writing and reading
    @classmethod
    def save(cls, parts, directory: str | Path, rows_per_shard: int | None = None) -> "ShardedGallery":
        """Write an ImageCache cut every `rows_per_shard` rows, or an iterable of ImageCaches (one shard each), then
        shards.json. Every shard but the last must have a multiple of FIRST_STAGE_TILE rows."""
        directory = Path(directory)
        if isinstance(parts, ImageCache):
            whole = parts
            rows_per_shard = check_rows_per_shard(rows_per_shard)
            parts = (ImageCache(whole.ids[a:b], {k: v[a:b] for k, v in whole.arrays.items()}, whole.fingerprint, whole.precision)
                     for a, b in shard_bounds(len(whole), rows_per_shard))
        records, start, first, previous = [], 0, None, None
        for number, part in enumerate(parts):
            first = first or part
            if (part.fingerprint, part.precision) != (first.fingerprint, first.precision):
                raise InputError(f"shard {number}: encoded by {part.fingerprint[:12]} ({part.precision}), expected "
                                 f"{first.fingerprint[:12]} ({first.precision}) like shard 0")
            if previous is not None:
                check_rows_per_shard(previous, f"shard {number - 1}: rows")
            name = f"shard-{number:05d}"
            if saved_shard(directory / name, part.ids, part.fingerprint, part.precision) is None:
                part.save(directory / name)
            records.append({"name": name, "start": start, "stop": start + len(part)})
            start, previous = start + len(part), len(part)
        if first is None:
            raise InputError(f"{directory}: no image to save; expected at least one shard")
        return cls._finish(directory, records, first.fingerprint, first.precision)

    @classmethod
    def build(cls, directory: str | Path, ids: list[str], rows_per_shard: int, fingerprint: str, precision: str,
              encode: Callable[[list[tuple[int, int]]], Iterator[ImageCache]],
              progress: Callable[[int, int, bool], None] | None = None) -> "ShardedGallery":
        """The gallery of `ids` in shards of `rows_per_shard`, resumable: a shard already saved with its ids (same
        artifact and precision) is kept; `encode(bounds)` yields the ImageCache of each missing shard's rows, in order,
        and each is saved (atomically) as it comes. `progress(start, stop, encoded)` is called once per shard."""
        directory = Path(directory)
        rows_per_shard = check_rows_per_shard(rows_per_shard)
        bounds = shard_bounds(len(ids), rows_per_shard)
        if not bounds:
            raise InputError(f"{directory}: no image to save; expected at least one image")
        names = [f"shard-{n:05d}" for n in range(len(bounds))]
        todo = [n for n, (a, b) in enumerate(bounds) if saved_shard(directory / names[n], ids[a:b], fingerprint, precision) is None]
        for n, (a, b) in enumerate(bounds):
            if n not in todo and progress is not None:
                progress(a, b, False)
        for n, part in zip(todo, encode([bounds[n] for n in todo])):
            a, b = bounds[n]
            if part.ids != ids[a:b] or (part.fingerprint, part.precision) != (fingerprint, precision):
                raise RuntimeError(f"shard {n}: the encoder returned {len(part)} rows of {part.fingerprint[:12]} "
                                   f"({part.precision}), expected rows {a}..{b} of {fingerprint[:12]} ({precision})")
            part.save(directory / names[n])
            if progress is not None:
                progress(a, b, True)
        records = [{"name": name, "start": a, "stop": b} for name, (a, b) in zip(names, bounds)]
        return cls._finish(directory, records, fingerprint, precision, ids)  # every shard checked against `ids`

    @classmethod
    def _finish(cls, directory: Path, records: list[dict], fingerprint: str, precision: str,
                ids: list[str] | None = None) -> "ShardedGallery":
        write_json_atomic(directory / SHARDS_JSON, {"format": SHARDS_FORMAT, "count": records[-1]["stop"], "fingerprint": fingerprint,
                                                    "precision": precision, "shards": records}, fsync=True)
        return cls.load(directory, ids=ids)

    @classmethod
    def load(cls, directory: str | Path, expect: str | None = None, precision: str | None = None,
             ids: list[str] | None = None) -> "ShardedGallery":
        """The shards listed in DIR/shards.json (their cache.json read and checked; arrays mapped only when used).
        `ids`: the gallery's ids when the caller has them, checked shard by shard already (ShardedGallery.build)."""
        directory = Path(directory)
        path = directory / SHARDS_JSON
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not readable ({exc}); expected a sharded gallery saved by ShardedGallery.save") from None
        if not isinstance(meta, dict) or meta.get("format") != SHARDS_FORMAT:
            raise InputError(f"{path}: expected format {SHARDS_FORMAT!r}")
        bounds, names, metas = [], [], []
        for record in meta["shards"]:
            shard = _read_meta(directory / record["name"], "image", expect or meta["fingerprint"], precision or meta["precision"])
            if shard["count"] != record["stop"] - record["start"] or (bounds and bounds[-1][1] != record["start"]):
                raise InputError(f"{directory / record['name']}: rows {record['start']}..{record['stop']} with {shard['count']} "
                                 f"images; expected consecutive shards as listed in {SHARDS_JSON}")
            bounds.append((record["start"], record["stop"]))
            names.append(record["name"])
            metas.append({k: v for k, v in shard.items() if k != "ids"})  # ids: ~70 bytes per image, kept once (self.ids)
        if ids is not None and len(ids) != (bounds[-1][1] if bounds else 0):
            raise InputError(f"{path}: {bounds[-1][1] if bounds else 0} images, expected {len(ids)}")
        return cls(directory, bounds, names, metas, meta["fingerprint"], meta["precision"], ids)

    # ------------------------------------------------------------------------- ranking
    def top_k(self, query_vectors: np.ndarray, k: int, cluster=None) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k], dot products [Q, k]) of each query's k best images, merged exactly over the shards
        (= Scorer.shortlist over the whole cache, bit for bit); with a Cluster (engine.distributed) one unit per
        shard, each worker mapping only its shard's vectors."""
        if not 1 <= k <= len(self):
            raise InputError(f"k={k}: expected 1..{len(self)} (the gallery's images)")
        if VECTORS not in self.metas[0]["arrays"]:
            raise InputError(f"{self.root}: no {VECTORS}; expected caches of an artifact with shortlist graphs")
        query_vectors = np.asarray(query_vectors, np.float32)
        if cluster is None:
            parts = (shard_top_k(query_vectors, self.vectors(n), start, k) for n, (start, _) in enumerate(self.bounds))
        else:
            works = [{"path": str(self.root / name), "start": start} for name, (start, _) in zip(self.names, self.bounds)]
            init = {"query_vectors": to_object_store(query_vectors), "k": k, "threads": blas_threads()}
            parts = cluster.run(ShardTopKWorker, init, works, "first-stage shards")
        return merge_parts(parts, k)

    def rows(self, rows: np.ndarray, names: Iterable[str] | None = None) -> ImageCache:
        """An in-memory ImageCache of the listed global rows (in the order given; `names`: only those arrays), read
        from the shards' maps (each shard mapped while its rows are copied)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise InputError(f"rows: expected gallery rows in [0, {len(self)}), got [{rows.min()}, {rows.max()}]")
        specs = self.metas[0]["arrays"]
        names = list(specs) if names is None else list(names)
        arrays = {name: np.empty((len(rows),) + tuple(specs[name]["shape"][1:]), specs[name]["dtype"]) for name in names}
        every = self.ids
        starts = np.array([a for a, _ in self.bounds])
        which = np.searchsorted(starts, rows, side="right") - 1  # the shard of each row
        for number in np.unique(which).tolist():
            mine = np.flatnonzero(which == number)
            local = rows[mine] - self.bounds[number][0]
            shard = _load_arrays(self.root / self.names[number], {"arrays": {n: self.metas[number]["arrays"][n] for n in names}}, mmap=True)
            for name in names:
                arrays[name][mine] = shard[name][local]
        return ImageCache([every[row] for row in rows.tolist()], arrays, self.fingerprint, self.precision)


def merge_parts(parts: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """merge_top_k over parts as they come (the running top k and the next part): one part held at a time."""
    best = None
    for part in parts:
        best = part if best is None else merge_top_k([best, part], k)
    return best


def saved_shard(path: Path, ids: list[str], fingerprint: str, precision: str) -> dict | None:
    """The cache.json of a shard folder already holding these rows (a rerun keeps it), else None."""
    try:
        meta = json.loads((path / CACHE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or (meta.get("ids"), meta.get("artifact"), meta.get("precision")) != (ids, fingerprint, precision):
        return None
    return meta
