"""Gallery compaction beside the service, on synthetic rows (no model): while the index rebuild is held
(an add of more than one vector waits on an Event), searches, adds, replacements and removals finish and
see the right images; the swapped-in result is the compaction of the live rows when it began followed by
those writes; a crash (simulated and a real kill -9) before the swap leaves a correct gallery on disk.
An IVF index's (re)training is such a rebuild too: the old index answers until the trained one is swapped in."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the first stage needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.cache import ImageCache  # noqa: E402
from engine.serve import gallery as gallery_module  # noqa: E402
from engine.serve.gallery import Gallery  # noqa: E402
from engine.serve.index import VectorIndex  # noqa: E402
from tests.engine.serve.test_serve_gallery import DIM, FINGERPRINT, row  # noqa: E402,F401  (one synthetic row maker)
WAIT = 20  # seconds a blocked rebuild or a call may take before the test fails (never reached when it passes)
IVF_OPTIONS = {"train_at": 16, "nlist": 4, "nprobe": 4}  # trained from 16 rows on; every list scanned: exact
IVF_TRAINING = {"train_at": 2000, "nlist": 16, "nprobe": 16}  # a training at an import of 2,500 rows; exact once trained
REPO = Path(__file__).resolve().parents[3]


class GatedIndex(VectorIndex):
    """A VectorIndex whose adds of more than one vector that may train (a rebuild's: writes add with train=False)
    set `started` and wait for `release`."""

    started: threading.Event
    release: threading.Event

    def add(self, vectors, train=True):
        if len(vectors) > 1 and train:
            GatedIndex.started.set()
            if not GatedIndex.release.wait(WAIT):
                raise TimeoutError("the test never released the rebuild")
        return super().add(vectors, train)


@pytest.fixture()
def gate(monkeypatch):
    """Compaction when 8 slots and a quarter are dead; rebuilds held until gate.release is set."""
    monkeypatch.setattr(gallery_module, "COMPACT_MIN", 8)
    monkeypatch.setattr(gallery_module, "COMPACT_FRACTION", 0.25)
    monkeypatch.setattr(GatedIndex, "started", threading.Event(), raising=False)
    monkeypatch.setattr(GatedIndex, "release", threading.Event(), raising=False)
    monkeypatch.setattr(gallery_module, "VectorIndex", GatedIndex)
    yield GatedIndex
    GatedIndex.release.set()  # a failing test never leaves a thread waiting


def open_gallery(root, kind: str = "flat", **options) -> Gallery:
    return Gallery.open(root, FINGERPRINT, "fp32", index_kind=kind, index_options=IVF_OPTIONS if kind == "ivf" else {},
                        **options)


def contents(gallery: Gallery) -> dict[str, np.ndarray]:
    view = gallery.view()
    return {i: np.asarray(view.arrays["image_vectors"][s]) for s, i in enumerate(view.ids) if i}


def expected_rows(seeds: dict[str, int]) -> dict[str, np.ndarray]:
    return {i: row(i, seed).arrays["image_vectors"][0] for i, seed in seeds.items()}


def exact_top(live: dict[str, np.ndarray], query: np.ndarray, k: int) -> list[str]:
    return sorted(live, key=lambda i: (-float(live[i] @ query), i))[:k]


def searched(gallery: Gallery, query: np.ndarray, k: int) -> list[str]:
    view, slots, _ = gallery.search(query[None, :], k)
    return [view.ids[s] for s in slots[0]]


def in_time(work, *args):
    """Run work(*args) in a thread; fail unless it returns within WAIT seconds (it would wait on the gallery's lock)."""
    out: dict = {}

    def target():
        try:
            out["value"] = work(*args)
        except BaseException as exc:  # raised in the test below
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"{work.__name__} did not finish while a rebuild or a save was held: it waited on the lock"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def start_held_compaction(gallery: Gallery, gate) -> dict[str, int]:
    """img0..img31 added one at a time, img0..img7 removed: the 8th removal starts a compaction, held in its rebuild.
    Returns the live ids and their row seeds. An IVF index's first training (a rebuild too) is let through first."""
    gallery.put([(f"img{i}", row(f"img{i}", i), None) for i in range(32)])
    if gallery.compaction is not None:
        assert gallery.index.training_due and gallery.compaction.live is None
        gate.release.set()
        assert gallery.wait_compaction(WAIT) and gallery.index.trained and gallery.count == 32
        gate.started.clear()
        gate.release.clear()

    def remove_eight():
        for i in range(8):
            assert gallery.remove(f"img{i}")

    in_time(remove_eight)
    assert gate.started.wait(WAIT), "no compaction started after a quarter of the slots died"
    assert gallery.compaction is not None and gallery.count == 32
    return {f"img{i}": i for i in range(8, 32)}


def writes_during(gallery: Gallery, seeds: dict[str, int]) -> None:
    """Adds (new, a replacement, a removed id again) and removals (an old row, a row added meanwhile)."""
    gallery.put([("new0", row("new0", 100), None), ("new1", row("new1", 101), None)])
    gallery.put([("img8", row("img8", 108), None)])
    gallery.put([("img3", row("img3", 103), b"photo")])
    assert gallery.remove("img9") and gallery.remove("new1")
    seeds.update({"new0": 100, "img8": 108, "img3": 103})
    del seeds["img9"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_searches_and_writes_go_on_while_the_rebuild_runs(tmp_path, gate, kind):
    gallery = open_gallery(tmp_path, kind)
    seeds = start_held_compaction(gallery, gate)
    query = row("q", 7).arrays["image_vectors"][0]
    assert in_time(searched, gallery, query, 5) == exact_top(expected_rows(seeds), query, 5)  # removed rows filtered
    in_time(writes_during, gallery, seeds)
    live = expected_rows(seeds)
    assert in_time(searched, gallery, query, 40) == exact_top(live, query, 40)
    assert in_time(contents, gallery).keys() == live.keys()
    assert gallery.compaction is not None and gallery.count == 36  # still the old slots: the rebuild is held

    gate.release.set()
    assert gallery.wait_compaction(WAIT)
    # the compaction of img8..img31 (24 slots), then the writes made meanwhile, in order
    assert gallery.view().ids == ["", ""] + [f"img{i}" for i in range(10, 32)] + ["new0", "", "img8", "img3"]
    assert gallery.count == 28 and gallery.index.dead == 3 and len(gallery.index) == 28
    after = contents(gallery)
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)
    assert searched(gallery, query, 40) == exact_top(live, query, 40)
    assert gallery.blob_path("img3").read_bytes() == b"photo"
    reopened = open_gallery(tmp_path, kind)  # no close: the log alone
    assert contents(reopened).keys() == live.keys()
    assert searched(reopened, query, 40) == exact_top(live, query, 40)


def test_a_crash_before_the_swap_loses_nothing_acknowledged(tmp_path, gate, monkeypatch):
    gallery = open_gallery(tmp_path, "hnsw")
    seeds = start_held_compaction(gallery, gate)
    in_time(writes_during, gallery, seeds)
    in_time(gallery.checkpoint)  # a checkpoint during the rebuild: the old slots (dead ones as ""), log emptied
    snapshot_ids = ImageCache.load(tmp_path / "snapshot").ids
    assert len(snapshot_ids) == gallery.count and snapshot_ids == [i if gallery.slots.get(i) == s else "" for s, i in enumerate(gallery.slot_ids)]
    assert [i for i in snapshot_ids if i] == [f"img{i}" for i in range(10, 32)] + ["new0", "img8", "img3"]
    gallery.put([("late", row("late", 200), None)])
    assert gallery.remove("img10")
    seeds["late"] = 200
    del seeds["img10"]
    live = expected_rows(seeds)

    # killed here: the rebuild never swapped in; only the snapshot and the fsynced log remain
    monkeypatch.setattr(gallery_module, "VectorIndex", VectorIndex)  # the restarted process's index builds freely
    crashed = open_gallery(tmp_path, "hnsw")
    after = contents(crashed)
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)
    query = row("q", 11).arrays["image_vectors"][0]
    assert searched(crashed, query, 30) == exact_top(live, query, 30)

    # its dead slots (a quarter and more) are compacted in a thread, as at run time, and checkpointed renumbered
    assert crashed.wait_compaction(WAIT) and crashed.wait_checkpoint(WAIT) and not crashed.index.dead
    assert ImageCache.load(tmp_path / "snapshot").ids == crashed.slot_ids[:crashed.count]
    crashed.close()
    reopened = open_gallery(tmp_path, "hnsw")
    assert contents(reopened).keys() == live.keys() and not reopened.index.dead
    reopened.close()

    gate.release.set()  # had the first process lived: its rebuild swaps in (then checkpoints the renumbered slots)
    assert gallery.wait_compaction(WAIT) and gallery.wait_checkpoint(WAIT)
    assert contents(gallery).keys() == live.keys()


def test_a_closed_gallery_drops_its_rebuild(tmp_path, gate):
    gallery = open_gallery(tmp_path, "ivf")
    seeds = start_held_compaction(gallery, gate)
    job = gallery.compaction
    in_time(gallery.close)  # checkpoints without waiting for the rebuild
    gate.release.set()
    job.thread.join(WAIT)
    assert not job.thread.is_alive() and gallery.compaction is None and gallery.count == 32  # not swapped in
    assert contents(open_gallery(tmp_path, "ivf")).keys() == seeds.keys()


CHILD = """
import sys, threading
from tests.engine.serve import test_serve_compaction as t
from engine.serve import gallery as gallery_module
t.GatedIndex.started, t.GatedIndex.release = threading.Event(), threading.Event()  # never released
gallery_module.VectorIndex, gallery_module.COMPACT_MIN, gallery_module.COMPACT_FRACTION = t.GatedIndex, 8, 0.25
gallery = t.open_gallery(sys.argv[1], "hnsw")
seeds = t.start_held_compaction(gallery, t.GatedIndex)
t.writes_during(gallery, seeds)
print("acknowledged", flush=True)
threading.Event().wait()
"""


def test_kill_9_during_the_rebuild(tmp_path):
    """A real kill -9 of a process whose compaction is in its rebuild, after writes it acknowledged meanwhile."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = child.stdout.readline()
        assert line.strip() == "acknowledged", child.stderr.read() if child.poll() is not None else line
    finally:
        child.kill()  # SIGKILL
        child.wait(WAIT)
    live = expected_rows({**{f"img{i}": i for i in range(10, 32)}, "new0": 100, "img8": 108, "img3": 103})
    after = contents(open_gallery(tmp_path, "hnsw"))
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)


def synthetic_rows(count: int, first: int, seed: int) -> ImageCache:
    """`count` rows named v<first>, v<first+1>, ... (unit vectors), as an import brings them."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)  # [N, DIM]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ImageCache([f"v{first + i}" for i in range(count)],
                      {"regions_attn": rng.normal(size=(count, 4, 3)).astype(np.float32), "image_vectors": vectors},
                      FINGERPRINT, "fp32")


