"""Large galleries: an image cache in shards on disk, memory-mapped, and the first stage fanned out over the
shards with an exact top-K merge.

    gallery = ShardedGallery.save(image_cache_or_parts, "gallery/", rows_per_shard=100_000)  # or ShardedGallery.load
    indices, scores = gallery.top_k(query_vectors, k)              # in this process, shard after shard
    indices, scores = gallery.top_k(query_vectors, k, cluster)     # one Ray unit per shard (engine.distributed)
    hits = gallery.rows(indices[0])                                # an ImageCache of the listed rows, to re-rank

Layout: `gallery/shards.json` (count, fingerprint, precision, [{name, start, stop}]) written last, and one
ImageCache directory per shard (`shard-00000/`, saved atomically by engine.cache): a shard already saved
with its rows is kept by a rerun. Loading maps every shard (np.load mmap_mode="r"): what a query touches
is paged in, so a gallery larger than memory can be ranked; a worker of a cluster maps only its shard.

Exactness: every shard ranks its rows by the dual encoder's dot product with the query (float32, one
matmul per shard) and keeps its top K in THE order of engine.runtime.rank_rows (score descending, lower
row first on ties); the merge orders the union of the shards' candidates by the same key. The global top K
under that total order lies in the union (each shard's top K holds all of its rows that can be), so the
merge equals rank_rows over the whole matrix whenever each dot product is computed bit-identically,
which tests/engine/test_ray.py checks against Scorer.shortlist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cache import CACHE_JSON, ImageCache
from engine.errors import InputError
from engine.files import write_json_atomic
from engine.runtime import rank_rows

SHARDS_JSON = "shards.json"
SHARDS_FORMAT = "bssan-image-shards"


def shard_top_k(query_vectors: np.ndarray, image_vectors: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(global rows [Q, k'], scores [Q, k']) of one shard's best k' = min(k, rows) images per query."""
    sims = np.asarray(query_vectors, np.float32) @ np.asarray(image_vectors, np.float32).T  # [Q, N_shard]
    local, scores = rank_rows(sims, min(k, sims.shape[1]))
    return local + start, scores


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k of the union of the shards' candidates: score descending, lower global row first."""
    indices = np.concatenate([p[0] for p in parts], axis=1)  # [Q, sum k']
    scores = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((indices, -scores), axis=1)[:, :k]  # last key first: -score, then the row
    return np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1)


class ShardTopKWorker:
    """A Ray unit per shard: map the shard, return its top k for every query."""

    def __init__(self, query_vectors: np.ndarray, k: int):
        self.query_vectors, self.k = query_vectors, k

    def run(self, work: dict):
        cache = ImageCache.load(work["path"], mmap=True)
        return shard_top_k(self.query_vectors, cache.arrays["image_vectors"], work["start"], self.k)


