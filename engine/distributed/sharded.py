"""`python -m engine.score ... --image-shards DIR [--shard-size N]`: ranking a gallery larger than memory.

The image caches are kept in DIR as memory-mapped shards (engine/distributed/gallery.py: ShardedGallery), encoded
shard by shard (each saved atomically; a rerun keeps the finished shards, and a later command on the same
gallery, artifact and precision reuses them), and every stage streams over them, so the process holds a
bounded working set whatever the gallery's size:

- first stage: t2i, every caption's top K images, shard after shard with an exact merge (`ShardedGallery.top_k`;
  with --ray one unit per shard); i2t, the top K captions of one tile of FIRST_STAGE_TILE images at a time;
- BSSAN: the journal's units (engine/journal.py: the re-rank pairs of UNIT_SHORTLIST_IMAGES images, or
  UNIT_IMAGES rows of the exhaustive matrix), each scored on an in-memory copy of ITS images' rows only
  (`ShardedGallery.rows`), in process or on Ray workers that read the shards themselves;
- ranking and output: i2t a tile of images at a time, t2i a block of captions at a time (exhaustive: a running
  exact top-k per caption over the tiles of images), written as they come into the output's temp file
  (renamed over --out at the end, as the in-memory path does).

What stays in memory: the caption side (the queries' caches and their K candidates), the ids, and one tile or
unit of images. Without --out there is no journal and the i2t arrays are per tile; with --out the journal's
arrays are memory-mapped files beside it.

The output is byte-identical to the in-memory path (tests/engine/test_sharded.py): the units are the journal's,
scored by the same Scorer calls on the same rows (an image's row is the same whether it comes from the whole
cache or from its shard), the first stage's dot products come from the same tiles (engine.runtime:
FIRST_STAGE_TILE; shards are a multiple of it), the merges keep rank_rows' order exactly, and the fusion and
final ranking are Scorer.rank_candidates / rank_rows row by row. One condition: a pair call's size is planned
from the memory budget left after the resident caches (Scorer._fit); the in-memory run counts the whole gallery
as resident, so the two plan the same calls when the in-memory run's budget is not what limits them (always
here; a gallery near the budget cannot be ranked in memory anyway).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from engine import runtime
from engine.cache import CaptionCache, ImageCache
from engine.cli import check_output_dir
from engine.distributed import RAY_EXTRA
from engine.distributed import gallery as sharded_gallery
from engine.distributed.gallery import VECTORS, ShardedGallery, blas_threads, check_rows_per_shard, use_blas_threads
from engine.errors import InputError
from engine.files import atomic_path, exclusive_lock, write_json_atomic
from engine.journal import BAR_INTERVAL, UNIT_IMAGES, UNIT_SHORTLIST_IMAGES, Journal
from engine.runtime import Scorer, first_stage_top_k, merge_top_k, pair_keys, pairs_of_keys, rank_rows, shortlist_pairs
from engine.store import SplitFeatures

DEFAULT_SHARD_SIZE = 2048  # images per shard: ~375 MB of fp32 caches at the flickr8k preset (183 kB per image)
GALLERY_JSON = "gallery.json"  # what DIR holds: the images' digest, artifact, precision, shard size
GALLERY_FORMAT = "bssan-engine-gallery-shards"
CAPTION_BLOCK = 4096  # t2i queries ranked and written at a time


# ---------------------------------------------------------------------------------------------
# Options (checked before any work)


def check_shard_options(args) -> None:
    if args.image_shards is None:
        raise InputError(f"--shard-size {args.shard_size}: given without --image-shards; expected --image-shards DIR with it")
    if args.evaluate:
        raise InputError("--evaluate with --image-shards: expected one of them (evaluation ranks every caption against "
                         "every image in memory: a gallery that needs shards cannot be evaluated this way)")
    check_rows_per_shard(args.shard_size or DEFAULT_SHARD_SIZE, "--shard-size")
    check_output_dir(args.image_shards, "--image-shards")
    if args.ray is not None and importlib.util.find_spec("threadpoolctl") is None:
        raise InputError(f"--image-shards with --ray: threadpoolctl is not installed in {sys.prefix}; expected it (the workers' "
                         f"first-stage dot products run on the driver's BLAS thread count; install it: {RAY_EXTRA})")
    if _foreign(args.image_shards):
        raise InputError(f"--image-shards {args.image_shards}: holds files but no {GALLERY_JSON}; expected an empty folder, "
                         f"a new path, or the shards an earlier engine.score wrote there")


def _foreign(directory: Path) -> bool:
    """A folder with files in it but none of this mode's record: the user's, never written into."""
    return directory.is_dir() and any(directory.iterdir()) and not (directory / GALLERY_JSON).is_file()


def check_sharded_budget(args, scorer: Scorer, sizes: dict[str, int], inputs) -> None:  # inputs: engine.score.Inputs
    """Before encoding: the budget holds what this mode keeps at once: one shard being encoded (or one unit's
    images), the caption side, and the per-tile arrays."""
    n_images, n_captions = sizes["t2i"], sizes["i2t"]
    tile = runtime.FIRST_STAGE_TILE
    images_at_once = min(n_images, max(args.shard_size or DEFAULT_SHARD_SIZE, UNIT_SHORTLIST_IMAGES, UNIT_IMAGES))
    if args.shortlist_k is None:
        k = min(args.top_k or 10, n_images)
        output = 3 * tile * n_captions * 4 + 2 * n_captions * k * 12  # a tile's MS, cosines and fused scores; t2i's running top k
    else:
        k = args.shortlist_k
        output = n_captions * k * 28 + tile * k * 16  # t2i candidates, keys, order, MS; a tile's i2t candidates and MS
    total, longest = inputs.caption_words(scorer.dims["max_words"])
    scorer.check_budget(images_at_once, n_captions, output, words=longest, total_words=total)


# ---------------------------------------------------------------------------------------------
# The gallery's shards: encoded once, resumable, reused


def gallery_key(args, scorer: Scorer, inputs) -> dict:
    return {"format": GALLERY_FORMAT, "images": inputs.image_digest, "count": len(inputs.image_ids),
            "artifact": scorer.fingerprint, "precision": scorer.cache_precision,
            "rows_per_shard": args.shard_size or DEFAULT_SHARD_SIZE}


def open_gallery(args, scorer: Scorer, inputs, pool=None) -> ShardedGallery:
    """DIR's shards of this gallery: encoded where missing (in process, or on `pool`'s Ray workers), then mapped.
    DIR must be new, empty, or hold this gallery's shards (its gallery.json): another gallery's are never replaced."""
    directory: Path = args.image_shards
    key = gallery_key(args, scorer, inputs)
    record = directory / GALLERY_JSON
    if directory.is_dir() and any(directory.iterdir()):
        try:
            held = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
        if held != key:
            what = (f"files but no readable {GALLERY_JSON}" if not isinstance(held, dict) else
                    "the shards of another gallery, artifact, precision or shard size")
            raise InputError(f"--image-shards {directory}: holds {what}; expected an empty folder, a new path, or the "
                             f"shards of this gallery (the same --images, --model, --precision and --shard-size)")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, key, fsync=True)
    busy = f"--image-shards {directory}: another engine.score is encoding into this folder; wait for it or use another folder"
    with exclusive_lock(directory / ".lock", busy, remove=True):
        with tqdm(total=len(inputs.image_ids), desc="image shards", unit="img", file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
            kept = []

            def progress(start: int, stop: int, encoded: bool) -> None:
                bar.update(stop - start)
                if not encoded:
                    kept.append(stop - start)

            gallery = ShardedGallery.build(directory, inputs.image_ids, key["rows_per_shard"], scorer.fingerprint,
                                           scorer.cache_precision, lambda bounds: encode_shards(scorer, inputs, bounds, pool),
                                           progress)
    if kept:
        print(f"note: --image-shards {directory}: kept {len(kept)} shards already encoded ({sum(kept)} images)", file=sys.stderr)
    return gallery


def encode_shards(scorer: Scorer, inputs, bounds: list[tuple[int, int]], pool=None):
    """The ImageCache of each [start, stop) in `bounds`, in order: the calls Scorer.encode_images makes for those rows
    (shard boundaries are multiples of every batch it cuts), in process or as engine.distributed.score's units."""
    images, ids = inputs.images, inputs.image_ids
    if pool is None:
        for a, b in bounds:
            if isinstance(images, SplitFeatures):
                yield scorer.encode_image_features(images.regions[a:b], images.objects[a:b], ids[a:b])
            else:
                yield scorer.encode_images(list(images[a:b]), ids[a:b])
        return
    from engine.distributed import shards
    from engine.distributed.score import ENCODE_SHARD, ScoreWorker

    pieces = [(a + x, a + y) for a, b in bounds for x, y in shards(b - a, ENCODE_SHARD)]
    if isinstance(images, SplitFeatures):
        works = [{"kind": "encode_store", "start": a, "stop": b, "ids": ids[a:b]} for a, b in pieces]
        init = {"load": pool.load, "split": images}
    else:
        works = [{"kind": "encode_files", "paths": [str(p) for p in images[a:b]], "ids": ids[a:b]} for a, b in pieces]
        init = {"load": pool.load}
    results = pool.cluster.run(ScoreWorker, init, works, "image shards")
    for a, b in bounds:
        parts = [next(results) for x, y in pieces if a <= x < b]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        yield ImageCache(list(ids[a:b]), arrays, scorer.fingerprint, scorer.cache_precision)


