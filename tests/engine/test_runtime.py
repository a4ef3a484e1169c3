"""The Scorer library: batched == unbatched, buckets change nothing, shortlist k = all == exhaustive,
pairs and top-k agree with the matrix, attention equals the training model's, the memory budget,
precisions, image files and caption strings, and thread safety."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from engine.errors import AssetError, InputError
from engine.runtime import Scorer, rank_rows
from engine.store import FeatureStore
from tests.engine.conftest import assert_close


@pytest.fixture(scope="module")
def split(tiny_store):
    return FeatureStore(tiny_store).split("test")


@pytest.fixture(scope="module")
def scorer(tiny_artifact):
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def caches(scorer, split):
    return scorer.encode_images(split), scorer.encode_captions(split)


@pytest.fixture(scope="module")
def matrix(scorer, caches):
    return scorer.score_matrix(*caches)


def test_batched_equals_unbatched_and_buckets_change_nothing(tiny_artifact, caches, matrix):
    for batch_size, buckets in ((1, True), (3, True), (1, False), (512, False)):
        with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, batch_size=batch_size, buckets=buckets) as other:
            assert_close(other.score_matrix(*caches), matrix, 1e-6, f"batch {batch_size}, buckets {buckets}")
            pairs = np.array([[0, 49], [9, 0], [3, 17], [3, 18], [0, 49]])
            assert_close(other.score_pairs(*caches, pairs), matrix[pairs[:, 0], pairs[:, 1]], 1e-6, "score_pairs")


def test_score_pairs_and_top_k_agree_with_the_matrix(scorer, caches, matrix):
    images, captions = caches
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.integers(len(images), size=300), rng.integers(len(captions), size=300)], axis=1)
    assert_close(scorer.score_pairs(images, captions, pairs), matrix[pairs[:, 0], pairs[:, 1]], 1e-6, "random pairs")
    i2t = scorer.top_k(images, captions, 5, "i2t")
    assert np.array_equal(i2t.indices, rank_rows(matrix, 5)[0]) and np.array_equal(i2t.queries, np.arange(len(images)))
    t2i = scorer.top_k(images, captions, 3, "t2i", queries=np.array([4, 0, 49]))
    assert np.array_equal(t2i.indices, rank_rows(matrix.T[[4, 0, 49]], 3)[0])
    assert_close(t2i.scores, np.take_along_axis(matrix.T[[4, 0, 49]], t2i.indices, 1), 1e-6, "t2i scores")


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_shortlist_of_everything_equals_exhaustive(scorer, caches, direction):
    images, captions = caches
    n = len(captions) if direction == "i2t" else len(images)
    exhaustive = scorer.top_k(images, captions, n, direction)
    shortlisted = scorer.top_k(images, captions, n, direction, shortlist_k=n)
    assert np.array_equal(shortlisted.indices, exhaustive.indices)
    assert_close(shortlisted.scores, exhaustive.scores, 1e-6, f"{direction} shortlist k=all")


def test_shortlist_reranks_the_dot_product_candidates(scorer, caches, matrix):
    images, captions = caches
    candidates = scorer.shortlist(images, captions, 7, "i2t")
    dots = np.asarray(images.arrays["image_vectors"]) @ np.asarray(captions.arrays["text_vectors"]).T
    assert np.array_equal(candidates, rank_rows(dots, 7)[0])
    ranking = scorer.top_k(images, captions, 3, "i2t", shortlist_k=7)
    for q in range(len(images)):
        assert set(ranking.indices[q]) <= set(candidates[q])
        assert np.array_equal(ranking.indices[q], candidates[q][rank_rows(matrix[q, candidates[q]][None], 3)[0][0]])
    with pytest.raises(InputError, match=r"shortlist_k=2: expected 3\.\.50"):
        scorer.top_k(images, captions, 3, "i2t", shortlist_k=2)
    with pytest.raises(InputError, match=r"k=0: expected 1\.\.10 \(the images to rank\)"):
        scorer.top_k(images, captions, 0, "t2i")


def test_attention_equals_the_training_model(scorer, caches, split, tiny_checkpoints):
    from training.checkpoint import load_checkpoint

    images, captions = caches
    ranking = scorer.top_k(images, captions, 4, "i2t", queries=np.array([1, 6]), attention=True)
    model = load_checkpoint(tiny_checkpoints["bssan"]).model
    image_index = np.repeat(ranking.queries, 4)
    text_index = ranking.indices.reshape(-1)
    want = model.attention_weights(np.array(split.regions), np.array(split.objects), np.array(split.words("glove50")),
                                   np.asarray(split.lengths), image_index, text_index)
    lengths = np.asarray(split.lengths)[text_index]
    for n, hit in enumerate(h for per_query in ranking.attention for h in per_query):
        assert (hit["image"], hit["caption"]) == (image_index[n], text_index[n])
        assert hit["word_to_region"].shape == (lengths[n], images.arrays["regions_attn"].shape[1])
        assert_close(hit["word_to_region"], want["word_to_region"][n, :lengths[n]].numpy(), 1e-5, "word_to_region")
        assert_close(hit["object_to_word"], want["object_to_word"][n, :, :lengths[n]].numpy(), 1e-5, "object_to_word")
        assert_close(hit["word_to_region"].sum(axis=1), np.ones(lengths[n]), 1e-5, "softmax rows")


def test_memory_budget_bounds_blocks_and_refuses_what_cannot_fit(tiny_artifact, caches, matrix):
    from engine.runtime import PROCESS_BASE_MB, resident_bytes

    images, captions = caches
    start = resident_bytes(images, captions) + matrix.nbytes  # the plan: inputs only, never the live RSS
    assert start == PROCESS_BASE_MB * 2**20 + sum(a.nbytes for c in caches for a in c.arrays.values()) + matrix.nbytes
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        assert scorer._fit(512, 1, captions.max_length, start) == 512  # the default budget holds a full call
        tight_mb = (start + scorer.working_bytes(1, 4, captions.max_length)) / 2**20
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, memory_budget_mb=tight_mb) as tight:
        assert tight._fit(512, 1, captions.max_length, start) == 4  # calls shrank to fit
        assert_close(tight.score_matrix(images, captions), matrix, 1e-6, "tight budget")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, memory_budget_mb=100) as starved:
        with pytest.raises(InputError, match=rf"memory budget 100 MB: the process \({PROCESS_BASE_MB} MB planned\), its caches "
                                             rf"and the output take {start / 2**20:.0f} MB; expected a budget of at least"):
            starved.score_matrix(images, captions)
        with pytest.raises(InputError, match=r"memory budget 100 MB: .* expected a budget of at least"):
            starved.check_budget(10**6, 5 * 10**6)  # refused before anything is encoded
    # the caption caches are ragged, one row per WORD: the check counts the words the captions hold
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        image_row, word_row = scorer.cache_row_bytes(1)
        n, words = 1000, 11  # 1,000 captions of 11 words
        base = PROCESS_BASE_MB * 2**20 + scorer.working_bytes(1, 1, words)
        between_mb = (base + 3 * n * word_row) / 2**20  # holds 1 word a caption, not 11
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, memory_budget_mb=between_mb) as budget:
        budget.check_budget(0, n, words=words)  # one word each: fits
        with pytest.raises(InputError, match="expected a budget of at least"):
            budget.check_budget(0, n, words=words, total_words=n * words)


@pytest.mark.parametrize("precision,tolerance", [("fp16", 0.05), ("int8", 0.1)])
def test_other_precisions_stay_close_to_fp32(tiny_artifact, split, matrix, precision, tolerance):
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", precision=precision, threads=1) as scorer:
        images = scorer.encode_images(split)
        assert images.precision == ("fp16" if precision == "fp16" else "fp32")
        assert images.arrays["regions_attn"].dtype == (np.float16 if precision == "fp16" else np.float32)
        assert_close(scorer.score_matrix(images, scorer.encode_captions(split)), matrix, tolerance, precision)


def test_one_scorer_from_several_threads_gives_the_serial_results(scorer, caches, matrix):
    images, captions = caches
    serial_top = scorer.top_k(images, captions, 5, "t2i", shortlist_k=8)
    results, errors = [None] * 6, []

    def work(slot: int) -> None:
        try:
            if slot % 2:
                results[slot] = scorer.score_matrix(images, captions)
            else:
                results[slot] = scorer.top_k(images, captions, 5, "t2i", shortlist_k=8)
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for slot, result in enumerate(results):
        if slot % 2:
            assert np.array_equal(result, matrix)  # bit for bit
        else:
            assert np.array_equal(result.indices, serial_top.indices) and np.array_equal(result.scores, serial_top.scores)


def test_caches_of_another_artifact_are_refused(tiny_artifact, caches, scorer):
    images, captions = caches
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", precision="fp16", threads=1) as fp16:
        with pytest.raises(InputError, match=r"ImageCache: encoded by artifact \w+ at fp32, expected \w+ at fp16"):
            fp16.score_matrix(images, captions)


def test_image_files_and_caption_strings(image_artifact, demo_photos):
    """Files go through the model's backbone, detector and RoIAlign graphs; strings through THE tokenizer
    and GloVe: the same as running engine.features and reading the store's float16 features."""
    from engine.runtime import image_pipeline
    from engine.text import load_word_features

    with Scorer.load(image_artifact, backend="onnxruntime-cpu", threads=2) as scorer:
        images = scorer.encode_images(demo_photos)
        assert images.ids == [p.name for p in demo_photos]
        regions, objects, _, _, bad = image_pipeline(scorer.artifact, 2).images(demo_photos)
        assert not bad
        direct = scorer.encode_images((regions.astype(np.float16), objects.astype(np.float16)))
        assert all(np.array_equal(images.arrays[k], direct.arrays[k]) for k in images.arrays)
        texts = ["A cat looks at the camera .", "a red motorcycle in a garage"]
        captions = scorer.encode_captions(texts)
        assert captions.texts == texts and captions.lengths.tolist() == [6, 6]
        batch = load_word_features("glove50").encode(texts, scorer.dims["max_words"])
        words = scorer.encode_captions((batch.vectors.astype(np.float16).astype(np.float32), batch.lengths))
        assert np.array_equal(captions.arrays["gates_words"], words.arrays["gates_words"])
        assert scorer.score_matrix(images, captions).shape == (3, 2)
        with pytest.raises(InputError, match=r"cannot decode image"):
            bad_file = demo_photos[0].parent.parent / "__init__.py"  # a file that is not an image
            scorer.encode_images([bad_file])


