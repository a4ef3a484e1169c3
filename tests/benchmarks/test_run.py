"""The benchmark runner's --quick path on the demo preset with 1-2 timed calls: JSON schema,
target lines, plots; and the GPU script's CPU dry run. No timed assertions."""

from __future__ import annotations

import json

import pytest

import benchmarks.run as bench_run
from benchmarks.run import RunConfig

TINY = RunConfig(presets=("demo",), lengths={"demo": (4, 8)}, batches=(2, 4), repeats=1, min_calls=1, max_seconds=0.1,
                 real_captions={"demo": 12}, precision_images=1, precision_captions=8, e2e_images=10,
                 artifact_precision_images=10, extraction_images=0, synthetic_images=0, square_peak=False, real_min_seconds=0.0,
                 real_block=8)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_run, "QUICK", TINY)
        patch.setenv("BSSAN_KERNELS_DIR", str(root / "kernels"))  # the kernel scorer builds its library here, not in ~/.cache
        patch.setenv("BSSAN_PATHS", str(root / "paths.json"))
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
    assert len(names) == 4 and all(t["verdict"] in ("PASS", "FAIL", "UNVERIFIED") for t in report["targets"])
    engine = next(t for t in report["targets"] if t["target"].startswith("engine's path >= 2x factored-eager"))
    assert engine["verdict"] != "PASS" and "NOT MEASURED" in engine["detail"]  # no ranking check without a model


def test_real_length_pass_is_interleaved_with_its_spread_and_the_engine_as_users_run_it(quick_report):
    _, report = quick_report
    (real,) = report["real_lengths"]
    assert real["images"] == 2 and real["block"] == TINY.real_block and real["rounds"]["rounds"] >= TINY.repeats
    assert len(real["rounds"]["load_1min"]) == real["rounds"]["rounds"]
    for name, row in real["scorers"].items():
        assert row["pairs_per_s_min"] <= row["pairs_per_s"] <= row["pairs_per_s_max"] and row["pass_cpu_s"] > 0
        assert row["block"] == TINY.real_block  # one fixed block for every scorer: no batch choice to flip
    # the engine's fastest validated path: the kernel where it builds here, else the grid graphs (said in its reason)
    from engine.kernels import compiler

    want = "scoring path: kernel (requested)" if compiler() else "scoring path: grid graphs"
    assert want in real["scorers"]["engine"]["reason"]
    assert real["scorers"]["engine"]["max_abs_diff_vs_paper"] < 1e-4 and real["scorers"]["ort-fp32"]["max_abs_diff_vs_paper"] < 1e-4
    # the engine's kernel path on one thread: same scores, or skipped with the reason (no C compiler, a model it does not serve)
    if "kernel" in real["scorers"]:
        kernel = real["scorers"]["kernel"]
        assert kernel["max_abs_diff_vs_paper"] < 1e-4 and kernel["threads"] == 1 and kernel["peak_used"] == "peak_1thread"
        assert list(real["scorers"]).index("kernel") < list(real["scorers"]).index("engine")  # interleaved with the others
    else:
        assert real["skipped"]["kernel"]
    swept = {p["scorer"] for p in report["pair_scoring"][0]["points"]}  # the sweep (the plot vs length) has the kernel too
    assert "kernel" in swept or report["pair_scoring"][0]["skipped"]["kernel"]
    assert report["peak"]["peak_at_start"].keys() == report["peak"]["peak_at_end"].keys()  # measured the same way twice
    assert {k["kernel"] for k in report["peak"]["kernels"]} == {k["kernel"] for k in report["peak"]["kernels_at_end"]}


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
    exhaustive = report["exhaustive"][0]  # every pair of 4 images x 8 captions, one static call per image
    assert (exhaustive["images"], exhaustive["captions"]) == (4, 8) and exhaustive["max_abs_diff_first_row_vs_model"] < 1e-5
    assert (tmp_path / "gpu.png").stat().st_size > 10_000  # the plot beside the JSON