# ---------------------------------------------------------------------------------------------
# Units: the same function in process and on a Ray worker


def unit_pairs(start: int, stop: int, n_cap: int, i2t: np.ndarray | None, t2i_keys: np.ndarray | None) -> np.ndarray:
    """Keys (image row x n_cap + caption row), sorted and distinct, of every re-rank pair of images [start, stop): their
    i2t candidates [stop - start, K] and the t2i pairs (sorted keys) on them: engine.journal.score_shortlists' unit."""
    keys = []
    if i2t is not None:
        keys.append(pair_keys(shortlist_pairs("i2t", np.arange(start, stop), i2t), n_cap))
    if t2i_keys is not None:
        lo, hi = np.searchsorted(t2i_keys, [start * n_cap, stop * n_cap])
        keys.append(t2i_keys[lo:hi])
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def score_unit(scorer: Scorer, gallery: ShardedGallery, captions: CaptionCache, start: int, stop: int, keys: np.ndarray,
               progress=False) -> np.ndarray:
    """BSSAN MS of the pairs `keys` (all on images [start, stop)), scored as Scorer.score_pairs scores them over the
    whole cache: the same pairs in the same order, on an in-memory copy of these images' rows."""
    n_cap = len(captions)
    pairs = pairs_of_keys(keys, n_cap) - [start, 0]  # local image rows: same order, same calls
    return scorer.score_pairs(gallery.rows(np.arange(start, stop)), captions, pairs, progress=progress, fuse=False)