def test_image_files_need_an_image_pipeline(scorer, demo_photos):
    with pytest.raises(AssetError, match=r"features came from 'synthetic', which has no image pipeline to rerun"):
        scorer.encode_images(demo_photos)


def test_encoding_image_files_from_several_threads(image_artifact, demo_photos):
    """The detector net is stateful: concurrent file encodings are serialised and give the serial result."""
    with Scorer.load(image_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        serial = scorer.encode_images(demo_photos[:2])
        results = [None, None]
        threads = [threading.Thread(target=lambda slot=slot: results.__setitem__(slot, scorer.encode_images(demo_photos[:2])))
                   for slot in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for result in results:
            assert all(np.array_equal(result.arrays[k], serial.arrays[k]) for k in serial.arrays)


# ---------------------------------------------------------------------------------------------
# Scoring paths: grid graphs (one image row, nothing gathered) vs pair graphs


def test_grid_and_pair_paths_agree_and_the_choice_is_said(tiny_artifact, caches, matrix, monkeypatch, tmp_path):
    monkeypatch.setenv("BSSAN_PATHS", str(tmp_path / "paths.json"))
    images, captions = caches
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as auto, \
            Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, path="pair") as pair:
        assert auto.path == "grid" and "scoring path: grid graphs" in auto.runner.reason
        assert pair.path == "pair" and "pair (requested)" in pair.runner.reason
        by_pair = pair.score_matrix(images, captions)
        assert_close(matrix, by_pair, 1e-5, "grid vs pair path")
        assert np.array_equal(rank_rows(matrix, 5)[0], rank_rows(by_pair, 5)[0])
        rng = np.random.default_rng(1)  # one image with many pairs (grid call) and pooled pairs (pair graph)
        pairs = np.concatenate([np.stack([np.full(60, 3), rng.integers(len(captions), size=60)], 1),
                                np.stack([rng.integers(len(images), size=40), rng.integers(len(captions), size=40)], 1)])
        assert_close(auto.score_pairs(images, captions, pairs), pair.score_pairs(images, captions, pairs), 1e-5, "pairs")
        for direction in ("i2t", "t2i"):
            got, want = (s.top_k(images, captions, 3, direction, shortlist_k=10) for s in (auto, pair))
            assert np.array_equal(got.indices, want.indices), direction


def test_grid_path_only_where_the_graphs_run_at_the_runs_precision(tiny_artifact, monkeypatch, tmp_path):
    monkeypatch.setenv("BSSAN_PATHS", "off")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, precision="int8") as int8:
        assert int8.path == "pair" and "w2r_grid" not in int8.runner.precisions  # grid graphs are fp32 only
        with pytest.raises(InputError, match="path 'grid': the artifact has no w2r_grid"):
            int8.choose_path("grid")
    with pytest.raises(InputError, match="path 'fastest': expected one of"):
        Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, path="fastest")


