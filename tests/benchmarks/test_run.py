"""The benchmark runner's --quick path on the demo preset with 1-2 timed calls: JSON schema,
target lines, plots; and the GPU script's CPU dry run. No timed assertions."""

from __future__ import annotations

import json

import pytest

import benchmarks.run as bench_run
from benchmarks.run import RunConfig

TINY = RunConfig(presets=("demo",), lengths={"demo": (4, 8)}, batches=(2, 4), repeats=1, min_calls=1, max_seconds=0.1,
                 real_captions={"demo": 12}, precision_images=1, precision_captions=8, e2e_images=10,
                 artifact_precision_images=10, extraction_images=0, synthetic_images=0, square_peak=False)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_run, "QUICK", TINY)
        code = bench_run.main(["--quick", "--presets", "demo", "--threads", "1", "--json", str(root / "out.json"),
                               "--artifact", str(root / "none"), "--model", str(root / "none"), "--store", str(root / "none")])
    assert code == 0
    return root, json.loads((root / "out.json").read_text())


def test_report_schema(quick_report):
    _, report = quick_report
    assert {"cpu", "cores", "versions", "git", "date_utc"} <= set(report["machine"])
    assert report["peak"]["peak"]["fp32"] > 0 and report["peak"]["peak"]["int8"] > 0
    (sweep,) = report["pair_scoring"]
    assert sweep["preset"] == "demo" and sweep["weights"].startswith("random")
    scorers = {p["scorer"] for p in sweep["points"]}
    assert {"paper-eager", "factored-eager", "ort-fp32", "ort-int8-recurrence"} <= scorers
    assert len(sweep["points"]) == 2 * 2 * len(scorers)  # lengths x batches x scorers
    for point in sweep["points"]:
        assert point["pairs_per_s"] > 0 and point["latency_p90_s"] >= point["latency_median_s"] > 0
        assert point["flops_per_pair"] > 0 and 0 < point["fraction_of_peak"]
        if point["scorer"] in ("factored-eager", "ort-fp32"):
            assert point["max_abs_diff_vs_paper"] < 1e-4  # same model, same scores
    (real,) = report["real_lengths"]
    assert real["captions"] == 12 and "paper-eager" in real["scorers"]
    (random_weights,) = report["precision"]["random_weights"]
    assert random_weights["variants"]["ort-fp16"]["topk_overlap"] >= 0
    assert "skipped" in report["precision"]["artifact"] and "skipped" in report["end_to_end"]["retrieval"]


def test_targets_are_ratios_with_verdicts(quick_report, capsys):
    _, report = quick_report
    names = [t["target"] for t in report["targets"]]
    assert len(names) == 3 and all(t["verdict"] in ("PASS", "FAIL", "UNVERIFIED") for t in report["targets"])
    best = next(t for t in report["targets"] if t["target"].startswith("best CPU path"))
    assert best["verdict"] != "PASS" or "identical to fp32" in best["detail"]  # no accuracy figure without a model


def test_plots_written(quick_report):
    root, _ = quick_report
    pngs = sorted(p.name for p in (root / "out-plots").glob("*.png"))
    assert {"pairs_per_s_vs_length.png", "latency_vs_batch.png", "fraction_of_peak.png", "precision_agreement.png"} <= set(pngs)
    assert all((root / "out-plots" / p).stat().st_size > 1000 for p in pngs)


def test_bad_threads_is_one_line_error(tmp_path, capsys):
    assert bench_run.main(["--quick", "--threads", "zero", "--json", str(tmp_path / "x.json")]) == 2
    assert "expected a positive integer or auto" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_gpu_script_dry_run_on_cpu(tmp_path):
    pytest.importorskip("torch")
    from benchmarks.gpu import main

    assert main(["--device", "cpu", "--tiny", "--dtypes", "fp32", "--json", str(tmp_path / "gpu.json")]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["status"] == "done" and report["note"] == "dry run on CPU"
    assert len(report["points"]) == 2 and all(p["max_abs_diff_vs_model"] < 1e-5 for p in report["points"])
    assert report["peak"]["fp32"] > 0 and report["paper_as_written"]["pairs_per_s"] > 0
    assert "skipped" in report["tensorrt"] or "fp32" in report["tensorrt"]


def _report(best_rate: float, r1_change: float | None, artifact_hidden: int = 128) -> dict:
    config = {"region_count": 49, "region_dim": 1280, "object_count": 10, "object_dim": 1280, "word_dim": 50,
              "w2r_hidden": 128, "o2w_hidden": 64}
    point = lambda scorer, rate, diff: {"scorer": scorer, "length": 30, "batch": 64, "pairs_per_s": rate,  # noqa: E731
                                        "protocol_pairs_per_s": rate, "max_abs_diff_vs_paper": diff}
    real_row = lambda rate: {"pairs_per_s": rate, "protocol_pairs_per_s": rate, "fraction_of_peak": 0.5,  # noqa: E731
                             "gflops_per_s": 10.0, "precision_of": {"w2r.recurrence": "int8"}}
    artifact = {"skipped": "no model"} if r1_change is None else {
        "images": 1000, "artifact": "a", "model_config": {**config, "w2r_hidden": artifact_hidden},
        "precisions": {"int8": {"recall_change": {"i2t": {"r1": 0.1}, "t2i": {"r1": r1_change}}}}}
    return {"pair_scoring": [{"preset": "flickr8k", "lengths": [30], "config": config,
                              "points": [point("paper-eager", 100.0, 0.0), point("ort-fp32", 300.0, 1e-7)]}],
            "real_lengths": [{"preset": "flickr8k", "mean_length": 10.8,
                              "scorers": {"paper-eager": real_row(100.0), "ort-int8-recurrence": real_row(best_rate)}}],
            "precision": {"artifact": artifact}}


@pytest.mark.parametrize("best_rate, r1_change, hidden, verdict", [
    (1600.0, 0.2, 128, "PASS"),        # 16x, R@1 within 0.3 of fp32
    (1600.0, -0.4, 128, "FAIL"),       # fast enough, R@1 moved too much
    (1400.0, 0.0, 128, "FAIL"),        # 14x
    (1600.0, None, 128, "UNVERIFIED"),  # no reference model: accuracy not measured
    (1600.0, 0.0, 256, "UNVERIFIED"),  # the reference model has other sizes than the preset measured
])
def test_target_verdicts(best_rate, r1_change, hidden, verdict):
    rows = bench_run.evaluate_targets(_report(best_rate, r1_change, hidden), TINY)
    first, best, peak = rows
    assert first["verdict"] == "PASS" and first["ratio"] == pytest.approx(3.0)
    assert best["verdict"] == verdict and best["ratio"] == pytest.approx(best_rate / 100.0)
    assert peak["verdict"] == "FAIL" and peak["ratio"] == 0.5
