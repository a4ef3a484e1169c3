"""The committed reference model (models/reference) and its shortlist stage (models/reference-shortlist):
records complete, size within budget, and on real Flickr8K test pairs matched pairs outscore shuffled ones.

The store test needs the extracted Flickr8K features (python -m engine.features ... --out stores/flickr8k,
or BSSAN_FLICKR8K_STORE=path); it skips with the reason when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.store import FeatureStore
from training.checkpoint import ModelKind, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
REFERENCE, SHORTLIST = ROOT / "models" / "reference", ROOT / "models" / "reference-shortlist"
STORE = Path(os.environ.get("BSSAN_FLICKR8K_STORE", ROOT / "stores" / "flickr8k"))
MODELS_BUDGET_BYTES = 32 * 2**20
PAIRS = 40  # test images scored against their first caption and against a shuffled one


@pytest.fixture(scope="module")
def reference():
    return load_checkpoint(REFERENCE)


@pytest.fixture(scope="module")
def shortlist():
    return load_checkpoint(SHORTLIST)


def test_models_fit_the_repository_budget():
    size = sum(p.stat().st_size for p in (ROOT / "models").rglob("*") if p.is_file())
    assert size <= MODELS_BUDGET_BYTES, f"models/ holds {size / 2**20:.1f} MiB; budget 32 MiB"


def test_records_name_config_words_metrics_and_command(reference, shortlist):
    assert reference.kind is ModelKind.BSSAN and shortlist.kind is ModelKind.DUAL_ENCODER
    assert reference.word_features["name"] == reference.train_config.word_set == shortlist.train_config.word_set
    assert reference.model_config.word_dim == shortlist.model_config.word_dim
    assert reference.provenance["weights_dtype"] == "float16"
    command = " ".join(reference.provenance["command"])
    assert "training.train" in command and f"--word-set {reference.train_config.word_set}" in command
    metrics = reference.metrics
    assert metrics["best_epoch"] >= 1 and metrics["best_dev"]["rsum"] > 0
    test = metrics["test"]
    assert test["split"] == "test" and test["images"] == 1000 and test["captions"] == 5000
    for side in ("i2t", "t2i"):
        assert 0 < test[side]["r1"] <= test[side]["r5"] <= test[side]["r10"] <= 100
    assert test["rsum"] == pytest.approx(sum(test[s][k] for s in ("i2t", "t2i") for k in ("r1", "r5", "r10")))


def test_real_test_pairs_outscore_shuffled_pairs(reference, shortlist):
    if not (STORE / "manifest.json").is_file() or "test" not in FeatureStore(STORE).splits:
        pytest.skip(f"{STORE}: no extracted Flickr8K test split (python -m engine.features, or set BSSAN_FLICKR8K_STORE)")
    split = FeatureStore(STORE).split("test")
    word_set = reference.train_config.word_set
    if word_set not in split.word_sets:
        pytest.skip(f"{STORE}: the test split has no words_{word_set}.npy")
    per = split.captions_per_image()
    images = np.arange(PAIRS)
    matched = images * per  # each image's first caption
    shuffled = np.roll(matched, 1)  # the previous image's first caption
    lengths = np.asarray(split.lengths)
    for ckpt in (reference, shortlist):
        if ckpt.kind is ModelKind.BSSAN:
            def score(captions):
                return ckpt.model.score_pairs(split.regions, split.objects, split.words(word_set), lengths, images, captions).numpy()
        else:
            image_vectors = ckpt.model.embed_images(np.asarray(split.regions[:PAIRS]), np.asarray(split.objects[:PAIRS]))

            def score(captions):
                rows = np.sort(captions)
                vectors = ckpt.model.embed_texts(np.asarray(split.words(word_set)[rows]), lengths[rows])
                order = np.searchsorted(rows, captions)
                return (image_vectors * vectors[order]).sum(dim=1).detach().numpy()
        good, bad = score(matched), score(shuffled)
        assert good.mean() > bad.mean(), f"{ckpt.path}: matched pairs {good.mean():.3f} <= shuffled {bad.mean():.3f}"
        assert (good > bad).mean() > 0.6, f"{ckpt.path}: only {(good > bad).mean():.0%} of matched pairs beat their shuffled pair"