def test_rank_rows_equals_a_full_stable_sort_with_ties():
    """The partition shortcut (k well below the row length) gives exactly the full stable sort: ties to the lower
    index, also where the k-th best value is tied with entries beyond the k best."""
    rng = np.random.default_rng(0)
    for trial in range(120):
        rows, n = int(rng.integers(1, 12)), int(rng.integers(1, 500))
        k = int(rng.integers(1, n + 2))
        scores = (rng.integers(0, 4, size=(rows, n)) if trial % 2 else np.round(rng.normal(size=(rows, n)), 1)).astype(np.float32)
        want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        got, values = rank_rows(scores, k)
        assert np.array_equal(got, want) and np.array_equal(values, np.take_along_axis(scores, want, 1)), (rows, n, k)


def test_a_recorded_machine_choice_is_used_and_a_broken_record_ignored(tiny_artifact, monkeypatch, tmp_path):
    from engine.paths import record_choice, recorded_choice

    record = tmp_path / "paths.json"
    monkeypatch.setenv("BSSAN_PATHS", str(record))
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        assert recorded_choice(scorer.fingerprint, scorer.runner) is None
        record_choice(scorer.fingerprint, scorer.runner, "pair", "measured: pair 1.0 ms vs grid 2.0 ms")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        assert scorer.path == "pair" and "pair graphs (measured: pair 1.0 ms vs grid 2.0 ms)" in scorer.runner.reason
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=2) as scorer:  # another key: the default
        assert scorer.path == "grid"
        record_choice(scorer.fingerprint, scorer.runner, "pair", "measured on 2 one-thread calls")
    if os.cpu_count() == 2:  # threads=None on 2 cores is the same layout (2 one-thread calls): the same record
        with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=None) as scorer:
            assert scorer.path == "pair" and "measured on 2 one-thread calls" in scorer.runner.reason
    record.write_text("{not json")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        assert scorer.path == "grid"