def block_i2t(gallery: ShardedGallery, captions: CaptionCache, start: int, stop: int, k: int) -> np.ndarray:
    """i2t candidates [stop - start, k] of a tile-aligned block of images (= Scorer.shortlist's rows, bit for bit)."""
    return first_stage_top_k(gallery.rows(np.arange(start, stop), [VECTORS]).arrays[VECTORS], captions.arrays["text_vectors"], k)[0]


class ShardedScoreWorker:
    """On a Ray worker: one loaded Scorer, the captions (an object ref), the gallery's shards (a shared path)."""

    def __init__(self, load: dict, captions, gallery: str, threads: int | None, t2i_keys=None, k_i2t: int | None = None):
        use_blas_threads(threads)  # the first-stage dot products: the driver's BLAS threads, the driver's bits
        self.scorer = Scorer.load(**load)
        self.captions, self.t2i_keys, self.k_i2t = captions, t2i_keys, k_i2t
        self.gallery = ShardedGallery.load(gallery)

    def run(self, work: dict):
        if not isinstance(self.captions, CaptionCache):
            import ray

            self.captions = ray.get(self.captions)
            self.t2i_keys = None if self.t2i_keys is None else ray.get(self.t2i_keys)
        if work["kind"] == "grid":
            rows = np.asarray(work["rows"], np.int64)
            return self.scorer.score_grid(self.gallery.rows(rows), self.captions, fuse=False)
        if work["kind"] == "block":
            start, stop = work["start"], work["stop"]
            i2t = None if self.k_i2t is None else block_i2t(self.gallery, self.captions, start, stop, self.k_i2t)
            units = {}
            for a in work["units"]:
                b = min(a + UNIT_SHORTLIST_IMAGES, stop)
                keys = unit_pairs(a, b, len(self.captions), None if i2t is None else i2t[a - start:b - start], self.t2i_keys)
                units[a] = (keys, score_unit(self.scorer, self.gallery, self.captions, a, b, keys))
            return i2t, units
        raise ValueError(f"unit kind {work['kind']!r}: expected grid or block")


