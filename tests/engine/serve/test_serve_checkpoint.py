"""Checkpoints beside the service, on synthetic rows (no model): while a checkpoint's snapshot save is held
(ImageCache.save waits on an Event), searches, writes and an import's rows go on, and the import returns only once
its snapshot is on disk; a kill at each step of a checkpoint (after the seal, after the snapshot's swap, after
folder.json, between segment deletions) reopens with every acknowledged write and no removed image back."""

from __future__ import annotations

import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the first stage needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.cache import ImageCache  # noqa: E402
from engine.serve.records import log_segments, read_log  # noqa: E402
from tests.engine.serve.test_serve_compaction import (WAIT, contents, exact_top, expected_rows, in_time,  # noqa: E402
                                                      open_gallery, searched)
from tests.engine.serve.test_serve_gallery import FINGERPRINT, row  # noqa: E402

SAVE = ImageCache.save


def batch(seeds: dict[str, int]) -> ImageCache:
    rows = [row(i, seed) for i, seed in seeds.items()]
    return ImageCache([r.ids[0] for r in rows], {k: np.concatenate([r.arrays[k] for r in rows]) for k in rows[0].arrays},
                      FINGERPRINT, "fp32")


@pytest.fixture()
def held_save(monkeypatch):
    """ImageCache.save sets `started` and waits for `release` (the snapshot save of a checkpoint, held)."""
    gate = SimpleNamespace(started=threading.Event(), release=threading.Event())

    def save(cache, directory):
        gate.started.set()
        if not gate.release.wait(WAIT):
            raise TimeoutError("the test never released the save")
        return SAVE(cache, directory)

    monkeypatch.setattr(ImageCache, "save", save)
    yield gate
    gate.release.set()


def test_searches_and_writes_go_on_while_a_checkpoint_saves(tmp_path, held_save):
    gallery = open_gallery(tmp_path, snapshot_every=4)
    seeds = {f"img{i}": i for i in range(4)}
    for image_id, seed in seeds.items():  # the 4th write starts a checkpoint: its save is held
        in_time(gallery.put, [(image_id, row(image_id, seed), None)])
    assert held_save.started.wait(WAIT) and gallery.checkpoint_thread is not None
    assert log_segments(tmp_path) == [tmp_path / "log-000001.bin"] and gallery.log_records == 0  # sealed at the 4th

    query = row("q", 5).arrays["image_vectors"][0]
    assert in_time(searched, gallery, query, 3) == exact_top(expected_rows(seeds), query, 3)
    in_time(gallery.put, [("late", row("late", 50), b"photo")])
    assert in_time(gallery.remove, "img1")
    seeds["late"] = 50
    del seeds["img1"]
    assert in_time(searched, gallery, query, 10) == exact_top(expected_rows(seeds), query, 10)
    assert gallery.checkpoint_thread.is_alive() and not (tmp_path / "snapshot").exists()
    assert [h["id"] for h, _ in read_log(gallery.log_path)] == ["late", "img1"]  # the writes after the seal

    held_save.release.set()
    assert gallery.wait_checkpoint(WAIT)
    assert ImageCache.load(tmp_path / "snapshot").ids == [f"img{i}" for i in range(4)]  # the slots at the seal
    assert log_segments(tmp_path) == [] and gallery.log_records == 2
    after = contents(open_gallery(tmp_path))  # no close: the snapshot, then log.bin
    live = expected_rows(seeds)
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)


def test_an_import_saves_without_the_lock_and_returns_durable(tmp_path, held_save):
    gallery = open_gallery(tmp_path)
    gallery.put([("a", row("a", 1), None)])
    imported = {f"{i}.jpg": 10 + i for i in range(6)}
    done = threading.Event()
    thread = threading.Thread(target=lambda: (gallery.put_rows(batch(imported)), done.set()), daemon=True)
    thread.start()
    assert held_save.started.wait(WAIT)
    seeds = {"a": 1, **imported}
    query = row("q", 3).arrays["image_vectors"][0]
    assert in_time(searched, gallery, query, 4) == exact_top(expected_rows(seeds), query, 4)  # its rows are served
    in_time(gallery.put, [("b", row("b", 2), None)])
    assert in_time(gallery.remove, "0.jpg")
    assert not done.is_set()  # not durable yet: put_rows waits for its snapshot
    held_save.release.set()
    thread.join(WAIT)
    assert done.is_set()
    seeds["b"] = 2
    del seeds["0.jpg"]
    gallery.put([("c", row("c", 3), None)])
    seeds["c"] = 3
    after = contents(open_gallery(tmp_path))
    live = expected_rows(seeds)
    assert after.keys() == live.keys() and all(np.array_equal(after[i], live[i]) for i in live)


def test_a_kill_at_each_step_of_a_checkpoint_keeps_every_acknowledged_write(tmp_path, monkeypatch):
    """The directory is copied at each step of a checkpoint (what a kill -9 there leaves) and each copy reopened. The
    folder's first indexing is pending, so removals must also stay out of a later indexing (folder.json or the log)."""
    root = tmp_path / "index"
    gallery = open_gallery(root)
    gallery.begin_folder(tmp_path / "photos")
    gallery.put([(f"a{i}", row(f"a{i}", i), None) for i in range(6)])
    assert gallery.remove("a1")
    gallery.checkpoint()  # snapshot a0, a2..a5; a1 in folder.json
    gallery.put([("b0", row("b0", 20), None), ("b1", row("b1", 21), None)])
    assert gallery.remove("a3")

    def failing_save(cache, directory):
        raise OSError("disk full")

    monkeypatch.setattr(ImageCache, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):  # a failed checkpoint: its segment stays for the next one
        gallery.checkpoint()
    assert log_segments(root) == [root / "log-000001.bin"]
    gallery.put([("a2", row("a2", 32), None), ("c0", row("c0", 40), None)])
    assert gallery.remove("b0")
    seeds = {"a0": 0, "a2": 32, "a4": 4, "a5": 5, "b1": 21, "c0": 40}
    removed = ["a1", "a3", "b0"]

    crashes = {}

    def crash(step):  # the files as a kill -9 at this step would leave them
        crashes[step] = shutil.copytree(root, tmp_path / f"crash-{len(crashes)}-{step}")

    def save(cache, directory):
        crash("sealed")
        SAVE(cache, directory)
        crash("saved")

    write_folder = type(gallery)._write_folder

    def folder_written(self, state):
        write_folder(self, state)
        crash("folder written")

    monkeypatch.setattr(ImageCache, "save", save)
    monkeypatch.setattr(type(gallery), "_write_folder", folder_written)
    gallery.checkpoint()
    monkeypatch.undo()
    assert list(crashes) == ["sealed", "saved", "folder written"]
    assert [p.name for p in log_segments(crashes["sealed"])] == ["log-000001.bin", "log-000002.bin"]
    half = shutil.copytree(crashes["folder written"], tmp_path / "crash-3-first segment deleted")
    (half / "log-000001.bin").unlink()  # killed between the two deletions
    crashes["first segment deleted"] = half
    crashes["done"] = root

    live = expected_rows(seeds)
    for step, directory in crashes.items():
        reopened = open_gallery(directory)
        after = contents(reopened)
        assert after.keys() == live.keys(), step
        assert all(np.array_equal(after[i], live[i]) for i in live), step
        assert not any(reopened.wanted_from_folder(i) for i in removed), step  # a later indexing leaves them out
        reopened.checkpoint()  # the leftover segments go into the next snapshot
        assert log_segments(directory) == [], step
        again = open_gallery(directory)
        assert contents(again).keys() == live.keys() and not any(again.wanted_from_folder(i) for i in removed), step
