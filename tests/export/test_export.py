"""python -m export: the artifact of a demo checkpoint, its declared I/O, parity with the torch model,
and the CLI's one-line errors. The artifact is exported once per session (tests/conftest.py demo_artifact)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch (pip install 'bssan-engine[export]')")
onnx = pytest.importorskip("onnx", reason="export needs onnx (the export extra)")

from engine.artifact import MANIFEST_NAME, load_artifact  # noqa: E402
from engine.errors import ArtifactError  # noqa: E402
from engine.graphs import DYNAMIC_AXES, GRAPHS  # noqa: E402
from export.__main__ import main  # noqa: E402
from export.graphs import build_graph_modules, fold_mlp, graph_dims  # noqa: E402
from export.onnx_export import OPSET, check_graph_io, export_graph  # noqa: E402
from export.validate import (  # noqa: E402
    PARITY_TOLERANCE, open_session, pipeline_parity, random_features, store_features, torch_threads, validate_bssan,
)
from training.checkpoint import load_checkpoint  # noqa: E402
from training.config import preset, replace_strict  # noqa: E402
from training.model import BSSAN, MLP  # noqa: E402

REAL_STORE = __import__("pathlib").Path(__file__).resolve().parents[2] / "stores" / "flickr8k"


@pytest.fixture(scope="module")
def artifact(demo_artifact):
    return load_artifact(demo_artifact)


@pytest.fixture(scope="module")
def demo_model(demo_artifact):
    return load_checkpoint(demo_artifact.parent / "bssan").model


def test_manifest(artifact):
    m = artifact.manifest
    assert m["precisions"] == ["fp32", "fp16", "int8"]
    assert set(m["graphs"]) == set(GRAPHS)
    assert all(set(v) >= {"fp32", "fp16"} for n, v in m["graphs"].items() if GRAPHS[n].stage != "grid")
    assert all(set(v) == {"fp32"} for n, v in m["graphs"].items() if GRAPHS[n].stage == "grid")  # GRID_PRECISIONS
    assert [n for n, v in m["graphs"].items() if "int8" in v] == ["w2r_pair"]  # recurrence scope: o2w has none
    assert m["w2r_values"] == "regions"  # demo: 4H = 32 > M = 16
    assert m["dims"]["w2r_values"] == m["dims"]["region_dim"]
    assert m["model"]["score_weights"] == {"w2r": 1.0, "o2w": 0.6}
    assert m["exporter"]["opset"] == OPSET and m["exporter"]["versions"]["torch"]
    assert m["word_features"]["name"] == "glove50"
    assert m["preprocessing"] == {"name": "synthetic", "seed": 0}  # the store's extractor section
    assert m["tensorrt"]["status"].startswith("skipped: tensorrt is not installed")
    assert max(m["parity_max_abs_diff"]["fp32"].values()) <= PARITY_TOLERANCE
    listed = {p for p in m["files"]}
    assert "validation.json" in listed and all(v["file"] in listed for g in m["graphs"].values() for v in g.values())


def test_every_graph_has_its_declared_io_and_symbolic_dims(artifact):
    for name, variants in artifact.manifest["graphs"].items():
        for precision in variants:
            path = artifact.graph_path(name, precision)
            check_graph_io(path, GRAPHS[name], artifact.dims, precision)
            model = onnx.load(str(path))
            for value in [*model.graph.input, *model.graph.output]:
                declared = next(t for t in (*GRAPHS[name].inputs, *GRAPHS[name].outputs) if t.name == value.name)
                dims = value.type.tensor_type.shape.dim
                for axis, want in enumerate(declared.dims):
                    if want in DYNAMIC_AXES:
                        assert dims[axis].dim_param == want, (name, precision, value.name, axis)


def test_frozen_axis_is_caught(tmp_path, demo_model):
    module = build_graph_modules(demo_model)["w2r_text"]
    path = tmp_path / "frozen.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 5, demo_model.config.word_dim),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["words"], output_names=["gates_words"],
                          dynamic_axes={"words": {0: "captions"}, "gates_words": {0: "captions"}})  # words axis left out
    with pytest.raises(ArtifactError, match=r"words has dims \['captions', 5, 12\]; expected \['captions', 'words', 12\]"):
        check_graph_io(path, GRAPHS["w2r_text"], graph_dims(demo_model), "fp32")


def test_bilstm_export_prints_no_shape_inference_page(tmp_path, demo_model, capfd):
    """The legacy exporter's prim::PackPadded / PadPacked C++ warnings are dropped (export/onnx_export.py)."""
    module = build_graph_modules(demo_model)["o2w_text"]
    export_graph(module, "o2w_text", graph_dims(demo_model), tmp_path / "o2w_text.onnx", "fp32")
    err = capfd.readouterr().err
    assert "PackPadded" not in err and "PadPacked" not in err