# ---------------------------------------------------------------------------------------------
# The command


@contextlib.contextmanager
def open_output(out: Path | None):
    """`write(records)`: into --out's temp file (renamed over --out, fsynced, when the block ends), else printed."""
    from engine.score import format_results, print_results

    if out is None:
        yield print_results
        return
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            yield lambda records: handle.write(format_results(out.suffix, records))


def score_sharded(args, scorer: Scorer, inputs, sizes: dict[str, int], directions: list[str], journal: Journal) -> int:
    """engine.score's work with --image-shards: the same output bytes as score_with_journal, bounded memory."""
    from engine.score import DEFAULT_TOP_K, encode_captions, ray_pool

    pool = ray_pool(args) if args.ray is not None else None
    gallery = open_gallery(args, scorer, inputs, pool)
    captions = journal.cache("captions", CaptionCache, lambda: encode_captions(scorer, inputs), scorer.fingerprint)
    top = {d: min(args.top_k or DEFAULT_TOP_K, sizes[d]) for d in directions}
    remote = None
    if pool is not None:
        remote = {"load": pool.load, "captions": sharded_gallery.to_object_store(captions), "gallery": str(args.image_shards.resolve()),
                  "threads": blas_threads()}
    queries = 0
    with open_output(args.out) as write:
        if args.shortlist_k is None:
            queries = rank_exhaustive(scorer, gallery, captions, top, journal, write, pool, remote)
        else:
            ks = {d: min(args.shortlist_k, sizes[d]) for d in directions}
            queries = rank_shortlists(scorer, gallery, captions, ks, top, journal, write, pool, remote)
    if args.out is not None:
        journal.remove()
        print(f"{args.out}: {queries} queries", file=sys.stderr)
    return 0


def records(direction: str, image_ids: list[str], captions, query_rows: np.ndarray, ranked: np.ndarray, scores: np.ndarray,
            k: int) -> list[dict]:
    """engine.score.query_records for a block of queries (rows of the query side)."""
    from engine.score import query_records

    if direction == "i2t":
        return query_records("i2t", SimpleNamespace(ids=[image_ids[q] for q in query_rows]), captions, ranked, scores, k)
    block = SimpleNamespace(ids=[captions.ids[q] for q in query_rows], texts=[captions.texts[q] for q in query_rows])
    return query_records("t2i", SimpleNamespace(ids=image_ids), block, ranked, scores, k)


