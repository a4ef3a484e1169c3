"""Gallery caches: save/load round trip, append == encode at once, ragged caption blocks, refusal of
caches from another artifact or a newer format, atomic replacement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cache import CACHE_JSON, CaptionCache, ImageCache, append_saved
from engine.errors import ArtifactError, InputError
from engine.runtime import Scorer
from engine.store import FeatureStore


@pytest.fixture(scope="module")
def scorer(tiny_artifact):
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def split(tiny_store):
    return FeatureStore(tiny_store).split("test")


def assert_same(a, b) -> None:
    assert a.ids == b.ids and a.fingerprint == b.fingerprint and a.precision == b.precision
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        assert np.array_equal(np.asarray(a.arrays[name]), np.asarray(b.arrays[name])), name
    if isinstance(a, CaptionCache):
        assert a.texts == b.texts and a.image_ids == b.image_ids and np.array_equal(a.lengths, b.lengths)


def test_save_load_round_trip(scorer, split, tmp_path):
    images, captions = scorer.encode_images(split), scorer.encode_captions(split)
    for cache, cls in ((images, ImageCache), (captions, CaptionCache)):
        path = cache.save(tmp_path / cls.kind)
        for mmap in (True, False):
            assert_same(cls.load(path, expect=scorer.fingerprint, precision="fp32", mmap=mmap), cache)
    assert captions.image_ids[:6] == ["test_0000.jpg"] * 5 + ["test_0001.jpg"]
    assert captions.ids[:2] == ["test_0000.jpg#0", "test_0000.jpg#1"]
    loaded = CaptionCache.load(tmp_path / "caption")
    assert isinstance(loaded.arrays["gates_words"], np.memmap)
    assert np.array_equal(scorer.score_matrix(ImageCache.load(tmp_path / "image"), loaded), scorer.score_matrix(images, captions))


def test_append_equals_encoding_everything_at_once(scorer, split, tmp_path):
    regions, objects = np.asarray(split.regions), np.asarray(split.objects)
    words, lengths = np.asarray(split.words("glove50")), np.asarray(split.lengths)
    whole_images = scorer.encode_images((regions, objects))
    whole_captions = scorer.encode_captions((words, lengths))
    images = scorer.encode_images((regions[:3], objects[:3])).append(scorer.encode_images((regions[3:], objects[3:]), ids=[str(i) for i in range(3, 10)]))
    assert_same(images, whole_images)
    first = scorer.encode_captions((words[:17], lengths[:17]))
    rest = scorer.encode_captions((words[17:], lengths[17:]), ids=[str(i) for i in range(17, 50)])
    assert_same(first.append(rest), whole_captions)
    path = tmp_path / "captions"
    append_saved(path, first)
    appended = append_saved(path, rest)
    assert_same(CaptionCache.load(path), whole_captions)
    assert_same(appended, whole_captions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions"]  # no temp or backup directories left


def test_caption_block_pads_only_to_its_longest(scorer, split):
    captions = scorer.encode_captions(split)
    lengths = np.asarray(split.lengths)
    rows = np.array([5, 0, 17])
    block = captions.block(rows)
    width = int(lengths[rows].max())
    assert block["words"].shape == (3, width, 12) and block["gates_words"].shape[:2] == (3, width)
    words = np.asarray(split.words("glove50"))[rows, :width].astype(np.float32)
    assert np.array_equal(block["words"], words)  # zeros past each length, as the store holds them
    assert np.array_equal(block["lengths"], lengths[rows])
    assert captions.block(rows, words=8)["states"].shape == (3, 8, 6)
    assert captions.arrays["gates_words"].shape[0] == lengths.sum()  # ragged: one row per real word


def test_refuses_another_artifact_newer_format_and_corrupt_files(scorer, split, tmp_path):
    images = scorer.encode_images(split)
    path = images.save(tmp_path / "images")
    with pytest.raises(ArtifactError, match=r"encoded by artifact \w{12}, expected 000000000000 \(the scorer's artifact\); re-encode"):
        ImageCache.load(path, expect="0" * 64)
    with pytest.raises(ArtifactError, match=r"encoded at precision 'fp32', expected 'fp16'"):
        ImageCache.load(path, precision="fp16")
    with pytest.raises(InputError, match=r"expected format 'bssan-caption-cache', got 'bssan-image-cache'"):
        CaptionCache.load(path)
    meta = json.loads((path / CACHE_JSON).read_text())
    (path / CACHE_JSON).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(InputError, match=r"cache format version 99; this engine reads up to 1"):
        ImageCache.load(path)
    (path / CACHE_JSON).write_text(json.dumps(meta))
    np.save(path / "regions_attn.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match=r"regions_attn.npy: float32 \[2, 2\], expected float32 \[10, 9, 12\]"):
        ImageCache.load(path)
    other = scorer.encode_images(split)
    other.fingerprint = "f" * 64
    with pytest.raises(ArtifactError, match=r"ImageCache.append: caches of artifact"):
        images.append(other)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"exists and is not a cache directory"):
        images.save(tmp_path / "user")


def test_interrupted_replace_is_undone_on_load(scorer, split, tmp_path):
    images = scorer.encode_images(split)
    path = images.save(tmp_path / "images")
    path.rename(tmp_path / ".images.old")  # a crash between the two renames of a replace
    assert_same(ImageCache.load(path), images)
    assert not (tmp_path / ".images.old").exists()