def test_fp16_graphs_are_float16_except_scores(artifact):
    for name in ("w2r_pair", "o2w_text", "shortlist_text"):
        model = onnx.load(str(artifact.graph_path(name, "fp16")))
        types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        for tensor in (*GRAPHS[name].inputs, *GRAPHS[name].outputs):
            want = {"float16": 10, "float32": 1, "int64": 7}[str(tensor.numpy_dtype("fp16"))]
            assert types[tensor.name] == want, (name, tensor.name)


def test_validation_cases_and_real_store_case(artifact):
    report = json.loads((artifact.root / "validation.json").read_text())
    cases = report["fp32"]["pipeline"]
    assert {"batch1_len1", "batch1_len5", "batch1_len30", "batch4_len1", "batch4_len5", "batch4_len30", "store_test"} <= set(cases)
    assert all(max(c.values()) <= PARITY_TOLERANCE for c in cases.values())
    assert set(report["fp16"]["decisions"]) == {"w2r_pair", "o2w_text", "shortlist_text"}


def test_composed_onnx_pipeline_equals_unfactored_model(artifact, demo_model):
    """image graph + text graph + pair graph == reference_scores (the paper as written), on new
    inputs: one image row (the shared-values path) and several (the per-pair gather path)."""
    sessions = {n: open_session(artifact.graph_path(n)) for n in artifact.graph_names}
    for images, captions, length in ((1, 7, 30), (3, 5, 9), (2, 1, 1)):
        with torch_threads():
            report = pipeline_parity(demo_model, sessions, random_features(demo_model, images, captions, length, seed=7), seed=7)
        assert max(report.values()) <= PARITY_TOLERANCE, report
        assert set(report) == {"w2r", "o2w", "ms"}


@pytest.mark.parametrize("hidden", [4, 8])  # 4: 4H = M (gates mode, G cached); 8: 4H > M (regions mode)
def test_w2r_both_value_modes(tmp_path, hidden):
    torch.manual_seed(hidden)
    model = BSSAN(replace_strict(preset("demo"), w2r_hidden=hidden, variant="w2r")).eval()
    assert model.w2r.pair_gathers_gates == (hidden == 4)
    dims = graph_dims(model)
    modules = build_graph_modules(model)
    assert set(modules) == {"w2r_image", "w2r_text", "w2r_pair", "w2r_grid"}  # an unbuilt branch exports nothing
    paths = {n: export_graph(m, n, dims, tmp_path / f"{n}.onnx", "fp32") for n, m in modules.items()}
    report = validate_bssan(model, modules, paths, dims)
    assert report["worst"]["pipeline.w2r"] <= PARITY_TOLERANCE
    assert report["worst"]["w2r_grid.scores"] <= PARITY_TOLERANCE  # the hand-written grid graph vs W2RPair, both modes


def test_parity_failure_lists_every_output(tmp_path, demo_model, artifact):
    broken = BSSAN(demo_model.config).eval()
    broken.load_state_dict(demo_model.state_dict())
    with torch.no_grad():
        broken.o2w.attn_weight.add_(0.5)  # the graphs were exported from demo_model, not this one
    modules = build_graph_modules(demo_model)
    paths = {n: artifact.graph_path(n) for n in modules}
    with pytest.raises(ArtifactError, match=r"fp32 parity failed \(tolerance 0.0001\): max \|diff\| .*pipeline.o2w [0-9.e-]+"):
        validate_bssan(broken, modules, paths, artifact.dims)


def test_batchnorm_fold_matches_eval_mlp():
    from tests.conftest import randomize_batchnorm

    torch.manual_seed(0)
    mlp = MLP(6, (5, 4, 1)).eval()
    randomize_batchnorm(mlp, seed=3)
    x = torch.randn(7, 6)
    z = x
    for k, (w, b) in enumerate(fold_mlp(mlp)):
        z = (torch.tanh(z) if k else z) @ w.t() + b
    assert torch.allclose(z[:, 0], mlp(x), atol=1e-5)


def _real_test_split():
    from engine.errors import StoreError
    from engine.store import FeatureStore

    try:
        return FeatureStore(REAL_STORE).split("test")
    except StoreError:
        return None