def test_ivf_training_runs_beside_searches_and_writes(tmp_path, gate):
    gallery = Gallery.open(tmp_path, FINGERPRINT, "fp32", index_kind="ivf", index_options=IVF_TRAINING)
    first = synthetic_rows(2500, 0, seed=1)
    in_time(gallery.put_rows, first)  # reaches train_at: the training runs in a thread, held
    assert gate.started.wait(WAIT), "no IVF training started at train_at"
    job = gallery.compaction
    assert job is not None and job.live is None and not gallery.index.trained  # the flat index answers meanwhile
    live = dict(zip(first.ids, first.arrays["image_vectors"]))
    queries = synthetic_rows(8, 10_000, seed=2).arrays["image_vectors"]

    def all_exact():
        return all(in_time(searched, gallery, query, 10) == exact_top(live, query, 10) for query in queries)

    assert all_exact()
    more = synthetic_rows(200, 2500, seed=3)
    in_time(gallery.put_rows, more)
    in_time(gallery.put, [("v5", row("v5", 55), None), ("new", row("new", 56), None)])
    assert in_time(gallery.remove, "v7") and in_time(gallery.remove, "v2600")
    live.update(zip(more.ids, more.arrays["image_vectors"]))
    live.update(expected_rows({"v5": 55, "new": 56}))
    del live["v7"], live["v2600"]
    assert all_exact() and gallery.compaction is job and not gallery.index.trained

    gate.release.set()
    assert gallery.wait_compaction(WAIT)
    index = gallery.index
    assert index.trained and (index.trained_at, index.nlist) == (2500, 16) and len(index) == gallery.count == 2702
    assert index.dead == 3 and gallery.compaction is None  # same slots: v5's old one, v7, v2600
    assert all_exact()  # every list scanned: exact
    ids = sorted(live)
    view, slots, _ = gallery.search(np.stack([live[i] for i in ids]), 1)
    assert [view.ids[s[0]] for s in slots] == ids  # every vector found (its own nearest)
    reopened = Gallery.open(tmp_path, FINGERPRINT, "fp32", index_kind="ivf", index_options=IVF_TRAINING)
    assert reopened.index.trained and contents(reopened).keys() == live.keys()
    gallery = reopened
    assert all_exact()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_writes_made_during_the_unlocked_catch_up_are_caught_up_under_the_lock(tmp_path, gate, monkeypatch, kind):
    """The journal (a compaction) or the slots written since (an IVF retraining) are brought in twice: first
    without the lock, then under it just before the swap; a write landing between the two is in the result."""
    calls = []
    catch_up = Gallery._catch_up

    def with_a_write_between(self, job, target, done):
        calls.append(self.lock._is_owned())
        reached = catch_up(self, job, target, done)
        if len(calls) == 1:  # between the two calls: a write from another client
            in_time(self.put, [("late", row("late", 77), None)])
        return reached

    monkeypatch.setattr(Gallery, "_catch_up", with_a_write_between)
    gallery = open_gallery(tmp_path, kind)
    if kind == "ivf":  # a retraining: an import reaching train_at, held; then writes meanwhile
        gallery = Gallery.open(tmp_path, FINGERPRINT, "fp32", index_kind="ivf", index_options=IVF_TRAINING)
        first = synthetic_rows(2500, 0, seed=1)
        in_time(gallery.put_rows, first)
        assert gate.started.wait(WAIT) and gallery.compaction.live is None
        live = dict(zip(first.ids, first.arrays["image_vectors"]))
        in_time(gallery.put, [("v5", row("v5", 55), None)])
        assert in_time(gallery.remove, "v7")
        live.update(expected_rows({"v5": 55}))
        del live["v7"]
    else:
        seeds = start_held_compaction(gallery, gate)
        calls.clear()  # an IVF's first training is not this test's
        in_time(writes_during, gallery, seeds)
        live = expected_rows(seeds)
    gate.release.set()
    assert gallery.wait_compaction(WAIT)
    assert calls == [False, True]  # the first catch-up ran without the lock, the second under it
    live.update(expected_rows({"late": 77}))
    after = contents(gallery)
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)
    assert len(gallery.index) == gallery.count and gallery.index.dead == gallery.count - len(live)
    ids = sorted(live)
    view, slots, _ = gallery.search(np.stack([live[i] for i in ids]), 1)
    assert [view.ids[s[0]] for s in slots] == ids  # every vector found by the swapped-in index


