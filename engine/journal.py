"""Resumable scoring for `python -m engine.score`: a journal beside the output, work in fixed units.

`.<out name>.partial/` holds run.json (the run's key: inputs, artifact, backend, precision, batch
size, threads, budget), the encoded caches, the score arrays (memory-mapped .npy) and progress.json
(the units done). A unit's arrays are flushed before progress.json lists it (written atomically),
so a listed unit is on disk; after kill -9 the same command skips the listed units. Units are fixed
(UNIT_IMAGES rows of the score matrix, or UNIT_QUERIES re-ranked queries) and every pair call is
made the same way again (the batch plan depends on the inputs and options only, never on the
process's memory), so the resumed output is byte-identical. A journal of another run is discarded
with a note; progress.json carries the digest of its run's key too, so progress of another run is
never trusted. run.json and progress.json are fsynced with their folder: after a power loss the
journal lists only units that are on disk. Without --out there is no journal (nothing is written).

One writer per output: `.<out name>.lock` beside it is flocked while the command runs (the OS drops
the lock even on kill -9); a second command on the same --out is refused with one line. Holding it,
the command deletes `.<out name>.tmp-<pid>` files a killed writer left.

For tests, STOP_AFTER_ENV=N makes the process SIGKILL itself after N journaled units: a real kill -9;
engine.files' BSSAN_KILL_AT_WRITE=N kills it at its N-th write point (every journal step below is one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cache import CaptionCache, ImageCache
from engine.runtime import Scorer
from engine.files import exclusive_lock, remove_stale_temps, write_json_atomic, write_point

UNIT_IMAGES = 8  # exhaustive: image rows of the score matrix per journaled unit (~40k pairs at 5,000 captions)
UNIT_QUERIES = 256  # shortlist: re-ranked queries per journaled unit
STOP_AFTER_ENV = "BSSAN_SCORE_STOP_AFTER"
JOURNAL_VERSION = 2  # 2: exhaustive units hold BSSAN MS (fused afterwards), shortlist units their MS too
BAR_INTERVAL = 1.0 if sys.stderr.isatty() else 30.0  # into a log file: a line per 30 s, not one per update


@contextlib.contextmanager
def output_lock(out: Path | None):
    """The one-writer lock of --out (nothing without --out); stale temp files of --out removed under it."""
    if out is None:
        yield
        return
    busy = f"--out {out}: another engine.score process is writing this output; wait for it to finish or use another --out"
    with exclusive_lock(out.with_name(f".{out.name}.lock"), busy, remove=True):
        remove_stale_temps(out)
        yield


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class Journal:
    """`.<out>.partial/`: run.json (the run's key), caches, score arrays, progress.json (done units)."""

    def __init__(self, out: Path | None, key: dict):
        self.dir = None if out is None else out.with_name(f".{out.name}.partial")
        self.key, self.done, self.stop_after, self.units_this_run = key, set(), int(os.environ.get(STOP_AFTER_ENV, 0)), 0
        if self.dir is None:
            return
        run = self.dir / "run.json"
        if self.dir.is_dir():
            try:
                previous = json.loads(run.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                previous = None
            if previous != key:
                print(f"note: {self.dir} is from a different run (or incomplete); starting over", file=sys.stderr)
                shutil.rmtree(self.dir)
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            write_point()
            write_json_atomic(run, key, fsync=True)
        progress = self.dir / "progress.json"
        if progress.is_file():
            try:
                recorded = json.loads(progress.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                recorded = None
            if not isinstance(recorded, dict) or recorded.get("run") != key_digest(key):
                print(f"note: {progress} is not this run's; recomputing its units", file=sys.stderr)
            else:
                self.done = set(recorded["done"])

    def cache(self, name: str, cls, encode, expect: str):
        """A cache saved in the journal (loaded), or `encode()` saved there."""
        if self.dir is not None and (self.dir / name / "cache.json").is_file():
            return cls.load(self.dir / name, expect=expect)
        cache = encode()
        if self.dir is not None:
            cache.save(self.dir / name)
        return cache

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if self.dir is None:
            return np.zeros(shape, dtype=dtype)
        path = self.dir / f"{name}.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def finish_unit(self, unit: str, *arrays: np.ndarray) -> None:
        """Flush the unit's arrays, then list it (atomically): a listed unit is on disk."""
        self.done.add(unit)
        if self.dir is not None:
            for array in arrays:
                if isinstance(array, np.memmap):
                    array.flush()
            write_point()
            write_json_atomic(self.dir / "progress.json", {"run": key_digest(self.key), "done": sorted(self.done)}, fsync=True)
        self.units_this_run += 1
        if self.stop_after and self.units_this_run >= self.stop_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        if self.dir is not None:
            write_point()
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Scoring in units


def score_exhaustive(scorer: Scorer, images: ImageCache, captions: CaptionCache, journal: Journal, pool=None) -> np.ndarray:
    """BSSAN MS [N_img, N_cap] (not fused: the caller fuses it with the first stage when the scorer does).
    `pool` (engine.distributed.score.ScorePool, --ray): the same units' score_grid calls made on Ray workers."""
    matrix = journal.array("scores", (len(images), len(captions)), np.float32)
    units = [(f"rows{start}", np.arange(start, min(start + UNIT_IMAGES, len(images)))) for start in range(0, len(images), UNIT_IMAGES)]
    done_pairs = sum(len(rows) for unit, rows in units if unit in journal.done) * len(captions)
    todo = [(unit, rows) for unit, rows in units if unit not in journal.done]
    with tqdm(total=len(images) * len(captions), initial=done_pairs, desc="scoring", unit="pair", unit_scale=True,
              file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
        results = (pool.score_grid([rows for _, rows in todo]) if pool is not None else
                   (scorer.score_grid(images, captions, image_rows=rows, progress=bar, fuse=False) for _, rows in todo))
        for (unit, rows), result in zip(todo, results):
            matrix[rows] = result  # MS; fused by the caller
            if pool is not None:
                bar.update(result.size)
            journal.finish_unit(unit, matrix)
    return np.asarray(matrix)


def score_shortlist(scorer: Scorer, images: ImageCache, captions: CaptionCache, direction: str, shortlist_k: int,
                    journal: Journal, pool=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranked [Q, S], scores [Q, S], bssan [Q, S]): every query's shortlist re-ranked by the product score
    (scores; BSSAN MS fused with the first stage per scorer.fusion) and the BSSAN MS of each.
    `pool` (engine.distributed.score.ScorePool, --ray): the same units' top_k calls made on Ray workers."""
    n_query = len(images) if direction == "i2t" else len(captions)
    ranked = journal.array(f"{direction}_ranked", (n_query, shortlist_k), np.int64)
    scores = journal.array(f"{direction}_scores", (n_query, shortlist_k), np.float32)
    bssan = journal.array(f"{direction}_bssan", (n_query, shortlist_k), np.float32)
    units = [(f"{direction}{start}", np.arange(start, min(start + UNIT_QUERIES, n_query))) for start in range(0, n_query, UNIT_QUERIES)]
    done_pairs = sum(len(rows) for unit, rows in units if unit in journal.done) * shortlist_k
    with tqdm(total=n_query * shortlist_k, initial=done_pairs, desc=f"re-ranking {direction}", unit="pair", unit_scale=True,
              file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
        todo = [(unit, rows) for unit, rows in units if unit not in journal.done]
        results = (pool.top_k(direction, shortlist_k, [rows for _, rows in todo]) if pool is not None else
                   (scorer.top_k(images, captions, shortlist_k, direction, queries=rows, shortlist_k=shortlist_k, progress=bar)
                    for _, rows in todo))
        for (unit, rows), result in zip(todo, results):
            ranked[rows], scores[rows], bssan[rows] = result.indices, result.scores, result.bssan
            if pool is not None:
                bar.update(result.indices.size)
            journal.finish_unit(unit, ranked, scores, bssan)
    return np.asarray(ranked), np.asarray(scores), np.asarray(bssan)
