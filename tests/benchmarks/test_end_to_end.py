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


def test_retrieval_and_precision_on_the_demo_artifact(demo_artifact, tiny_store, tmp_path, monkeypatch):
    from benchmarks.precision import artifact_precision

    monkeypatch.setenv("BSSAN_KERNELS_DIR", str(tmp_path / "kernels"))  # the ranking check builds the kernel here
    monkeypatch.setenv("BSSAN_PATHS", str(tmp_path / "paths.json"))  # and records its choice here, not in ~/.cache
    report = run_end_to_end(demo_artifact, tmp_path / "unused", tiny_store, tmp_path / "no-data", 10, (10, 50),
                            ("fp32", "int8"), 0, tmp_path, 1)
    check = report["ranking_check"]
    assert check["paths"][:2] == ["grid", "pair"] and set(check["pairs_per_s"]) == set(check["paths"])
    if "kernel" not in check["paths"]:
        assert check["kernel"]["skipped"]  # e.g. no C compiler: the two graph paths still checked
    assert set(check["max_abs_diff_vs_grid"]) == set(check["paths"]) - {"grid"}
    assert check["max_abs_diff"] == check["max_abs_diff_vs_grid"]["pair"] and max(check["max_abs_diff_vs_grid"].values()) < 1e-4
    assert check["identical_recall"] == all(check["recall_equal_to_grid"].values())
    assert check["faster"] in check["paths"] and check["recorded_in"] == str(tmp_path / "paths.json")
    assert all(f"{p} " in check["reason"] for p in check["paths"])  # every timed path's pairs/s
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


def test_ranking_check_goes_on_without_the_kernel(demo_artifact, tiny_store, tmp_path, monkeypatch):
    """No C compiler and no library: the kernel path is {"skipped": reason}; grid and pair are timed, and the faster
    of those is recorded for the engine (engine.paths)."""
    import json

    import engine.kernels
    from benchmarks.end_to_end import path_check

    monkeypatch.setenv("BSSAN_KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("BSSAN_PATHS", str(tmp_path / "paths.json"))
    monkeypatch.setattr(engine.kernels, "compiler", lambda: None)
    check = path_check(demo_artifact, tiny_store, 4, rounds=1)
    assert "no C compiler" in check["kernel"]["skipped"] and check["paths"] == ["grid", "pair"]
    assert check["faster"] in ("grid", "pair") and "kernel not timed" in check["reason"]
    (entry,) = json.loads((tmp_path / "paths.json").read_text()).values()
    assert entry["path"] == check["faster"] and set(entry["measured"]) == {"grid", "pair"}


def test_the_recorded_path_is_the_fastest_that_ranks_as_grid_does():
    from benchmarks.end_to_end import fastest_equal_to_grid

    rates = {"grid": 100.0, "pair": 80.0, "kernel": 300.0}
    assert fastest_equal_to_grid(rates, {"grid": True, "pair": True, "kernel": True}) == ("kernel", [])
    assert fastest_equal_to_grid(rates, {"grid": True, "pair": True, "kernel": False}) == ("grid", ["kernel"])
    assert fastest_equal_to_grid({"grid": 100.0, "pair": 120.0}, {"grid": True, "pair": True}) == ("pair", [])
    assert fastest_equal_to_grid({"grid": 100.0, "pair": 120.0}, {"pair": False}) == ("grid", ["pair"])