def test_caption_blocks_run_side_by_side_with_the_same_bytes(tiny_artifact, split, caches, monkeypatch):
    import engine.encode

    monkeypatch.setattr(engine.encode, "CAPTION_BATCH", 3)  # several blocks from the tiny split
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=2) as two:
        assert two.runner.text_concurrent_calls == 2 and two.runner.describe()["text_concurrent_calls"] == 2
        side_by_side = two.encode_captions(split)
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=2, text_threads=2) as explicit:
        assert explicit.runner.text_concurrent_calls == 1  # a caller's text_threads: one block at a time
    one = caches[1]  # threads=1: one block at a time, CAPTION_BATCH 256
    assert side_by_side.ids == one.ids and sorted(side_by_side.arrays) == sorted(one.arrays)
    for name, array in one.arrays.items():
        assert np.array_equal(side_by_side.arrays[name], array), name


def test_a_few_captions_against_many_images_are_pooled_into_pair_calls(scorer, caches, matrix, monkeypatch):
    images, captions = caches
    rows = np.array([0, 7, len(captions) - 1])
    calls = []
    real = Scorer.score_pairs
    monkeypatch.setattr(Scorer, "score_pairs", lambda self, *a, **k: calls.append(len(a[2])) or real(self, *a, **k))
    got = scorer.score_grid(images, captions, caption_rows=rows)
    assert calls == [len(images) * len(rows)]  # one pooled score_pairs, not one grid call per image row
    assert_close(got, matrix[:, rows], 1e-5, "a few captions through score_pairs vs the grid")
    calls.clear()
    assert_close(scorer.score_grid(images, captions, image_rows=np.array([2])), matrix[2:3], 1e-6, "one image row")
    assert calls == []  # one image row x many captions stays on its grid call


