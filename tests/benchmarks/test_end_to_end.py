"""End-to-end benchmark parts on the tiny synthetic store and the demo artifact (random weights)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.end_to_end import (
    FLICKR8K_TEST_LENGTH_HISTOGRAM, flickr8k_test_lengths, resolve_artifact, run_end_to_end,
)


def test_lengths_fall_back_to_the_documented_histogram(tmp_path):
    lengths, source = flickr8k_test_lengths(500, 30, store=tmp_path / "none", data=tmp_path / "none")
    assert "HISTOGRAM" in source and len(lengths) == 500
    assert set(lengths.tolist()) <= set(FLICKR8K_TEST_LENGTH_HISTOGRAM)
    assert flickr8k_test_lengths(500, 12, store=tmp_path / "none", data=tmp_path / "none")[0].max() <= 12


def test_missing_model_is_a_skip_with_the_reason(tmp_path):
    assert resolve_artifact(tmp_path / "no-artifact", tmp_path / "no-model", tmp_path)[0] is None
    report = run_end_to_end(tmp_path / "no-artifact", tmp_path / "no-model", tmp_path / "no-store", tmp_path / "no-data",
                            10, (10,), ("fp32",), 0, tmp_path, 1)
    assert "no reference model" in report["retrieval"]["skipped"]
    assert "not asked for" in report["extraction"]["skipped"]


def test_retrieval_and_precision_on_the_demo_artifact(demo_artifact, tiny_store, tmp_path):
    from benchmarks.precision import artifact_precision

    report = run_end_to_end(demo_artifact, tmp_path / "unused", tiny_store, tmp_path / "no-data", 10, (10, 50),
                            ("fp32", "int8"), 0, tmp_path, 1)
    runs = report["retrieval"]["runs"]
    assert [r["precision"] for r in runs] == ["fp32", "int8"]
    for run in runs:
        assert run["images"] == 10 and run["captions"] == 50
        assert set(run["exhaustive"]["metrics"]) == {"i2t", "t2i", "rsum", "protocol"}  # engine.ranking's metrics
        assert set(run["shortlist"]) == {"k10", "k50"}
        # a shortlist as long as the gallery re-ranks everything: the exhaustive R@1
        assert run["shortlist"]["k50"]["i2t"]["r1"] == pytest.approx(run["exhaustive"]["metrics"]["i2t"]["r1"])
        assert run["shortlist"]["k50"]["rsum"] == pytest.approx(run["exhaustive"]["metrics"]["rsum"])
        assert run["shortlist"]["k10"]["protocol"]["k"] == 10
    compared = artifact_precision(demo_artifact, tiny_store, 10, threads=1, progress=False)
    assert compared["precisions"]["fp32"]["metrics"]["rsum"] >= 0
    for name in ("fp16", "int8"):
        entry = compared["precisions"][name]
        assert 0.0 <= entry["i2t"]["topk_overlap"] <= 1.0 and -1.0 <= entry["t2i"]["kendall_tau"] <= 1.0
        assert set(entry["recall_change"]) == {"i2t", "t2i", "rsum"}


def test_synthetic_protocol_timing_without_model_or_store(tmp_path, monkeypatch):
    """The random-weight timing path at the demo preset (flickr8k sizes run in the benchmark itself)."""
    pytest.importorskip("onnx")
    report = run_end_to_end(tmp_path / "no-artifact", tmp_path / "no-model", tmp_path / "no-store", tmp_path / "no-data",
                            12, (10,), ("fp32",), 0, tmp_path, 1, synthetic_images=12, synthetic_preset="demo")
    synthetic = report["synthetic_retrieval"]
    assert "TIMING ONLY" in synthetic["note"] and "skipped" in report["retrieval"]
    (run,) = synthetic["runs"]
    assert run["images"] == 12 and run["captions"] == 60 and run["exhaustive"]["pairs_per_s"] > 0
    assert run["projected_1k_x_5k_exhaustive_s"] == pytest.approx(5e6 / run["exhaustive"]["pairs_per_s"])
    assert set(run["shortlist"]) == {"k10"}