@pytest.mark.parametrize("form", ["tanh", "scaled"])
def test_gpu_static_step_equals_the_model(form):
    pytest.importorskip("torch")
    import torch

    from benchmarks.gpu import StaticPairScorer, make_inputs
    from training.config import preset, replace_strict

    torch.manual_seed(0)
    from training.model import BSSAN

    model = BSSAN(replace_strict(preset("demo"), attention=form, input_scaling=form == "scaled")).eval()
    feeds = make_inputs(model, 5, 6, torch.device("cpu"), torch.float32)
    image, text = feeds.pop("_image"), feeds.pop("_text")
    with torch.no_grad():
        want = model.combine(*model.score_grid_cached(image, text))[0]
        assert torch.allclose(StaticPairScorer(model)(**feeds), want, atol=1e-5)


def test_kernel_scorer_is_skipped_with_the_reason_without_a_compiler(tmp_path, monkeypatch):
    """No C compiler (and no library built yet): the real-length pass lists the kernel scorer as skipped, runs the rest."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import numpy as np

    import engine.kernels
    from benchmarks.pair_scoring import SweepConfig, real_length_pass

    monkeypatch.setenv("BSSAN_KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(engine.kernels, "compiler", lambda: None)
    sweep = SweepConfig(repeats=1, min_calls=1, max_seconds=0.05, real_block=4, real_min_seconds=0.0,
                        real_scorers=("paper-eager", "ort-fp32", "kernel"))
    real = real_length_pass("demo", np.array([2, 3, 4, 5, 6, 7]), sweep, {"peak": {"fp32": 1e11, "int8": 1e11}}, tmp_path,
                            progress=False, images=1)
    assert set(real["scorers"]) == {"paper-eager", "ort-fp32"}
    assert "no C compiler" in real["skipped"]["kernel"]


def test_kernel_scorer_gives_the_paper_scores(tmp_path, monkeypatch):
    """The kernel scorer (ORT image/text and o2w_grid graphs, W2R through the fused kernel) at a hidden size that fills the
    vector width and at the demo preset's 8: MS equal to the paper as written and to the ORT grid graphs."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import numpy as np
    import torch

    from benchmarks.scorers import ScorerUnavailable, export_graphs, make_scorer, random_inputs
    from training.config import preset, replace_strict
    from training.model import BSSAN

    monkeypatch.setenv("BSSAN_KERNELS_DIR", str(tmp_path / "kernels"))
    for k, config in enumerate((replace_strict(preset("demo"), w2r_hidden=16, w2r_mlp=(16, 1)), preset("demo"))):
        torch.manual_seed(k)
        model = BSSAN(config).eval()
        graphs = export_graphs(model, tmp_path / f"graphs{k}")
        try:
            kernel = make_scorer("kernel", model, graphs, 1)
        except ScorerUnavailable as exc:  # e.g. no C compiler on this machine
            pytest.skip(f"kernel scorer unavailable: {exc}")
        inputs = random_inputs(config, np.array([3, 8, 1, 5, 2, 8, 4]), seed=k)
        paper, ort = make_scorer("paper-eager", model, graphs, 1), make_scorer("ort-fp32", model, graphs, 1)
        rows = np.array([6, 0, 3, 2])
        for scorer in (kernel, paper, ort):
            scorer.prepare(inputs)
        got = kernel.score(rows)
        assert kernel.name == "kernel" and got.shape == (4,) and got.dtype == np.float32
        assert np.abs(got - paper.score(rows)).max() <= 1e-4 and np.abs(got - ort.score(rows)).max() <= 1e-5
        out = np.empty((2, len(inputs.lengths)), np.float32)
        kernel.score_pass([np.arange(4), np.arange(4, 7)], 2, out)
        assert np.array_equal(out[0], out[1]) and np.abs(out[0, rows] - got).max() <= 1e-6