def test_pooled_pairs_go_in_near_equal_calls_of_at_most_the_pooled_size(scorer, caches, matrix):
    from engine.runtime import POOLED_PAIRS_PER_CALL, resident_bytes

    images, captions = caches
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.integers(0, len(images), 150), rng.integers(0, len(captions), 150)], axis=1)  # few pairs per image
    calls = scorer._pair_calls(images, captions, pairs, resident_bytes(images, captions))
    sizes = sorted(len(c) for c in calls)
    assert sizes == [50, 50, 50] and POOLED_PAIRS_PER_CALL < 150  # 150 pairs: 3 calls of 50, not 64 + 64 + 22
    assert sorted(np.concatenate(calls).tolist()) == list(range(150))
    assert_close(scorer.score_pairs(images, captions, pairs), matrix[pairs[:, 0], pairs[:, 1]], 1e-5, "pooled pairs vs the grid")


def test_pair_first_stage_broadcast_route_is_bit_equal_to_the_gathers(monkeypatch):
    """Long runs of pairs per image broadcast the image's vector instead of gathering it: the same dot products, bit
    for bit, whatever the chunking (so a re-rank's fused scores do not depend on which route ran)."""
    import engine.runtime as runtime
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    images = SimpleNamespace(arrays={"image_vectors": rng.standard_normal((40, 130)).astype(np.float32)})
    captions = SimpleNamespace(arrays={"text_vectors": rng.standard_normal((300, 130)).astype(np.float32)})
    scorer = object.__new__(runtime.Scorer)
    scorer.require_shortlist = lambda: None
    many = np.stack([rng.permutation(np.repeat(np.arange(40), 50)), rng.integers(0, 300, 2000)], axis=1)  # 50 per image
    few = np.stack([rng.integers(0, 40, 300), rng.integers(0, 300, 300)], axis=1)  # ~8 per image: the gathers
    for pairs in (many, few, many[:0]):
        for chunk in (7, 777, runtime.FIRST_STAGE_CHUNK):
            monkeypatch.setattr(runtime, "FIRST_STAGE_CHUNK", chunk)
            got = runtime.Scorer.pair_first_stage(scorer, images, captions, pairs)
            want = np.einsum("nk,nk->n", images.arrays["image_vectors"][pairs[:, 0]], captions.arrays["text_vectors"][pairs[:, 1]])
            assert got.dtype == np.float32 and np.array_equal(got, want), (len(pairs), chunk)
