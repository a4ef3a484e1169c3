"""`python -m engine.score ... --ray [ADDRESS]`: encoding the gallery and scoring its units on a Ray actor pool.

engine.score runs as on one machine (inputs checked, --out locked, the journal keyed, captions encoded,
results fused, ranked and written by the driver); a `ScorePool` takes over the two costly loops:

- image encoding: the gallery in shards of ENCODE_SHARD rows, a multiple of every batch the single
  process cuts (IMAGE_BATCH image-graph rows, the feature pipeline's batch of image files), so each
  worker makes the very graph calls the single process makes for those rows (`Scorer.encode_images` on
  the shard's files, `encode_image_features` on the store split's rows). The driver joins the shards
  in order into one ImageCache (the journal saves it as before).
- scoring: the journal's units (engine/journal.py: UNIT_IMAGES rows of the matrix, the re-rank pairs of
  UNIT_SHORTLIST_IMAGES images) run as `Scorer.score_grid` / `Scorer.score_pairs` calls on workers that hold the
  caches (put once in Ray's object store, read zero-copy by every worker of a node); the driver
  writes each unit into the journal and lists it, as one process does.

Captions are encoded on the driver: their batches are cut after a sort of ALL captions by length, so a
shard of captions would make other calls (docs/ray.md says what that costs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cache import ImageCache
from engine.distributed import Cluster, shards
from engine.encode import IMAGE_BATCH
from engine.features import DEFAULT_BATCH
from engine.journal import BAR_INTERVAL
from engine.runtime import Scorer
from engine.store import SplitFeatures

# images per encoding unit: a multiple of IMAGE_BATCH (64) and of the file pipeline's batch (16), so shard
# boundaries are batch boundaries of the single process
ENCODE_SHARD = 4 * IMAGE_BATCH
assert ENCODE_SHARD % IMAGE_BATCH == 0 and ENCODE_SHARD % DEFAULT_BATCH == 0


class ScoreWorker:
    """On a Ray worker: one loaded Scorer; the caches (object refs) and a store split when the job has them."""

    def __init__(self, load: dict, caches: list | None = None, split: SplitFeatures | None = None):
        self.scorer = Scorer.load(**load)
        self.split, self.caches = split, caches

    def run(self, work: dict):
        kind = work["kind"]
        if kind == "encode_files":
            return self.scorer.encode_images([Path(p) for p in work["paths"]], work["ids"]).arrays
        if kind == "encode_store":
            rows = slice(work["start"], work["stop"])
            return self.scorer.encode_image_features(self.split.regions[rows], self.split.objects[rows], work["ids"]).arrays
        images, captions = self._caches()
        rows = np.asarray(work["rows"], dtype=np.int64)
        if kind == "grid":
            return self.scorer.score_grid(images, captions, image_rows=rows, fuse=False)  # MS; fused by the driver
        if kind == "pairs":  # rows: (image row, caption row) pairs, flattened
            return self.scorer.score_pairs(images, captions, rows.reshape(-1, 2), fuse=False)  # MS; fused by the driver
        raise ValueError(f"unit kind {kind!r}: expected encode_files, encode_store, grid or pairs")

    def _caches(self):
        if not isinstance(self.caches, tuple):
            import ray

            self.caches = tuple(ray.get(list(self.caches)))  # zero-copy views of the node's object store
        return self.caches


class ScorePool:
    """engine.score's encoding and scoring units on Ray; each method yields what the single process computes."""

    def __init__(self, address: str, workers: int | None, load: dict):
        self.threads = int(load.get("threads") or 1)  # a worker's CPUs and intra-op threads (same scores: tested)
        self.load = {**load, "threads": self.threads}
        self.cluster = Cluster.connect(address, self.threads, workers,
                                       want_gpu=load.get("backend") in ("auto", "onnxruntime-cuda", "tensorrt"))
        self.caches = None

    def encode_images(self, images, ids: list[str], fingerprint: str, precision: str) -> ImageCache:
        """Image files (paths) or a store split -> the ImageCache `Scorer.encode_images` makes, shard by shard."""
        parts = shards(len(ids), ENCODE_SHARD)
        if isinstance(images, SplitFeatures):
            works = [{"kind": "encode_store", "start": a, "stop": b, "ids": ids[a:b]} for a, b in parts]
            init = {"load": self.load, "split": images}
        else:
            paths = [str(p) for p in images]
            works = [{"kind": "encode_files", "paths": paths[a:b], "ids": ids[a:b]} for a, b in parts]
            init = {"load": self.load}
        arrays: dict[str, np.ndarray] = {}
        with tqdm(total=len(ids), desc="encoding images", unit="img", file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
            for (a, b), shard in zip(parts, self.cluster.run(ScoreWorker, init, works, "image shards")):
                for name, array in shard.items():
                    if name not in arrays:
                        arrays[name] = np.empty((len(ids),) + array.shape[1:], dtype=array.dtype)
                    arrays[name][a:b] = array
                bar.update(b - a)
        return ImageCache(list(ids), arrays, fingerprint, precision)

    def use_caches(self, images, captions) -> None:
        import ray

        self.caches = [ray.put(images), ray.put(captions)]  # once; every worker of a node maps the same copy

    def score_grid(self, rows_list: list[np.ndarray]):
        works = [{"kind": "grid", "rows": rows.tolist()} for rows in rows_list]
        yield from self.cluster.run(ScoreWorker, {"load": self.load, "caches": self.caches}, works, "scoring units")

    def score_pairs(self, pairs_list: list[np.ndarray]):
        works = [{"kind": "pairs", "rows": pairs.reshape(-1).tolist()} for pairs in pairs_list]
        yield from self.cluster.run(ScoreWorker, {"load": self.load, "caches": self.caches}, works, "re-ranking units")