def _report(ort_rate: float, identical: bool | None, fraction: float = 0.5) -> dict:
    point = lambda scorer, rate, diff: {"scorer": scorer, "length": 30, "batch": 64, "pairs_per_s": rate,  # noqa: E731
                                        "protocol_pairs_per_s": rate, "max_abs_diff_vs_paper": diff}
    real_row = lambda rate, **extra: {"pairs_per_s": rate, "protocol_pairs_per_s": rate, "fraction_of_peak": fraction,  # noqa: E731
                                      "gflops_per_s": 10.0, "threads": 1, **extra}
    check = ({"skipped": "no model"} if identical is None else
             {"images": 100, "captions": 500, "source": "store", "max_abs_diff": 1e-7, "identical_recall": identical})
    return {"pair_scoring": [{"preset": "flickr8k", "lengths": [30],
                              "points": [point("paper-eager", 100.0, 0.0), point("ort-fp32", 300.0, 1e-7)]}],
            "real_lengths": [{"preset": "flickr8k", "mean_length": 10.8, "images": 2, "captions": 1024,
                              "scorers": {"paper-eager": real_row(100.0), "factored-eager": real_row(1000.0),
                                          "ort-fp32": real_row(ort_rate), "engine": real_row(2 * ort_rate, reason="x; scoring path: grid")}}],
            "peak": {"peak": {"fp32": 1e11}, "peak_kernel": {"fp32": "k"}},
            "end_to_end": {"ranking_check": check}, "precision": {}}


@pytest.mark.parametrize("ort_rate, identical, verdicts", [
    (3100.0, True, ("PASS", "PASS")),             # 3.1x factored-eager, 31x paper-eager, R@K identical
    (3100.0, False, ("FAIL", "FAIL")),            # fast enough, but the grid path ranks differently
    (2500.0, True, ("PASS", "FAIL")),             # 2.5x and 25x
    (3100.0, None, ("UNVERIFIED", "UNVERIFIED")),  # no reference model: ranking not checked
])
def test_target_verdicts(ort_rate, identical, verdicts):
    rows = bench_run.evaluate_targets(_report(ort_rate, identical), TINY)
    first, eager, paper, peak = rows
    assert first["verdict"] == "PASS" and first["ratio"] == pytest.approx(3.0)
    assert (eager["verdict"], paper["verdict"]) == verdicts
    assert eager["ratio"] == pytest.approx(ort_rate / 1000.0) and paper["ratio"] == pytest.approx(ort_rate / 100.0)
    assert peak["verdict"] == "PASS" and peak["ratio"] == 0.5
    assert bench_run.evaluate_targets(_report(3100.0, True, fraction=0.3), TINY)[3]["verdict"] == "FAIL"


def _with_kernel(report: dict, kernel_rate: float, kernel_equal: bool | None, kernel_diff: float = 1e-7) -> dict:
    """_report plus the kernel scorer in the real-length pass and, unless kernel_equal is None (kernel not checked), the
    end-to-end check's three paths."""
    real = report["real_lengths"][0]["scorers"]
    real["ort-fp32-pair"] = {**real["ort-fp32"], "pairs_per_s": 1500.0, "protocol_pairs_per_s": 1500.0}
    real["kernel"] = {**real["ort-fp32"], "pairs_per_s": kernel_rate, "protocol_pairs_per_s": kernel_rate,
                      "max_abs_diff_vs_paper": kernel_diff}
    check = report["end_to_end"]["ranking_check"]
    if "skipped" not in check and kernel_equal is not None:
        check.update(paths=["grid", "pair", "kernel"], max_abs_diff_vs_grid={"pair": 1e-7, "kernel": 2e-7},
                     recall_equal_to_grid={"grid": True, "pair": True, "kernel": kernel_equal},
                     identical_recall=check["identical_recall"] and kernel_equal)
    elif "skipped" not in check:
        check["kernel"] = {"skipped": "path 'kernel': no C compiler"}
    return report