def test_a_failing_rebuild_is_retried_after_a_backoff_not_on_every_write(tmp_path, monkeypatch):
    attempts = []

    def broken(self, vectors):
        attempts.append(len(vectors))
        raise MemoryError("no memory for the k-means")

    monkeypatch.setattr(Gallery, "_reindexed", broken)
    gallery = Gallery.open(tmp_path, FINGERPRINT, "fp32", index_kind="ivf", index_options=IVF_TRAINING)
    first = synthetic_rows(2500, 0, seed=1)
    gallery.put_rows(first)  # due at train_at: the retraining fails
    assert gallery.wait_compaction(WAIT) and attempts == [2500]
    assert gallery.rebuild_failures == 1 and gallery.retry_at - time.monotonic() > gallery_module.RETRY_FIRST_S - 5
    for i in range(5):  # writes within the backoff start nothing
        gallery.put([(f"w{i}", row(f"w{i}", 200 + i), None)])
        assert gallery.compaction is None
    assert attempts == [2500] and not gallery.index.trained and gallery.index.training_due
    live = {**dict(zip(first.ids, first.arrays["image_vectors"])), **expected_rows({f"w{i}": 200 + i for i in range(5)})}
    query = row("q", 3).arrays["image_vectors"][0]
    assert searched(gallery, query, 10) == exact_top(live, query, 10)  # the untrained index still answers, exactly

    gallery.retry_at = 0.0  # the backoff has passed: the next write retries; a second failure doubles the wait
    gallery.put([("w5", row("w5", 205), None)])
    assert gallery.wait_compaction(WAIT) and attempts == [2500, 2506]
    assert gallery.rebuild_failures == 2 and gallery.retry_at - time.monotonic() > 2 * gallery_module.RETRY_FIRST_S - 5

    monkeypatch.undo()  # fixed (memory freed): after the backoff the retraining succeeds and the count resets
    gallery.retry_at = 0.0
    gallery.put([("w6", row("w6", 206), None)])
    assert gallery.wait_compaction(WAIT)
    assert gallery.index.trained and gallery.rebuild_failures == 0 and gallery.retry_at == 0.0
    assert len(gallery.index) == gallery.count == 2507