@dataclass
class ShardedGallery:
    root: Path
    shards: list[tuple[int, int, ImageCache]]  # (start, stop, memory-mapped cache) in row order
    fingerprint: str
    precision: str

    def __len__(self) -> int:
        return self.shards[-1][1] if self.shards else 0

    @property
    def ids(self) -> list[str]:
        return [i for _, _, cache in self.shards for i in cache.ids]

    @classmethod
    def save(cls, parts, directory: str | Path, rows_per_shard: int | None = None) -> "ShardedGallery":
        """Write an ImageCache cut every `rows_per_shard` rows, or an iterable of ImageCaches (one shard each,
        e.g. engine.distributed.score's encoding shards as they come), then shards.json."""
        directory = Path(directory)
        if isinstance(parts, ImageCache):
            if not rows_per_shard or rows_per_shard < 1:
                raise InputError(f"rows_per_shard={rows_per_shard!r}: expected an integer >= 1 to cut one ImageCache")
            whole = parts
            parts = (ImageCache(whole.ids[a:a + rows_per_shard], {k: v[a:a + rows_per_shard] for k, v in whole.arrays.items()},
                                whole.fingerprint, whole.precision) for a in range(0, len(whole), rows_per_shard))
        records, start, first = [], 0, None
        for number, part in enumerate(parts):
            first = first or part
            if (part.fingerprint, part.precision) != (first.fingerprint, first.precision):
                raise InputError(f"shard {number}: encoded by {part.fingerprint[:12]} ({part.precision}), expected "
                                 f"{first.fingerprint[:12]} ({first.precision}) like shard 0")
            name = f"shard-{number:05d}"
            path = directory / name
            if not _saved(path, part):
                part.save(path)
            records.append({"name": name, "start": start, "stop": start + len(part)})
            start += len(part)
        if first is None:
            raise InputError(f"{directory}: no image to save; expected at least one shard")
        write_json_atomic(directory / SHARDS_JSON, {"format": SHARDS_FORMAT, "count": start, "fingerprint": first.fingerprint,
                                                    "precision": first.precision, "shards": records}, fsync=True)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | Path, expect: str | None = None) -> "ShardedGallery":
        directory = Path(directory)
        path = directory / SHARDS_JSON
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not readable ({exc}); expected a sharded gallery saved by ShardedGallery.save") from None
        if not isinstance(meta, dict) or meta.get("format") != SHARDS_FORMAT:
            raise InputError(f"{path}: expected format {SHARDS_FORMAT!r}")
        shards = []
        for record in meta["shards"]:
            cache = ImageCache.load(directory / record["name"], expect=expect or meta["fingerprint"], precision=meta["precision"])
            if len(cache) != record["stop"] - record["start"]:
                raise InputError(f"{directory / record['name']}: {len(cache)} rows, expected {record['stop'] - record['start']} from {SHARDS_JSON}")
            shards.append((record["start"], record["stop"], cache))
        return cls(directory, shards, meta["fingerprint"], meta["precision"])

    def top_k(self, query_vectors: np.ndarray, k: int, cluster=None) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k], dot products [Q, k]) of each query's k best images, merged exactly over the shards;
        with a Cluster (engine.distributed) one unit per shard, each worker mapping only its shard."""
        if not 1 <= k <= len(self):
            raise InputError(f"k={k}: expected 1..{len(self)} (the gallery's images)")
        if "image_vectors" not in self.shards[0][2].arrays:
            raise InputError(f"{self.root}: no image_vectors; expected caches of an artifact with shortlist graphs")
        if cluster is None:
            parts = [shard_top_k(query_vectors, cache.arrays["image_vectors"], start, k) for start, _, cache in self.shards]
        else:
            works = [{"path": str(self.root / f"shard-{n:05d}"), "start": start} for n, (start, _, _) in enumerate(self.shards)]
            parts = list(cluster.run(ShardTopKWorker, {"query_vectors": np.asarray(query_vectors, np.float32), "k": k},
                                     works, "first-stage shards"))
        return merge_top_k(parts, k)

    def rows(self, rows: np.ndarray) -> ImageCache:
        """An in-memory ImageCache of the listed global rows (in the order given), read from the shards' maps."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise InputError(f"rows: expected gallery rows in [0, {len(self)}), got [{rows.min()}, {rows.max()}]")
        starts = np.array([s for s, _, _ in self.shards])
        which = np.searchsorted(starts, rows, side="right") - 1  # the shard of each row
        first = self.shards[0][2]
        arrays = {name: np.empty((len(rows),) + a.shape[1:], a.dtype) for name, a in first.arrays.items()}
        ids = [""] * len(rows)
        for shard in np.unique(which):
            start, _, cache = self.shards[shard]
            mine = np.flatnonzero(which == shard)
            local = rows[mine] - start
            for name, array in cache.arrays.items():
                arrays[name][mine] = array[local]
            for position, row in zip(mine.tolist(), local.tolist()):
                ids[position] = cache.ids[row]
        return ImageCache(ids, arrays, self.fingerprint, self.precision)


def _saved(path: Path, part: ImageCache) -> bool:
    """A shard directory already holding these rows (a rerun keeps it; anything else is rewritten)."""
    if not (path / CACHE_JSON).is_file():
        return False
    try:
        meta = json.loads((path / CACHE_JSON).read_text(encoding="utf-8"))
    except ValueError:
        return False
    return meta.get("ids") == part.ids and meta.get("artifact") == part.fingerprint and meta.get("precision") == part.precision