@pytest.mark.parametrize("kernel_equal, identical, kernel_diff, engine_path, verdicts", [
    (True, True, 1e-7, "kernel", ("PASS", "PASS")),         # the kernel validated and fastest: the engine's path
    (False, True, 1e-7, "ort-fp32", ("FAIL", "FAIL")),      # its R@K differ from grid's: not the engine's path, and not equal
    (True, True, 1e-3, "ort-fp32", ("PASS", "FAIL")),       # its scores differ from the paper's: not validated
    (None, True, 1e-7, "ort-fp32", ("PASS", "FAIL")),       # the end-to-end check could not time it: not the engine's path
    (True, None, 1e-7, "kernel", ("UNVERIFIED", "UNVERIFIED")),  # no ranking check: the fastest with equal scores
])
def test_targets_take_the_fastest_validated_engine_path(kernel_equal, identical, kernel_diff, engine_path, verdicts):
    report = _with_kernel(_report(2500.0, identical), 4000.0, kernel_equal, kernel_diff)
    rate = report["real_lengths"][0]["scorers"][engine_path]["protocol_pairs_per_s"]
    assert bench_run._engine_graphs_name(report["real_lengths"][0], report["end_to_end"]["ranking_check"]) == engine_path
    _, eager, paper, peak = bench_run.evaluate_targets(report, TINY)
    assert (eager["verdict"], paper["verdict"]) == verdicts
    assert eager["ratio"] == pytest.approx(rate / 1000.0) and paper["ratio"] == pytest.approx(rate / 100.0)
    assert f"engine's path: {engine_path}" in eager["detail"] and f"({engine_path})" in peak["detail"]
    if kernel_equal is not None and identical is not None:
        assert "kernel 2e-07" in eager["detail"]  # max |score diff| of each path vs grid
    if kernel_equal is None:
        assert "kernel not checked: path 'kernel': no C compiler" in eager["detail"]


def test_compare_agrees_within_the_tolerance(tmp_path, capsys):
    from benchmarks.compare import main

    a, b = _report(3000.0, True), _report(3300.0, True)
    for report, name in ((a, "a.json"), (b, "b.json")):
        report.update({"machine": {"date_utc": "now", "load_average_at_start": [1.0]}, "load_average_at_end": [1.5]})
        (tmp_path / name).write_text(json.dumps(report))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0  # 10% apart
    assert "PASS (wall): 4/4 scorers agree within 15%" in capsys.readouterr().out
    b["real_lengths"][0]["scorers"]["ort-fp32"]["pairs_per_s"] = 4000.0
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "[DIFFER] flickr8k  ort-fp32" in capsys.readouterr().out
    for report, name in ((a, "a.json"), (b, "b.json")):  # the CPU-time basis: same pairs per CPU-second in both runs
        for row in report["real_lengths"][0]["scorers"].values():
            row["pairs_per_cpu_s"] = 5000.0
        (tmp_path / name).write_text(json.dumps(report))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--basis", "cpu"]) == 0
    assert "pairs per CPU-second: 4/4" in capsys.readouterr().out
    assert main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2


def test_profile_times_every_pair_and_grid_graph_per_node(demo_artifact):
    from benchmarks.profile import profile_artifact

    report = profile_artifact(demo_artifact, captions=8, length=4, calls=2)
    assert set(report["graphs"]) == {"w2r_pair", "w2r_grid", "o2w_pair", "o2w_grid"}
    for name, graph in report["graphs"].items():
        assert graph["cpu_ms_per_call"] > 0 and graph["wall_ms_per_call"] > 0 and graph["nodes"]
    assert "If" in report["graphs"]["w2r_pair"]["by_op"] and "If" not in report["graphs"]["w2r_grid"]["by_op"]
    assert report["graphs"]["w2r_grid"]["by_op"]["Gemm"]["nodes_per_call"] >= 4  # one step Gemm per word (inside the Loop)
