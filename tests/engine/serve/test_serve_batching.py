"""Micro-batching: queries scored together in one batch get the results they get alone (the same
ranked ids, the same first-stage scores bit for bit, BSSAN scores within float32 rounding: a pair
block of another shape runs other GEMM kernels; checked to 4 ulp), concurrent submits share calls,
the wait is bounded, and one failing request does not fail its batch-mates."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")
pytest.importorskip("starlette", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.runtime import Scorer  # noqa: E402
from engine.serve.batching import MicroBatcher  # noqa: E402
from engine.serve.gallery import Gallery  # noqa: E402
from engine.serve.service import ImageQuery, SearchService, TextQuery  # noqa: E402

QUERIES = ["a cat with green eyes", "an astronaut", "a cup of coffee on a white saucer on a table",
           "two men", "a rocket", "a horse runs across a green field in the sun"]


@pytest.fixture(scope="module")
def service(serve_artifact, serve_photos, tmp_path_factory):
    scorer = Scorer.load(serve_artifact, backend="onnxruntime-cpu", threads=2)
    gallery = Gallery.open(tmp_path_factory.mktemp("batch-index"), scorer.fingerprint, scorer.cache_precision)
    cache = scorer.encode_images(serve_photos)
    gallery.put([(i, ImageCacheRow(cache, n), None) for n, i in enumerate(cache.ids)])
    captions = scorer.encode_captions(QUERIES)
    yield SearchService(scorer, gallery, captions)
    gallery.close()
    scorer.close()


def ImageCacheRow(cache, n):  # noqa: N802 - a one-row view, as the gallery stores them
    from engine.cache import ImageCache

    return ImageCache([cache.ids[n]], {k: v[n:n + 1] for k, v in cache.arrays.items()}, cache.fingerprint, cache.precision)


def test_batched_text_queries_equal_unbatched(service):
    queries = [TextQuery(text, top_k=3, rerank_k=rerank, attention=(i == 2)) for i, (text, rerank) in
               enumerate(zip(QUERIES, [6, 4, 6, 5, 6, 3]))]
    alone = [service.search_texts([q])[0] for q in queries]
    assert_same_results(service.search_texts(queries), alone)


def test_batched_image_queries_equal_unbatched(service, serve_photos):
    queries = [ImageQuery(path, top_k=2, rerank_k=4) for path in serve_photos[:3]]
    alone = [service.rank_captions([q])[0] for q in queries]
    assert_same_results(service.rank_captions(queries), alone)


def assert_same_results(together: list[dict], alone: list[dict]) -> None:
    assert len(together) == len(alone)
    for got, want in zip(together, alone):
        assert [h.get("id") for h in got["results"]] == [h.get("id") for h in want["results"]]  # same ranking
        assert [h["first_stage"] for h in got["results"]] == [h["first_stage"] for h in want["results"]]  # bit for bit
        for g, w in zip(got["results"], want["results"]):
            assert abs(g["score"] - w["score"]) <= 4 * np.spacing(np.float32(abs(w["score"]))), (g, w)
            if "attention" in w:
                assert g["attention"] == w["attention"]


def test_the_gallery_arrays_are_read_in_place_with_the_same_scores(service, tmp_path):
    """The served gallery's rows are in memory: score_pairs passes the whole arrays and the pair graph gathers the
    pairs' rows itself; the same gallery memory-mapped from disk takes the copying path; bit-identical scores."""
    from engine.cache import ImageCache

    view = service.gallery.view()
    assert all(type(a) is np.ndarray and a.flags.c_contiguous for a in view.arrays.values())
    mapped = ImageCache.load(view.save(tmp_path / "saved"), mmap=True)
    assert all(isinstance(a, np.memmap) for a in mapped.arrays.values())
    pairs = np.array([[s, q] for q in range(len(service.captions)) for s in range(len(view))][::-1], np.int64)
    whole = service.scorer.score_pairs(view, service.captions, pairs)
    copied = service.scorer.score_pairs(mapped, service.captions, pairs)
    assert np.array_equal(whole, copied)


def test_concurrent_submits_share_calls_and_keep_order():
    calls = []

    def run(items):
        calls.append(list(items))
        time.sleep(0.02)
        return [f"result {i}" for i in items]

    async def main():
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=50, workers=1)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.stop()
        return results

    assert asyncio.run(main()) == [f"result {i}" for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]


def test_the_wait_is_bounded_and_batching_can_be_off():
    def run(items):
        return [i * 2 for i in items]

    async def main(enabled):
        batcher = MicroBatcher(run, max_batch=64, max_wait_ms=5, enabled=enabled)
        await batcher.start()
        start = time.perf_counter()
        result = await batcher.submit(21)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return result, elapsed

    for enabled in (True, False):
        result, elapsed = asyncio.run(main(enabled))
        assert result == 42 and elapsed < 0.5


def test_a_lone_request_does_not_wait_but_a_busy_batcher_gathers():
    calls = []

    def run(items):
        calls.append(list(items))
        time.sleep(0.05 if items[0] == "slow" else 0)
        return list(items)

    async def main():
        batcher = MicroBatcher(run, max_batch=8, max_wait_ms=400, workers=2)
        await batcher.start()
        start = time.perf_counter()
        await batcher.submit("alone")  # nothing else in flight: no 400 ms wait
        alone = time.perf_counter() - start
        slow = asyncio.ensure_future(batcher.submit("slow"))  # runs at once on one worker ...
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        late = await asyncio.gather(batcher.submit("b"), batcher.submit("c"))  # ... so these wait and share a call
        gathered = time.perf_counter() - start
        await slow
        await batcher.stop()
        return alone, gathered, late

    alone, gathered, late = asyncio.run(main())
    assert late == ["b", "c"]
    assert alone < 0.2, alone
    assert calls == [["alone"], ["slow"], ["b", "c"]] and gathered >= 0.35, (calls, gathered)


def test_one_bad_request_fails_alone():
    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def main():
        batcher = MicroBatcher(run, max_batch=8, max_wait_ms=30)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)
        await batcher.stop()
        return results

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)


def test_first_stage_scores_are_inner_products(service):
    result = service.search_texts([TextQuery(QUERIES[0], top_k=6, rerank_k=6)])[0]["results"]
    vectors = service.scorer.encode_captions([QUERIES[0]]).arrays["text_vectors"][0]
    view = service.gallery.view()
    by_id = {i: np.asarray(view.arrays["image_vectors"][s]) for s, i in enumerate(view.ids)}
    for hit in result:
        assert hit["first_stage"] == pytest.approx(float(by_id[hit["id"]] @ vectors), abs=1e-5)
