"""Shortlist re-ranking in journaled units (engine/journal.py): both directions' candidate pairs scored once,
image by image, give the rankings of the library's per-direction top_k; the grid-call plan of one image's pairs
(engine.runtime.grid_chunks) covers them in order, within the cap, at no more modelled cost than fixed chunks;
caches saved in the background: units listed only once the caches are on disk, a failed save raised."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from engine.journal import UNIT_SHORTLIST_IMAGES, Journal, score_shortlists
from engine.runtime import GRID_CALL_COST, GRID_PAIR_COST, Scorer, grid_chunks
from engine.store import FeatureStore
from tests.conftest import build_store
from tests.engine.conftest import assert_close


@pytest.fixture(scope="module")
def gallery(tiny_artifact, tmp_path_factory):
    """40 synthetic images x 200 captions (K = 20 / 8: ~60 re-rank pairs per image, so one-image grid calls)."""
    store = build_store(tmp_path_factory.mktemp("journal-store"), splits={"test": 40}, seed=3)
    split = FeatureStore(store).split("test")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=2) as scorer:
        yield scorer, scorer.encode_images(split), scorer.encode_captions(split)


def test_both_directions_scored_once_by_image_rank_as_top_k(gallery, monkeypatch):
    scorer, images, captions = gallery
    assert scorer.path == "grid"
    ks = {"i2t": 20, "t2i": 8}
    calls = []
    score_pairs = scorer.score_pairs
    monkeypatch.setattr(scorer, "score_pairs", lambda i, c, pairs, **kw: calls.append(pairs.copy()) or score_pairs(i, c, pairs, **kw))
    pairs, bssan, rankings = score_shortlists(scorer, images, captions, ks, Journal(None, {}))
    monkeypatch.undo()
    wanted = {(int(i), int(c)) for d, k in ks.items() for i, c in zip(*(
        (np.repeat(np.arange(len(images)), k), scorer.shortlist(images, captions, k, "i2t").reshape(-1)) if d == "i2t" else
        (scorer.shortlist(images, captions, k, "t2i").reshape(-1), np.repeat(np.arange(len(captions)), k))))}
    scored = np.concatenate(calls)
    assert len(scored) == len(pairs) == len(wanted) < len(images) * ks["i2t"] + len(captions) * ks["t2i"]  # each pair once
    assert {tuple(p) for p in pairs.tolist()} == wanted and np.array_equal(scored, pairs)
    assert len(calls) == -(-len(images) // UNIT_SHORTLIST_IMAGES)  # units of whole images
    assert_close(bssan, scorer.score_pairs(images, captions, pairs, fuse=False), 0.0, "unit scores = one score_pairs call")
    for d, k in ks.items():
        want = scorer.top_k(images, captions, k, d, shortlist_k=k)
        got = rankings[d]
        assert np.array_equal(got.indices, want.indices) and np.array_equal(got.candidates, want.candidates), d
        assert_close(got.scores, want.scores, 1e-6, f"{d} product scores")
        assert_close(got.bssan, want.bssan, 1e-6, f"{d} BSSAN scores")
        assert (np.diff(got.scores, axis=1) <= 0).all()


def fixed_cost(lengths: np.ndarray, chunks: list[slice]) -> float:
    return sum(GRID_CALL_COST + (c.stop - c.start) * (GRID_PAIR_COST + lengths[c.stop - 1]) for c in chunks)


@pytest.mark.parametrize("n, cap", [(1, 256), (37, 256), (100, 256), (520, 256), (520, 64), (3000, 256), (300, 7)])
def test_grid_chunks_cover_the_pairs_in_order_within_the_cap_and_cost_no_more_than_fixed_chunks(n, cap):
    lengths = np.sort(np.random.default_rng(n).poisson(10, n).clip(1, 30))
    chunks = grid_chunks(lengths, cap)
    assert chunks[0].start == 0 and chunks[-1].stop == n and all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert all(0 < c.stop - c.start <= cap for c in chunks)
    for size in (16, 32, 64, 128, 256):
        size = min(size, cap)
        assert fixed_cost(lengths, chunks) <= fixed_cost(lengths, [slice(s, min(s + size, n)) for s in range(0, n, size)]) + 1e-9
    assert grid_chunks(lengths, cap) == chunks  # a function of the lengths and cap only
    assert grid_chunks(np.full(n, 9), cap) == [slice(s, min(s + cap, n)) for s in range(0, n, cap)]  # one length: full calls


class SlowCache:
    """A cache whose save waits for `release` (or fails with `error`)."""

    def __init__(self, error: Exception | None = None):
        self.release, self.error, self.saved = threading.Event(), error, False

    def save(self, path):
        assert self.release.wait(30)
        if self.error is not None:
            raise self.error
        path.mkdir()
        (path / "cache.json").write_text("{}")
        self.saved = True


def test_units_are_listed_once_the_caches_are_on_disk(tmp_path):
    journal = Journal(tmp_path / "out.jsonl", {"run": 1})
    cache = SlowCache()
    assert journal.cache("images", None, lambda: cache, "") is cache  # returned at once, saved in the background
    progress = journal.dir / "progress.json"
    journal.finish_unit("rows0")
    assert not progress.exists() and not journal.caches_saved()  # scored before its cache was on disk: not listed yet
    cache.release.set()
    assert journal.caches_saved(wait=True) and cache.saved
    journal.finish_unit("rows8")
    assert json.loads(progress.read_text())["done"] == ["rows0", "rows8"]
    journal.remove()
    assert not journal.dir.exists()


def test_a_failed_cache_save_is_raised_at_the_next_unit(tmp_path):
    journal = Journal(tmp_path / "out.jsonl", {"run": 1})
    cache = SlowCache(OSError(28, "No space left on device"))
    journal.cache("captions", None, lambda: cache, "")
    cache.release.set()
    with pytest.raises(OSError, match="No space left"):
        journal.caches_saved(wait=True)
        journal.finish_unit("pairs0")
    with pytest.raises(OSError, match="No space left"):
        journal.finish_unit("pairs0")
    journal.remove()
