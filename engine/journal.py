"""Resumable scoring for `python -m engine.score`: a journal beside the output, work in fixed units.

`.<out name>.partial/` holds run.json (the run's key: inputs, artifact, backend, precision, batch
size, threads, budget), the encoded caches, the score arrays (memory-mapped .npy) and progress.json
(the units done). A unit's arrays are flushed before progress.json lists it (written atomically),
so a listed unit is on disk; after kill -9 the same command skips the listed units. Units are fixed
(UNIT_IMAGES rows of the score matrix, or the re-rank pairs of UNIT_SHORTLIST_IMAGES images) and every pair call is
made the same way again (the batch plan depends on the inputs and options only, never on the
process's memory), so the resumed output is byte-identical. A journal of another run is discarded
with a note; progress.json carries the digest of its run's key too, so progress of another run is
never trusted. run.json and progress.json are fsynced with their folder: after a power loss the
journal lists only units that are on disk. Without --out there is no journal (nothing is written).

The caches are saved in the background (a thread per cache: ~380 MB fsynced at Flickr8K test, seconds of
disk time) while encoding and scoring go on. Units finished before the caches are on disk are listed once
they are (the next unit that finishes lists them all), so a listed unit's caches are always on disk; a kill
before that costs only the unlisted units. A failed save is raised at the next finished unit.

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
import threading
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cache import CaptionCache, ImageCache
from engine.runtime import Ranking, Scorer, pair_keys, pairs_of_keys, shortlist_pairs
from engine.files import atomic_path, exclusive_lock, remove_stale_temps, write_json_atomic, write_point

UNIT_IMAGES = 8  # exhaustive: image rows of the score matrix per journaled unit (~40k pairs at 5,000 captions)
# shortlist: images per journaled unit; a unit scores every re-rank pair (of any direction) of its images
# (~128k pairs, ~2.3 s on 2 cores, in Flickr8K test's 1K x 5K at K=100: ~500 pairs per image). Units are scored one
# after another, each a barrier for the pair workers: 64-image units cost 0.4 s more of the 20 s K=100 run
UNIT_SHORTLIST_IMAGES = 256
STOP_AFTER_ENV = "BSSAN_SCORE_STOP_AFTER"
JOURNAL_VERSION = 3  # 2: exhaustive units hold BSSAN MS (fused afterwards), shortlist units their MS too;
# 3: shortlist units are the MS of the union of both directions' candidate pairs, image by image
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
        self._saves: list[_CacheSave] = []  # caches being saved in the background
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
        """A cache saved in the journal (loaded), or `encode()` (saved there in the background)."""
        if self.dir is not None and (self.dir / name / "cache.json").is_file():
            return cls.load(self.dir / name, expect=expect)
        cache = encode()
        if self.dir is not None:
            self._saves.append(_CacheSave(cache, self.dir / name))
        return cache

    def caches_saved(self, wait: bool = False) -> bool:
        """True when every cache save has finished (wait: block until then); a failed save's error is raised here."""
        for save in self._saves:
            if wait:
                save.join()
            if save.is_alive():
                return False
            if save.error is not None:
                raise save.error
        return True

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if self.dir is None:
            return np.zeros(shape, dtype=dtype)
        path = self.dir / f"{name}.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r+")
        # created under a temp name and renamed into place: a process killed while creating it (e.g. by a write of
        # the background cache saves) leaves no header-less file for the resumed run to trip over
        with atomic_path(path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            array.flush()
        return array

    def finish_unit(self, unit: str, *arrays: np.ndarray) -> None:
        """Flush the unit's arrays, then list it with every finished unit (atomically) once the caches are on disk:
        a listed unit and its caches are on disk. (The test hook STOP_AFTER_ENV waits for the caches: it kills the
        process after N listed units.)"""
        self.done.add(unit)
        if self.dir is not None:
            for array in arrays:
                if isinstance(array, np.memmap):
                    array.flush()
            if self.caches_saved(wait=bool(self.stop_after)):
                write_point()
                write_json_atomic(self.dir / "progress.json", {"run": key_digest(self.key), "done": sorted(self.done)}, fsync=True)
        self.units_this_run += 1
        if self.stop_after and self.units_this_run >= self.stop_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        if self.dir is not None:
            for save in self._saves:  # a save still writing into the folder would leave part of it behind
                save.join()
            write_point()
            shutil.rmtree(self.dir, ignore_errors=True)


class _CacheSave(threading.Thread):
    """cache.save(path) in a daemon thread (a Ctrl-C does not wait for it; the next run removes its temp folder)."""

    def __init__(self, cache, path: Path):
        super().__init__(name=f"bssan-journal-save-{path.name}", daemon=True)
        self.cache, self.path, self.error = cache, path, None
        self.start()

    def run(self) -> None:
        try:
            self.cache.save(self.path)
        except BaseException as exc:  # raised in the main thread by Journal.caches_saved
            self.error = exc


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


def score_shortlists(scorer: Scorer, images: ImageCache, captions: CaptionCache, shortlist_ks: dict[str, int],
                     journal: Journal, pool=None) -> tuple[np.ndarray, np.ndarray, dict[str, Ranking]]:
    """(pairs [U, 2], bssan [U], {direction: Ranking}): every query of each direction in `shortlist_ks` ({"i2t": K,
    "t2i": K'}) has its first-stage top K re-ranked by the product score (Scorer.rank_candidates: BSSAN MS fused
    with the first stage per scorer.fusion), each Ranking holding all K candidates, best first, and their MS.

    The BSSAN work is the union of every direction's candidate pairs (image row, caption row), each scored once
    even when both directions want it, regrouped by image: a unit is all pairs of UNIT_SHORTLIST_IMAGES images
    through Scorer.score_pairs, so an image's ~hundreds of captions (Flickr8K test at K = 100: ~500) go through
    its grid graphs in length-sorted calls (no per-pair gathers), as the exhaustive path does. `pairs` is the
    union sorted by image then caption, `bssan` its MS. `pool` (engine.distributed.score.ScorePool, --ray): the
    same units' score_pairs calls made on Ray workers."""
    candidates = {d: scorer.shortlist(images, captions, k, d) for d, k in shortlist_ks.items()}  # [Q, K] per direction
    wanted = {d: shortlist_pairs(d, np.arange(len(c)), c) for d, c in candidates.items()}
    n_cap = len(captions)
    keys = np.unique(np.concatenate([pair_keys(p, n_cap) for p in wanted.values()]))  # sorted: by image, then caption
    pairs = pairs_of_keys(keys, n_cap)
    bssan = journal.array("shortlist_bssan", (len(pairs),), np.float32)
    bounds = np.searchsorted(pairs[:, 0], np.arange(0, len(images) + UNIT_SHORTLIST_IMAGES, UNIT_SHORTLIST_IMAGES))
    units = [(f"pairs{start * UNIT_SHORTLIST_IMAGES}", slice(int(a), int(b)))
             for start, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    done_pairs = sum(s.stop - s.start for unit, s in units if unit in journal.done)
    todo = [(unit, s) for unit, s in units if unit not in journal.done]
    with tqdm(total=len(pairs), initial=done_pairs, desc=f"re-ranking {'+'.join(shortlist_ks)}", unit="pair", unit_scale=True,
              file=sys.stderr, mininterval=BAR_INTERVAL) as bar:
        results = (pool.score_pairs([pairs[s] for _, s in todo]) if pool is not None else
                   (scorer.score_pairs(images, captions, pairs[s], progress=bar, fuse=False) for _, s in todo))
        for (unit, s), result in zip(todo, results):
            bssan[s] = result  # MS; fused with the first stage by rank_candidates
            if pool is not None:
                bar.update(len(result))
            journal.finish_unit(unit, bssan)
    bssan = np.asarray(bssan)
    rankings = {}
    for d, c in candidates.items():
        index = np.searchsorted(keys, pair_keys(wanted[d], n_cap))
        rankings[d] = scorer.rank_candidates(images, captions, d, np.arange(len(c)), c, bssan[index], c.shape[1])
    return pairs, bssan, rankings
