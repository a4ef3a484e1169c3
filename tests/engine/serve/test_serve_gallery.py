"""The persistent gallery and its FAISS first stage, on synthetic rows (no model): durable writes,
reopen, a torn log tail, replay after a crash between snapshot and log reset, compaction, the
resumable first indexing of a folder, and exact vs HNSW search."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the first stage needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.cache import ImageCache  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.serve import gallery as gallery_module  # noqa: E402
from engine.serve.gallery import Gallery, read_log  # noqa: E402
from engine.serve.index import VectorIndex, ivf_lists  # noqa: E402

FINGERPRINT = "f" * 64
DIM = 8


def row(image_id: str, seed: int) -> ImageCache:
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=(1, DIM)).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return ImageCache([image_id], {"regions_attn": rng.normal(size=(1, 4, 3)).astype(np.float32), "image_vectors": vector},
                      FINGERPRINT, "fp32")


def fake_encode(paths, encoded: list, fail_after=None, during=None) -> ImageCache:
    """The first indexing's encoder, faked: synthetic rows named after the files (noted in `encoded`); dies like a
    killed process once `fail_after` images were encoded; calls during(names) before it returns."""
    names = [p.name for p in paths]
    if fail_after is not None and len(encoded) >= fail_after:
        raise KeyboardInterrupt  # the process dies mid-indexing
    if during is not None:
        during(names)
    encoded.extend(names)
    return ImageCache(names, {k: np.concatenate([row(n, i).arrays[k] for i, n in enumerate(names)])
                              for k in ("regions_attn", "image_vectors")}, FINGERPRINT, "fp32")


def open_gallery(root, **options) -> Gallery:
    return Gallery.open(root, FINGERPRINT, "fp32", **options)


def contents(gallery: Gallery) -> dict[str, np.ndarray]:
    view = gallery.view()
    return {i: np.asarray(view.arrays["image_vectors"][s]) for s, i in enumerate(view.ids) if i}


def test_writes_survive_reopen_without_close(tmp_path):
    g = open_gallery(tmp_path)
    g.put([(f"img{i}", row(f"img{i}", i), b"photo%d" % i) for i in range(5)])
    g.put([("img2", row("img2", 99), None)])  # replace
    assert g.remove("img3") and not g.remove("img3")
    before = contents(g)
    # no close(): as after kill -9, only the fsynced log and blobs remain
    again = open_gallery(tmp_path)
    assert set(again.ids()) == {"img0", "img1", "img2", "img4"}
    after = contents(again)
    assert all(np.array_equal(after[i], before[i]) for i in before)
    assert np.array_equal(after["img2"], row("img2", 99).arrays["image_vectors"][0])
    assert again.blob_path("img0").read_bytes() == b"photo0" and not again.blob_path("img3").exists()


def test_a_torn_last_record_is_cut_off(tmp_path):
    g = open_gallery(tmp_path)
    g.put([("a", row("a", 1), None), ("b", row("b", 2), None)])
    g.put([("c", row("c", 3), None)])
    size = g.log_path.stat().st_size
    with open(g.log_path, "ab") as handle:  # a third write killed half-way (never acknowledged)
        handle.write(gallery_module.encode_record({"op": "put", "id": "d"}, {"image_vectors": np.ones(DIM, np.float32)})[:-5])
    again = open_gallery(tmp_path)
    assert set(again.ids()) == {"a", "b", "c"}
    assert again.log_path.stat().st_size == size  # cut back to the last whole record
    again.put([("e", row("e", 5), None)])
    assert set(open_gallery(tmp_path).ids()) == {"a", "b", "c", "e"}


def test_checkpoint_and_crash_between_snapshot_and_log_reset(tmp_path):
    g = open_gallery(tmp_path)
    g.put([(f"img{i}", row(f"img{i}", i), None) for i in range(6)])
    g.remove("img1")
    g.put([("img4", row("img4", 44), None)])
    log_before = g.log_path.read_bytes()
    g.checkpoint()
    assert g.log_path.stat().st_size == 0 and len(read_log(g.log_path)) == 0
    g.log_path.write_bytes(log_before)  # as if killed after the snapshot was written, before the log was emptied
    again = open_gallery(tmp_path)
    assert set(again.ids()) == {"img0", "img2", "img3", "img4", "img5"}
    assert np.array_equal(contents(again)["img4"], row("img4", 44).arrays["image_vectors"][0])


def test_close_checkpoints_and_snapshot_every(tmp_path):
    g = open_gallery(tmp_path, snapshot_every=3)
    for i in range(7):
        g.put([(f"img{i}", row(f"img{i}", i), None)])
        assert g.wait_checkpoint(30)  # a write's checkpoint saves in a thread
    assert g.log_records == 1  # checkpointed after the 3rd and the 6th write
    g.close()
    assert g.log_path.stat().st_size == 0
    assert ImageCache.load(tmp_path / "snapshot").ids == [f"img{i}" for i in range(7)]
    assert len(open_gallery(tmp_path)) == 7


def test_put_rows_is_one_durable_snapshot(tmp_path):
    g = open_gallery(tmp_path)
    g.put([("a.jpg", row("a.jpg", 0), None)])
    many = [row(f"{i}.jpg", i + 10) for i in range(5)] + [row("a.jpg", 99)]  # a.jpg replaced
    batch = ImageCache([r.ids[0] for r in many], {k: np.concatenate([r.arrays[k] for r in many]) for k in many[0].arrays},
                       FINGERPRINT, "fp32")
    g.put_rows(batch)
    assert g.log_records == 0 and (tmp_path / "log.bin").stat().st_size == 0  # in the snapshot, not the log
    reopened = open_gallery(tmp_path)  # no close: the snapshot alone holds them
    assert contents(reopened).keys() == {"a.jpg", *(f"{i}.jpg" for i in range(5))}
    assert np.array_equal(contents(reopened)["a.jpg"], row("a.jpg", 99).arrays["image_vectors"][0])
    twice = ImageCache(["x.jpg", "x.jpg"], {k: np.concatenate([v, v]) for k, v in row("x.jpg", 1).arrays.items()}, FINGERPRINT, "fp32")
    with pytest.raises(InputError, match="listed twice"):
        reopened.put_rows(twice)
    other = ImageCache(["y.jpg"], row("y.jpg", 1).arrays, "e" * 64, "fp32")
    with pytest.raises(InputError, match="expected ffffffffffff"):
        reopened.put_rows(other)


def test_compaction_keeps_search_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_module, "COMPACT_FRACTION", 0.2)
    monkeypatch.setattr(gallery_module, "COMPACT_MIN", 10)
    g = open_gallery(tmp_path)
    g.put([(f"img{i}", row(f"img{i}", i), None) for i in range(100)])
    for i in range(0, 100, 2):
        g.remove(f"img{i}")
    assert g.wait_compaction(timeout=30)  # compaction runs in a thread
    assert g.count < 100  # compacted: dead slots dropped
    query = row("q", 1234).arrays["image_vectors"]
    view, slots, sims = g.search(query, 10)
    live = {i: v for i, v in contents(g).items()}
    want = sorted(live, key=lambda i: -float(live[i] @ query[0]))[:10]
    assert [view.ids[s] for s in slots[0]] == want
    assert np.allclose(sims[0], [float(live[i] @ query[0]) for i in want], atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_removed_images_never_come_back_from_the_index(tmp_path, kind):
    options = {"train_at": 4, "nlist": 2, "nprobe": 2} if kind == "ivf" else {}  # IVF trained on the first 4+
    g = open_gallery(tmp_path, index_kind=kind, index_options=options)
    g.put([(f"img{i}", row(f"img{i}", i), None) for i in range(10)])
    for i in range(9):
        g.remove(f"img{i}")
    view, slots, _ = g.search(row("q", 7).arrays["image_vectors"], 5)
    assert [view.ids[s] for s in slots[0]] == ["img9"]


def test_ids_are_checked(tmp_path):
    g = open_gallery(tmp_path)
    for bad in ("", "a/b", "..", "x\ny", "z" * 256):
        with pytest.raises(InputError, match="image id"):
            g.put([(bad, row("x", 0), None)])


def test_folder_indexing_resumes_after_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_module, "FOLDER_CHUNK", 2)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(7):
        (folder / f"p{i}.jpg").write_bytes(b"x")
    (folder / "bad.jpg").write_bytes(b"x")
    (folder / "readme.txt").write_text("skip me")
    encoded = []

    def encode(paths, fail_after=None):
        if "bad.jpg" in [p.name for p in paths]:
            raise InputError("bad.jpg: cannot decode")
        return fake_encode(paths, encoded, fail_after)

    g = open_gallery(tmp_path / "index")
    with pytest.raises(KeyboardInterrupt):
        g.index_folder(folder, lambda p: encode(p, fail_after=4), {".jpg"}, progress=False)
    assert sorted(open_gallery(tmp_path / "index").ids()) == sorted(encoded) == [f"p{i}.jpg" for i in range(5)]
    first = list(encoded)
    again = open_gallery(tmp_path / "index")
    state = again.index_folder(folder, encode, {".jpg"}, progress=False)
    assert state["done"] and set(state["skipped"]) == {"bad.jpg"}
    assert sorted(again.ids()) == [f"p{i}.jpg" for i in range(7)]
    assert not set(encoded[len(first):]) & set(first)  # nothing encoded twice
    again.remove("p0.jpg")
    assert again.index_folder(folder, encode, {".jpg"}, progress=False)["done"]
    assert "p0.jpg" not in open_gallery(tmp_path / "index").ids()  # once done, the folder is not read again


def test_flat_index_is_exact_and_hnsw_recalls():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    flat = VectorIndex("flat", 16)
    flat.add(vectors)
    labels, sims = flat.search(queries, 10)
    assert np.array_equal(labels, exact)
    assert np.allclose(sims, np.take_along_axis(queries @ vectors.T, exact, 1), atol=1e-4)
    flat.remove(exact[:, 0])
    labels, _ = flat.search(queries, 10)
    assert not np.isin(exact[:, 0], labels).any()
    hnsw = VectorIndex("hnsw", 16, ef_search=64)
    hnsw.add(vectors)
    labels, _ = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, exact)])
    assert recall >= 0.9, recall
    with pytest.raises(InputError, match="index kind 'annoy'"):
        VectorIndex("annoy", 16)


def test_ivf_is_exact_until_trained_then_recalls_and_respects_removals():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 16))
    vectors = (centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 30)] + 0.3 * rng.normal(size=(30, 16))).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert (ivf_lists(3000), ivf_lists(1_000_000), ivf_lists(10)) == (64, 1024, 64)  # ~sqrt(n), a power of 2, >= 64
    ivf = VectorIndex("ivf", 16, train_at=1000, nlist=32, nprobe=8)
    ivf.add(vectors[:500])
    assert not ivf.trained  # below train_at: a flat index, exact
    small = np.argsort(-(queries @ vectors[:500].T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(ivf.search(queries, 10)[0], small)
    ivf.add(vectors[500:])
    assert ivf.trained and len(ivf) == 3000
    labels, _ = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, exact)])
    ivf.nprobe = ivf.nlist  # every list scanned: exact again
    assert np.array_equal(ivf.search(queries, 10)[0], exact)
    assert recall >= 0.8, recall
    ivf.remove(exact[:, 0])
    assert not np.isin(exact[:, 0], ivf.search(queries, 10)[0]).any()
    more = ivf.add(vectors[:5])  # added after training: into the lists, labels go on from the end
    assert list(more) == [3000, 3001, 3002, 3003, 3004] and len(ivf) == 3005
    grown = VectorIndex("ivf", 16, train_at=500, nprobe=64)  # lists by size: trained at 500, again at 4 x 500
    grown.add(vectors[:600])
    assert (grown.trained_at, grown.nlist) == (600, 64)
    grown.add(vectors[600:2000])
    assert (grown.trained_at, len(grown)) == (600, 2000)
    grown.add(vectors[2000:2400])
    assert (grown.trained_at, grown.nlist, len(grown)) == (2400, 64, 2400)
    grown.remove([0, 1])
    grown.nprobe = grown.nlist
    all_exact = np.argsort(-(queries @ vectors[2:2400].T), axis=1, kind="stable")[:, :10] + 2
    assert np.array_equal(grown.search(queries, 10)[0], all_exact)  # retrained: positions and removals kept


def test_a_restart_during_the_first_indexing_keeps_api_removals_and_uploads(tmp_path, monkeypatch):
    """Folder images removed through the API before the first indexing is done stay removed after a restart, whether
    the removal is still in the log or a checkpoint moved it to folder.json; an upload of a folder name wins."""
    monkeypatch.setattr(gallery_module, "FOLDER_CHUNK", 2)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"p{i}.jpg").write_bytes(b"x")
    encoded = []

    def encode(paths, fail_after=None, during=None):
        return fake_encode(paths, encoded, fail_after, during)

    g = open_gallery(tmp_path / "index")
    with pytest.raises(KeyboardInterrupt):
        g.index_folder(folder, lambda p: encode(p, fail_after=4), {".jpg"}, progress=False)
    assert sorted(g.ids()) == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert g.remove("p1.jpg")
    g.checkpoint()  # p1's removal: now in folder.json, no longer in the log
    assert g.folder_state()["removed"] == ["p1.jpg"] and g.log_path.stat().st_size == 0
    assert g.remove("p2.jpg")  # p2's: in the log only
    g.put([("p6.jpg", row("p6.jpg", 66), b"upload")])  # a folder name not indexed yet, uploaded

    # killed, restarted: the indexing resumes
    again = open_gallery(tmp_path / "index")
    assert not again.wanted_from_folder("p1.jpg") and not again.wanted_from_folder("p2.jpg")

    def upload_p7(names):  # an upload while p7's file is being encoded: the upload wins
        if "p7.jpg" in names:
            again.put([("p7.jpg", row("p7.jpg", 77), None)])

    state = again.index_folder(folder, lambda p: encode(p, during=upload_p7), {".jpg"}, progress=False)
    assert state["done"] and "removed" not in state and again.tombstones is None
    assert sorted(again.ids()) == ["p0.jpg", "p3.jpg", "p4.jpg", "p5.jpg", "p6.jpg", "p7.jpg"]
    assert not {"p1.jpg", "p2.jpg", "p6.jpg"} & set(encoded[4:])  # removed and uploaded: never encoded again
    kept = contents(open_gallery(tmp_path / "index"))
    assert kept.keys() == set(again.ids())
    assert np.array_equal(kept["p6.jpg"], row("p6.jpg", 66).arrays["image_vectors"][0])
    assert np.array_equal(kept["p7.jpg"], row("p7.jpg", 77).arrays["image_vectors"][0])


def test_an_import_leaves_out_removed_and_uploaded_images(tmp_path):
    g = open_gallery(tmp_path)
    g.begin_folder(tmp_path / "photos")  # the folder's first indexing is pending
    g.put([("a.jpg", row("a.jpg", 1), None), ("b.jpg", row("b.jpg", 2), None)])
    assert g.remove("a.jpg")
    rows = [row(n, i + 10) for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"])]
    batch = ImageCache([r.ids[0] for r in rows], {k: np.concatenate([r.arrays[k] for r in rows]) for k in rows[0].arrays},
                       FINGERPRINT, "fp32")
    g.put_rows(batch, new_only=True)
    after = contents(open_gallery(tmp_path))
    assert after.keys() == {"b.jpg", "c.jpg"}
    assert np.array_equal(after["b.jpg"], row("b.jpg", 2).arrays["image_vectors"][0])  # the upload, not the import's row
    assert open_gallery(tmp_path).folder_state()["removed"] == ["a.jpg"]  # put_rows checkpointed: kept in folder.json


def spread_rows(count: int, seed: int = 0) -> ImageCache:
    """`count` synthetic rows whose vectors form clusters (an IVF index trains on them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, DIM))
    vectors = (centres[rng.integers(0, 8, count)] + 0.3 * rng.normal(size=(count, DIM))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ImageCache([f"img{i}" for i in range(count)], {"regions_attn": rng.normal(size=(count, 4, 3)).astype(np.float32),
                                                          "image_vectors": vectors}, FINGERPRINT, "fp32")


@pytest.mark.parametrize("kind, options", [("hnsw", {"hnsw_m": 8}), ("ivf", {"train_at": 100, "nlist": 8, "nprobe": 2})])
def test_an_approximate_index_saved_at_close_is_loaded_not_rebuilt(tmp_path, monkeypatch, kind, options, caplog):
    """An HNSW / trained IVF index is saved beside the snapshot (after the import or its training, and at close); the
    next open loads it (no vector added to a fresh index) and answers exactly as before; rows past it (the log, or a
    later snapshot's) are added on top; a removal keeps its slot (dead) in the snapshot, so the saved index still
    fits; another build option, a damaged file or other vectors make the next open rebuild, never fail."""
    import logging

    caplog.set_level(logging.INFO, logger="engine.serve")
    rows = spread_rows(600)
    queries = rows.arrays["image_vectors"][:20] + 0.05
    g = open_gallery(tmp_path, index_kind=kind, index_options=options)
    g.put_rows(rows)
    assert g.wait_compaction(30)  # IVF: writes never train; the retraining they start runs in a thread
    # saved before any close: by the import (HNSW) or by the retraining (IVF), so a crash now would not rebuild it
    assert json.loads((tmp_path / gallery_module.INDEX_JSON).read_text())["count"] == 600
    before = g.index.search(queries, 10)
    g.close()
    assert (tmp_path / gallery_module.INDEX_FILE).is_file() and (tmp_path / gallery_module.INDEX_JSON).is_file()

    added = []
    real_add = VectorIndex.add
    monkeypatch.setattr(VectorIndex, "add", lambda self, vectors, train=True: added.append(len(vectors)) or real_add(self, vectors, train))
    again = open_gallery(tmp_path, index_kind=kind, index_options=options)
    assert added == [] and len(again.index) == 600
    after = again.index.search(queries, 10)
    assert np.array_equal(before[0], after[0]) and np.allclose(before[1], after[1])
    if kind == "ivf":
        assert again.index.trained and again.index.nlist == 8
    again.put([("new", row("new", 1234), None)])  # in the log, not in the saved index
    assert again.search(row("new", 1234).arrays["image_vectors"], 1)[1][0].size == 1
    # no close (kill -9): the snapshot and the saved index still match; the log's write is added on top
    added.clear()
    third = open_gallery(tmp_path, index_kind=kind, index_options=options)
    assert added == [1] and len(third.index) == 601 and "new" in third
    view, slots, _ = third.search(row("new", 1234).arrays["image_vectors"], 1)
    assert view.ids[slots[0][0]] == "new"
    third.checkpoint()  # the snapshot holds 601 rows now; the saved index still covers its first 600
    added.clear()
    fourth = open_gallery(tmp_path, index_kind=kind, index_options=options)  # kill -9 again: the rest is added
    assert added == [1] and len(fourth.index) == 601 and "new" in fourth
    assert np.array_equal(fourth.index.search(queries, 10)[0], third.index.search(queries, 10)[0])
    fourth.close()  # the snapshot holds its 601 rows: the index is saved again for them
    meta = json.loads((tmp_path / gallery_module.INDEX_JSON).read_text())
    assert meta["count"] == 601

    # another build option: rebuilt
    added.clear()
    other = dict(options, hnsw_m=16) if kind == "hnsw" else dict(options, nlist=16)
    rebuilt = open_gallery(tmp_path, index_kind=kind, index_options=other)
    assert added == [601] and "differ" in caplog.text
    rebuilt.close()  # saved for the new options
    # a damaged file: rebuilt (its sha256 is checked before FAISS reads it)
    saved = tmp_path / gallery_module.INDEX_FILE
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    added.clear()
    damaged = open_gallery(tmp_path, index_kind=kind, index_options=other)
    assert added == [601] and "damaged" in caplog.text
    assert damaged.remove("img0")
    damaged.close()  # a removal: its slot stays in the snapshot (id ""), so the index saved now still fits it
    assert json.loads((tmp_path / gallery_module.INDEX_JSON).read_text())["count"] == 601
    assert ImageCache.load(tmp_path / "snapshot").ids[0] == ""
    added.clear()
    last = open_gallery(tmp_path, index_kind=kind, index_options=other)
    assert added == [] and "img0" not in last and len(last) == 600 and (len(last.index), last.index.dead) == (601, 1)
    view, slots, _ = last.search(rows.arrays["image_vectors"][:1], 5)
    assert "img0" not in [view.ids[s] for s in slots[0]] and view.ids[slots[0][0]] != ""
    # other vectors at the saved index's slots (another gallery's snapshot in this folder): rebuilt
    last.close()
    shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "-other"))
    other_dir = tmp_path.with_name(tmp_path.name + "-other")
    shutil.rmtree(other_dir / "snapshot")
    ImageCache([f"img{i}" for i in range(601)], {k: v[::-1].copy() for k, v in spread_rows(601).arrays.items()},
               rows.fingerprint, rows.precision).save(other_dir / "snapshot")
    added.clear()
    swapped = open_gallery(other_dir, index_kind=kind, index_options=other)
    assert added == [601] and "vectors differ" in caplog.text and len(swapped) == 601


