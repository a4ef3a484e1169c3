"""engine.store: the synthetic store round-trips, and a broken store fails with one named line."""

import json

import numpy as np
import pytest

from engine.errors import StoreError
from engine.store import FeatureStore, StoreWriter
from tests.conftest import build_store


def test_synthetic_store_reads_back(tiny_store):
    store = FeatureStore(tiny_store)
    assert store.splits == ["dev", "test", "train"]
    train = store.split("train")
    train.validate()
    assert train.regions.shape == (40, 9, 16) and train.regions.dtype == np.float16
    assert train.words("glove50").shape == (200, 8, 12)
    assert train.word_sets == ["glove50"]
    assert train.captions_per_image() == 5
    assert len(train.captions) == 200 and train.image_names[0] == "train_0000.jpg"


def test_missing_and_newer_manifest(tmp_path):
    with pytest.raises(StoreError, match="manifest.json: missing; expected a feature store"):
        FeatureStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "bssan-feature-store", "version": 99}))
    with pytest.raises(StoreError, match="store format version 99 is newer than this code reads"):
        FeatureStore(tmp_path)


def test_wrong_dtype_and_shape_are_named(tmp_path):
    root = build_store(tmp_path / "s", splits={"test": 4})
    split = FeatureStore(root).split("test")
    np.save(root / "test" / "lengths.npy", np.ones(20, dtype=np.float32))
    with pytest.raises(StoreError, match=r"lengths.npy: expected int32 array of rank 1, got float32"):
        split.lengths
    np.save(root / "test" / "lengths.npy", np.ones(19, dtype=np.int32))
    with pytest.raises(StoreError, match=r"caption_image.npy: expected 19 rows \(as lengths.npy\), got 20"):
        split.validate()
    with pytest.raises(StoreError, match=r"no split 'dev'; the store has \['test'\]"):
        FeatureStore(root).split("dev")


def test_writer_refuses_other_extractor(tmp_path):
    StoreWriter(tmp_path, extractor={"name": "a"})
    with pytest.raises(StoreError, match="made by a different extractor setup"):
        StoreWriter(tmp_path, extractor={"name": "b"})