def rank_exhaustive(scorer: Scorer, gallery: ShardedGallery, captions: CaptionCache, top: dict[str, int], journal: Journal,
                    write, pool=None, remote=None) -> int:
    """Every image x every caption in the journal's units (rows{start}: UNIT_IMAGES images each), fused and ranked a tile
    of images at a time; t2i keeps each caption's running top k (merge_top_k: rank_rows' order)."""
    n_img, n_cap = len(gallery), len(captions)
    tile = runtime.FIRST_STAGE_TILE
    matrix = journal.array("scores", (n_img, n_cap), np.float32) if journal.dir is not None else None
    units = [(f"rows{a}", np.arange(a, min(a + UNIT_IMAGES, n_img))) for a in range(0, n_img, UNIT_IMAGES)]
    todo = [(unit, rows) for unit, rows in units if unit not in journal.done]
    done_pairs = sum(len(rows) for unit, rows in units if unit in journal.done) * n_cap
    running = None
    with tqdm(total=n_img * n_cap, initial=done_pairs, desc="scoring", unit="pair", unit_scale=True, file=sys.stderr,
              mininterval=BAR_INTERVAL) as bar:
        results = (pool.cluster.run(ShardedScoreWorker, remote, [{"kind": "grid", "rows": rows.tolist()} for _, rows in todo],
                                    "scoring units") if pool is not None else
                   (scorer.score_grid(gallery.rows(rows), captions, progress=bar, fuse=False) for _, rows in todo))
        for b0 in range(0, n_img, tile):
            b1 = min(b0 + tile, n_img)
            bssan = np.empty((b1 - b0, n_cap), np.float32)
            for unit, rows in units[b0 // UNIT_IMAGES:-(-b1 // UNIT_IMAGES)]:
                if unit in journal.done:
                    bssan[rows - b0] = matrix[rows]
                    continue
                bssan[rows - b0] = next(results)
                if pool is not None:
                    bar.update(len(rows) * n_cap)
                if matrix is not None:
                    matrix[rows] = bssan[rows - b0]
                journal.finish_unit(unit, *([matrix] if matrix is not None else []))
            fused = bssan
            if scorer.fuses:
                vectors = gallery.rows(np.arange(b0, b1), [VECTORS])
                fused = scorer.fusion.apply(scorer.first_stage(vectors, captions, np.arange(b1 - b0), np.arange(n_cap)), bssan)
            if "i2t" in top:
                ranked, scores = rank_rows(fused, top["i2t"])
                write(records("i2t", gallery.ids, captions, np.arange(b0, b1), ranked, scores, top["i2t"]))
            if "t2i" in top:
                found, scores = rank_rows(fused.T, min(top["t2i"], b1 - b0))
                part = (found + b0, scores)
                running = part if running is None else merge_top_k([running, part], top["t2i"])
    if "t2i" in top:
        for c0 in range(0, n_cap, CAPTION_BLOCK):
            rows = np.arange(c0, min(c0 + CAPTION_BLOCK, n_cap))
            write(records("t2i", gallery.ids, captions, rows, running[0][rows], running[1][rows], top["t2i"]))
    return (n_img if "i2t" in top else 0) + (n_cap if "t2i" in top else 0)


def rank_shortlists(scorer: Scorer, gallery: ShardedGallery, captions: CaptionCache, ks: dict[str, int], top: dict[str, int],
                    journal: Journal, write, pool=None, remote=None) -> int:
    """engine.journal.score_shortlists over the shards: the t2i first stage over every shard (merged exactly), then the
    units of UNIT_SHORTLIST_IMAGES images a tile at a time (that tile's i2t first stage, its units' BSSAN, its i2t
    rankings), then the t2i rankings a block of captions at a time. Journaled: the t2i candidates (unit
    first-stage), and per unit its images' i2t candidates and MS and the MS of the t2i pairs on its images."""
    n_img, n_cap = len(gallery), len(captions)
    tile = runtime.FIRST_STAGE_TILE
    text_vectors = captions.arrays["text_vectors"]
    t2i_keys = t2i_order = t2i_ms = t2i = None
    if "t2i" in ks:
        k = ks["t2i"]
        t2i = journal.array("t2i_candidates", (n_cap, k), np.int64)
        if "first-stage" not in journal.done:
            t2i[:] = gallery.top_k(text_vectors, k, pool.cluster if pool is not None else None)[0]
            journal.finish_unit("first-stage", t2i)
        keys = pair_keys(shortlist_pairs("t2i", np.arange(n_cap), np.asarray(t2i)), n_cap)  # caption-major
        t2i_order = np.argsort(keys, kind="stable")
        t2i_keys = keys[t2i_order]
        t2i_ms = journal.array("t2i_bssan", (n_cap * k,), np.float32)
    k1 = ks.get("i2t")
    stored = journal.dir is not None
    i2t_all = journal.array("i2t_candidates", (n_img, k1), np.int64) if stored and k1 else None
    i2t_ms_all = journal.array("i2t_bssan", (n_img, k1), np.float32) if stored and k1 else None

    blocks = [(b0, min(b0 + tile, n_img)) for b0 in range(0, n_img, tile)]

    def block_units(b0: int, b1: int) -> list[int]:
        return [a for a in range(b0, b1, UNIT_SHORTLIST_IMAGES) if f"pairs{a}" not in journal.done]

    todo = [(b0, b1, block_units(b0, b1)) for b0, b1 in blocks]
    results = None
    if pool is not None:
        init = {**remote, "t2i_keys": None if t2i_keys is None else sharded_gallery.to_object_store(t2i_keys), "k_i2t": k1}
        works = [{"kind": "block", "start": b0, "stop": b1, "units": units} for b0, b1, units in todo if units]
        results = pool.cluster.run(ShardedScoreWorker, init, works, "re-ranking units")
    with tqdm(total=n_img, desc=f"re-ranking {'+'.join(ks)}", unit="img", file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
        for b0, b1, units in todo:
            if not units and stored:  # every unit of the tile is journaled
                i2t = None if k1 is None else np.asarray(i2t_all[b0:b1])
                i2t_ms = None if k1 is None else np.asarray(i2t_ms_all[b0:b1])
                bar.update(b1 - b0)
            else:
                if results is not None and units:
                    i2t, computed = next(results)
                else:
                    i2t = None if k1 is None else block_i2t(gallery, captions, b0, b1, k1)
                    computed = None
                i2t_ms = None if k1 is None else (np.asarray(i2t_ms_all[b0:b1]) if stored else np.empty((b1 - b0, k1), np.float32))
                for a in range(b0, b1, UNIT_SHORTLIST_IMAGES):
                    b = min(a + UNIT_SHORTLIST_IMAGES, b1)
                    if a in units:
                        if computed is not None:
                            keys, ms = computed[a]
                        else:
                            keys = unit_pairs(a, b, n_cap, None if i2t is None else i2t[a - b0:b - b0], t2i_keys)
                            ms = score_unit(scorer, gallery, captions, a, b, keys) if len(keys) else np.empty(0, np.float32)
                        if k1 is not None:
                            unit_keys = pair_keys(shortlist_pairs("i2t", np.arange(a, b), i2t[a - b0:b - b0]), n_cap)
                            i2t_ms[a - b0:b - b0] = ms[np.searchsorted(keys, unit_keys)].reshape(b - a, -1)
                        if t2i_keys is not None:
                            lo, hi = np.searchsorted(t2i_keys, [a * n_cap, b * n_cap])
                            t2i_ms[t2i_order[lo:hi]] = ms[np.searchsorted(keys, t2i_keys[lo:hi])]
                        if stored and k1 is not None:
                            i2t_all[a:b], i2t_ms_all[a:b] = i2t[a - b0:b - b0], i2t_ms[a - b0:b - b0]
                        if len(keys):  # a unit is a range of images with pairs (score_shortlists' units)
                            journal.finish_unit(f"pairs{a}", *[x for x in (i2t_all, i2t_ms_all, t2i_ms) if isinstance(x, np.memmap)])
                    bar.update(b - a)
            if k1 is not None:
                vectors = gallery.rows(np.arange(b0, b1), [VECTORS])
                ranking = scorer.rank_candidates(vectors, captions, "i2t", np.arange(b1 - b0), i2t, i2t_ms, k1)
                write(records("i2t", gallery.ids, captions, np.arange(b0, b1), ranking.indices, ranking.scores, top["i2t"]))
    if t2i is not None:
        k = ks["t2i"]
        for c0 in range(0, n_cap, CAPTION_BLOCK):
            c1 = min(c0 + CAPTION_BLOCK, n_cap)
            candidates = np.asarray(t2i[c0:c1])
            images = np.unique(candidates)
            vectors = gallery.rows(images, [VECTORS])
            ranking = scorer.rank_candidates(vectors, captions, "t2i", np.arange(c0, c1), np.searchsorted(images, candidates),
                                             np.asarray(t2i_ms[c0 * k:c1 * k]), k)
            write(records("t2i", gallery.ids, captions, np.arange(c0, c1), images[ranking.indices], ranking.scores, top["t2i"]))
    return (n_img if "i2t" in ks else 0) + (n_cap if "t2i" in ks else 0)
