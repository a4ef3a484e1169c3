"""engine.serve --gallery-rows fp16: the gallery keeps each image's W2R rows (regions_attn, regions_values) at half
the memory, the W2R kernel widens them itself, and a query gets exactly what it gets from fp32 rows holding the same
rounded values; the rows stay fp16 through a checkpoint and a reopen; other scoring paths are refused."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.cache import ImageCache  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.runtime import Scorer  # noqa: E402
from engine.serve.gallery import Gallery  # noqa: E402
from engine.serve.service import SearchService, TextQuery  # noqa: E402
from engine.serve.state import HALF_ROWS, gallery_row_dtypes  # noqa: E402

kernels = pytest.importorskip("engine.kernels")
QUERIES = ["a cat with green eyes", "an astronaut", "a cup of coffee on a white saucer on a table", "a rocket"]


@pytest.fixture(scope="module")
def kernel_scorer(serve_artifact, tmp_path_factory):
    """The serve artifact on the kernel path, the kernel built for these tests into a temp dir (never ~/.cache)."""
    if kernels.compiler() is None:
        pytest.skip("no C compiler (cc, gcc, clang): the W2R kernel cannot be built here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.KERNELS_DIR_ENV, str(tmp_path_factory.mktemp("kernels")))
        kernels.build()
        with Scorer.load(serve_artifact, backend="onnxruntime-cpu", threads=2, path="kernel") as scorer:
            assert scorer.path == "kernel", scorer.path_reason
            yield scorer


def test_fp16_rows_halve_the_memory_and_score_as_the_rounded_fp32_rows(kernel_scorer, serve_photos, tmp_path):
    scorer = kernel_scorer
    cache = scorer.encode_images(serve_photos)
    rounded = ImageCache(cache.ids, {k: v.astype(np.float16).astype(np.float32) if k in HALF_ROWS else v
                                     for k, v in cache.arrays.items()}, cache.fingerprint, cache.precision)
    half = Gallery.open(tmp_path / "half", scorer.fingerprint, scorer.cache_precision, row_dtypes=gallery_row_dtypes("fp16", scorer))
    full = Gallery.open(tmp_path / "full", scorer.fingerprint, scorer.cache_precision)
    half.put_rows(cache)
    full.put_rows(rounded)
    view = half.view()
    for name in HALF_ROWS:
        assert view.arrays[name].dtype == np.float16 and view.arrays[name].nbytes * 2 == cache.arrays[name].nbytes
        assert np.array_equal(view.arrays[name].astype(np.float32), rounded.arrays[name])
    queries = [TextQuery(text, top_k=4, rerank_k=6) for text in QUERIES]
    got, want = SearchService(scorer, half).search_texts(queries), SearchService(scorer, full).search_texts(queries)
    assert got == want  # ids, scores and first-stage scores, bit for bit
    exact = SearchService(scorer, Gallery.open(tmp_path / "exact", scorer.fingerprint, scorer.cache_precision))
    exact.gallery.put_rows(cache)
    for g, e in zip(got, exact.search_texts(queries)):  # against unrounded rows: close, not equal
        assert np.allclose([h["score"] for h in g["results"]], [h["score"] for h in e["results"]], atol=1e-2)

    half.put([("late.jpg", ImageCache(["late.jpg"], {k: v[:1] for k, v in cache.arrays.items()}, cache.fingerprint,
                                      cache.precision), None)])  # in the log as encoded (fp32), stored as fp16
    half.checkpoint()
    half.close()
    again = Gallery.open(tmp_path / "half", scorer.fingerprint, scorer.cache_precision, row_dtypes=gallery_row_dtypes("fp16", scorer))
    assert all(again.view().arrays[name].dtype == np.float16 for name in HALF_ROWS) and "late.jpg" in again
    again.close()
    widened = Gallery.open(tmp_path / "half", scorer.fingerprint, scorer.cache_precision)  # without the option: fp32 again
    assert np.array_equal(widened.view().arrays["regions_attn"][:len(cache)], rounded.arrays["regions_attn"])


def test_fp16_rows_need_the_kernel_path(serve_artifact):
    with Scorer.load(serve_artifact, backend="onnxruntime-cpu", threads=1, path="pair") as scorer:
        assert gallery_row_dtypes("fp32", scorer) is None
        with pytest.raises(InputError, match="--gallery-rows fp16: the W2R kernel reads fp16 rows, and this scorer's path is pair"):
            gallery_row_dtypes("fp16", scorer)