def test_a_flat_index_is_never_saved(tmp_path):
    g = open_gallery(tmp_path)
    g.put_rows(spread_rows(50))
    g.close()
    assert not (tmp_path / gallery_module.INDEX_FILE).exists()


def test_a_compaction_saves_its_index_for_the_next_snapshot(tmp_path, monkeypatch):
    """A compaction's fresh HNSW index is saved before it is swapped in, and the swap starts a checkpoint of the
    renumbered slots, so a restart after kill -9 loads that index instead of rebuilding."""
    g = open_gallery(tmp_path, index_kind="hnsw", index_options={"hnsw_m": 8})
    g.put([(f"img{i}", row(f"img{i}", i), None) for i in range(100)])
    for i in range(gallery_module.COMPACT_MIN):  # the 64th removal starts a compaction (>= 64 and a quarter) in a thread
        g.remove(f"img{i}")
    assert g.wait_compaction(30) and not g.index.dead
    assert json.loads((tmp_path / gallery_module.INDEX_JSON).read_text())["count"] == 100 - gallery_module.COMPACT_MIN
    assert g.wait_checkpoint(30)  # started by the swap: the snapshot holds the 36 live rows, in the compacted order
    assert ImageCache.load(tmp_path / "snapshot").ids == g.slot_ids[:g.count] and all(g.slot_ids[:g.count])
    added = []
    real_add = VectorIndex.add
    monkeypatch.setattr(VectorIndex, "add", lambda self, vectors, train=True: added.append(len(vectors)) or real_add(self, vectors, train))
    again = open_gallery(tmp_path, index_kind="hnsw", index_options={"hnsw_m": 8})  # no close: as after kill -9
    assert added == [] and sorted(again.ids()) == sorted(f"img{i}" for i in range(gallery_module.COMPACT_MIN, 100))
    query = row("img85", 85).arrays["image_vectors"]
    view, slots, _ = again.search(query, 1)
    assert view.ids[slots[0][0]] == "img85"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_dead_slots_keep_their_numbers_through_a_snapshot_and_an_open(tmp_path, kind):
    """Below the compaction threshold a replaced or removed image's slot stays dead on disk (id "" in the snapshot) and
    after an open (not compacted there, as at run time): slot numbers change only at a compaction, so the index's
    labels still fit. A dead slot never comes back: not in ids(), not in a search, its id free for a new put."""
    g = open_gallery(tmp_path, index_kind=kind)
    g.put([(f"img{i}", row(f"img{i}", i), None) for i in range(20)])
    g.put([("img4", row("img4", 104), None)])  # replaced: slot 4 dead, the new row in slot 20
    assert g.remove("img7")
    g.close()
    snapshot = ImageCache.load(tmp_path / "snapshot")
    assert len(snapshot) == 21 and snapshot.ids[4] == snapshot.ids[7] == "" and snapshot.ids[20] == "img4"
    again = open_gallery(tmp_path, index_kind=kind)
    assert again.count == 21 and again.index.dead == 2 and again.compaction is None
    assert again.slot_ids[:again.count] == snapshot.ids  # no placeholder left behind
    assert sorted(again.ids()) == sorted(f"img{i}" for i in range(20) if i != 7) and len(again) == 19
    assert np.array_equal(contents(again)["img4"], row("img4", 104).arrays["image_vectors"][0])
    view, slots, _ = again.search(row("img7", 7).arrays["image_vectors"], 19)
    assert "" not in [view.ids[s] for s in slots[0]] and "img7" not in [view.ids[s] for s in slots[0]] and len(slots[0]) == 19
    again.put([("img7", row("img7", 7), None)])  # the removed id again: a fresh slot
    assert again.count == 22 and "img7" in again
    again.close()
    third = open_gallery(tmp_path, index_kind=kind)
    assert len(third) == 20 and third.index.dead == 2