@pytest.mark.skipif(_real_test_split() is None, reason=f"no Flickr8K feature store with a test split at {REAL_STORE}")
def test_real_flickr8k_features(demo_artifact):
    from training.config import input_sizes_of_split, with_input_sizes

    split = _real_test_split()
    word_set = "glove50" if "glove50" in split.word_sets else split.word_sets[0]
    config = with_input_sizes(preset("demo"), input_sizes_of_split(split, word_set))
    torch.manual_seed(0)
    model = BSSAN(config).eval()
    modules = build_graph_modules(model)
    dims = graph_dims(model)
    paths = {n: export_graph(m, n, dims, demo_artifact.parent / "real" / f"{n}.onnx", "fp32") for n, m in modules.items()}
    sessions = {n: open_session(p) for n, p in paths.items()}
    with torch_threads():
        report = pipeline_parity(model, sessions, store_features(REAL_STORE, word_set, images=3))
    assert max(report.values()) <= PARITY_TOLERANCE, report


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_exports_and_replaces_an_artifact(demo_artifact, tmp_path, capsys):
    out = tmp_path / "a"
    assert main([str(demo_artifact.parent / "bssan"), "--out", str(out), "--tensorrt", "off", "--no-progress"]) == 0
    assert "graphs (fp32); fp32 parity max |diff|" in capsys.readouterr().out
    first = json.loads((out / MANIFEST_NAME).read_text())["created_utc"]
    assert main([str(demo_artifact.parent / "bssan"), "--out", str(out), "--tensorrt", "off", "--no-progress"]) == 0
    assert load_artifact(out).manifest["precisions"] == ["fp32"] and first
    assert not list(tmp_path.glob(".a.*"))  # no temp or backup directory left behind


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"no such checkpoint directory"),
    ("dual_encoder", r"a dual_encoder checkpoint; expected a BSSAN checkpoint"),
    ("not_artifact", r"exists and is not an artifact directory"),
    ("tensorrt_on", r"--tensorrt on: tensorrt is not installed"),
    ("shortlist_kind", r"a bssan checkpoint; expected a dual_encoder for --shortlist"),
])
def test_cli_errors_are_one_line(demo_artifact, tmp_path, capsys, case, pattern):
    if case == "tensorrt_on" and __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    model_dir = demo_artifact.parent / ("shortlist" if case == "dual_encoder" else "bssan")
    args = [str(tmp_path / "nope") if case == "missing" else str(model_dir), "--out", str(tmp_path / "out"), "--no-progress"]
    if case == "not_artifact":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mine.txt").write_text("user data")
    if case == "tensorrt_on":
        args += ["--tensorrt", "on"]
    if case == "shortlist_kind":
        args += ["--shortlist", str(demo_artifact.parent / "bssan")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(pattern, err), err
    if case == "not_artifact":
        assert (tmp_path / "out" / "mine.txt").read_text() == "user data"


def test_corrupt_graph_in_exported_artifact(demo_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_artifact, copy)
    path = copy / "graphs" / "o2w_text.fp32.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="o2w_text.fp32.onnx: 100 bytes, expected"):
        load_artifact(copy)
    np.testing.assert_equal(load_artifact(demo_artifact).dims["max_words"], 30)


def test_assets_are_copied_with_their_manifests(tmp_path):
    from export.pipeline import _copy_assets

    source = tmp_path / "assets"
    source.mkdir()
    (source / "roi_align.onnx").write_bytes(b"graph")
    (source / "roi_align.json").write_text(json.dumps({"kind": "roi_align", "graph": "roi_align.onnx"}))
    (source / "orphan.json").write_text(json.dumps({"kind": "x", "graph": "missing.onnx"}))  # no graph: skipped
    (source / "broken.json").write_text("{")  # not JSON: skipped
    assets = _copy_assets(source, tmp_path / "artifact" / "assets")
    assert assets == {"roi_align": {"graph": "assets/roi_align.onnx", "manifest": "assets/roi_align.json", "kind": "roi_align"}}
    assert (tmp_path / "artifact" / "assets" / "roi_align.onnx").read_bytes() == b"graph"
    assert _copy_assets(tmp_path / "none", tmp_path / "x") == {}


@pytest.mark.parametrize("attention", ["tanh", "scaled"])
def test_input_scales_and_attention_temperature_fold_into_the_graphs(tmp_path, attention):
    """The issue-10 model (per-channel input scales, learnable attention temperature) exports to the same
    graphs as the paper's form: folded() moves scales and tau into the weights; parity holds."""
    torch.manual_seed(3)
    config = replace_strict(preset("demo"), input_scaling=True, attention=attention)
    model = BSSAN(config).eval()
    rng = np.random.default_rng(0)
    model.set_input_scales({"regions": rng.uniform(0.2, 5, config.region_dim), "objects": rng.uniform(0.2, 5, config.object_dim),
                            "words": rng.uniform(0.2, 5, config.word_dim)})
    if attention == "scaled":
        with torch.no_grad():
            model.w2r.attn_log_temperature.fill_(1.3)
            model.o2w.attn_log_temperature.fill_(-0.4)
    dims = graph_dims(model)
    modules = build_graph_modules(model)
    paths = {n: export_graph(m, n, dims, tmp_path / f"{n}.onnx", "fp32") for n, m in modules.items()}
    report = validate_bssan(model, modules, paths, dims)
    assert max(v for k, v in report["worst"].items() if k.startswith("pipeline")) <= PARITY_TOLERANCE, report["worst"]


def test_score_weights_chosen_on_dev_reach_the_manifest_and_the_engine(demo_artifact, tiny_store, tmp_path):
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from engine.files import file_sha256
    from training.evaluate import branch_scores

    bssan = tmp_path / "bssan"
    shutil.copytree(demo_artifact.parent / "bssan", bssan)
    (bssan / "score_weights.json").write_text(json.dumps({"w2r": 1.0, "o2w": 2.4, "weights_sha256": file_sha256(bssan / "weights.pt")}))
    out = tmp_path / "a"
    assert main([str(bssan), "--out", str(out), "--tensorrt", "off", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model"]["score_weights"] == {"w2r": 1.0, "o2w": 2.4}
    assert manifest["model"]["checkpoint"]["score_weights"] == [1.0, 2.4]
    split = FeatureStore(tiny_store).split("test")
    y, yp = branch_scores(load_checkpoint(demo_artifact.parent / "bssan").model, split, "glove50", 4)
    with Scorer.load(out, backend="onnxruntime-cpu", threads=1, fusion=False) as scorer:
        got = scorer.score_matrix(scorer.encode_images(split), scorer.encode_captions(split))[:4, :20]
    np.testing.assert_allclose(got, y + 2.4 * yp, rtol=0, atol=1e-4)


def test_hub_bank_reaches_the_manifest_and_the_engine_applies_it_in_every_path(demo_artifact, tiny_store, tmp_path):
    from engine.hub import HUB_OFFSET, HubBank
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from engine.files import file_sha256
    from training.evaluate import score_split

    bssan = tmp_path / "bssan"
    shutil.copytree(demo_artifact.parent / "bssan", bssan)
    train = FeatureStore(tiny_store).split("train")
    rows = np.arange(10)
    lengths = np.asarray(train.lengths)[rows]
    model = load_checkpoint(bssan).model
    HubBank.from_padded(np.asarray(train.words("glove50"))[rows], lengths, 3, 0.7,
                        {"weights_sha256": file_sha256(bssan / "weights.pt"), "score_weights": list(model.scoring_weights)},
                        regions=np.asarray(train.regions[:4]), objects=np.asarray(train.objects[:4]), text_k=2, gamma=0.4
                        ).save(bssan / "hub_bank.npz")
    out = tmp_path / "a"
    assert main([str(bssan), "--out", str(out), "--tensorrt", "off", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model"]["hub"] == {"file": "hub_bank.npz", "k": 3, "beta": 0.7, "captions": 10}
    assert "hub_bank.npz" in manifest["files"]
    assert manifest["model"]["checkpoint"]["hub_bank_sha256"] == file_sha256(bssan / "hub_bank.npz")  # quickstart re-exports on change
    split = FeatureStore(tiny_store).split("test")
    want = score_split(load_checkpoint(bssan).model, split, "glove50", images=6)  # torch, with the correction
    plain = score_split(model, split, "glove50", images=6)
    assert np.abs(want - plain).max() > 1e-3  # the correction changes the scores
    for path in ("grid", "pair"):
        with Scorer.load(out, backend="onnxruntime-cpu", threads=1, fusion=False, path=path) as scorer:
            images, captions = scorer.encode_images(split), scorer.encode_captions(split)
            assert images.arrays[HUB_OFFSET].shape == (len(images),) and captions.arrays[HUB_OFFSET].shape == (len(captions),)
            got = scorer.score_matrix(images, captions)[:6, :30]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
            pairs = np.array([[0, 3], [5, 29], [2, 0], [5, 1]])
            np.testing.assert_allclose(scorer.score_pairs(images, captions, pairs), want[pairs[:, 0], pairs[:, 1]], rtol=0, atol=1e-4)
    (out / "hub_bank.npz").write_bytes(b"tampered")
    with pytest.raises(Exception, match="hub_bank.npz"):
        Scorer.load(out, backend="onnxruntime-cpu", threads=1)
