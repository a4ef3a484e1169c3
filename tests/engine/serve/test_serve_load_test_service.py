"""benchmarks.load_test's service part (search_texts in process, batches of 1, 4 and 16 at each
--service-rerank-k) on the serve artifact's small gallery: every (K, batch) point is there, and the bound it
reports per K is the mean CPU per query at batch 1 over the mean at batch 16 of that K's passes. Its timings are
the benchmark's business, not asserted here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from benchmarks import load_test  # noqa: E402
from engine.runtime import Scorer  # noqa: E402
from engine.serve.gallery import Gallery  # noqa: E402


def test_service_part_reports_each_k_and_its_batching_bound(serve_artifact, serve_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(load_test, "WORK", tmp_path)
    folder = load_test.index_dir(len(serve_photos), serve_artifact)
    with Scorer.load(serve_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        gallery = Gallery.open(folder, scorer.fingerprint, scorer.cache_precision)
        gallery.put_rows(scorer.encode_images(serve_photos))
        gallery.close()
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"photo{i}.jpg#0\ta photo number {i} of a cat on a table\n" for i in range(40)), encoding="utf-8")
    args = SimpleNamespace(gallery_size=len(serve_photos), captions=captions, service_rerank_k=[4, 2, 4], threads=1, path="auto")

    report = load_test.run_service(args, serve_artifact)

    assert [(p["rerank_k"], p["batch"]) for p in report["points"]] == [(k, b) for k in (4, 2, 4) for b in (1, 4, 16)]
    assert all(p["queries"] >= 16 and p["cpu_ms_per_query"] >= 0 for p in report["points"])
    for k in (4, 2):
        one, full = (np.mean([p["cpu_ms_per_query"] for p in report["points"] if (p["rerank_k"], p["batch"]) == (k, b)]) for b in (1, 16))
        assert report["batch16_vs_batch1_cpu"][str(k)] == pytest.approx(one / full, abs=0.006)  # rounded to 0.01
    load_test.plot({"service": report}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