def test_a_checkpoint_saves_a_grown_index_and_a_restart_loads_it_ahead_of_the_snapshot(tmp_path, monkeypatch):
    """A checkpoint's thread saves the HNSW index when none is on disk (or it grew by INDEX_SAVE_GROWTH), from a copy
    taken under the lock. A saved index may cover slots only the log holds (adds and removals after the snapshot):
    after kill -9 the open replays the log first, then loads it and adds only what came after it."""
    g = open_gallery(tmp_path, index_kind="hnsw", index_options={"hnsw_m": 8}, snapshot_every=10)
    for i in range(25):
        g.put([(f"img{i}", row(f"img{i}", i), None)])
    assert g.wait_checkpoint(30)
    meta = json.loads((tmp_path / gallery_module.INDEX_JSON).read_text())
    assert 10 <= meta["count"] <= 25  # saved by the first checkpoint's thread (the adds went on meanwhile)

    g2_dir = tmp_path / "ahead"
    g2 = open_gallery(g2_dir, index_kind="hnsw", index_options={"hnsw_m": 8})  # never checkpointed: no snapshot at all
    g2.put([(f"img{i}", row(f"img{i}", i), None) for i in range(30)])
    assert g2.remove("img3")
    g2._save_grown_index()  # what a checkpoint's thread does: the index (30 labels, one dead) is ahead of any snapshot
    assert json.loads((g2_dir / gallery_module.INDEX_JSON).read_text())["count"] == 30
    assert not (g2_dir / "snapshot").exists()
    g2._save_grown_index()  # unchanged since: not written again
    g2.put([("late", row("late", 500), None)])
    added = []
    real_add = VectorIndex.add
    monkeypatch.setattr(VectorIndex, "add", lambda self, vectors, train=True: added.append(len(vectors)) or real_add(self, vectors, train))
    crashed = open_gallery(g2_dir, index_kind="hnsw", index_options={"hnsw_m": 8})  # no close: kill -9
    assert added == [1] and len(crashed) == 30 and "img3" not in crashed and (len(crashed.index), crashed.index.dead) == (31, 1)
    view, slots, _ = crashed.search(row("img3", 3).arrays["image_vectors"], 30)
    assert "img3" not in [view.ids[s] for s in slots[0]] and len(slots[0]) == 30
    view, slots, _ = crashed.search(row("late", 500).arrays["image_vectors"], 1)
    assert view.ids[slots[0][0]] == "late"
