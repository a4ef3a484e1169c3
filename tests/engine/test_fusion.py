"""The product score: manifest "fusion" (first_stage_weight x dual-encoder cosine + bssan_weight x MS),
written by the exporter from MODEL_DIR/fusion.json, applied by the Scorer in every mode, with an opt-out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.errors import ArtifactError
from engine.files import file_sha256
from engine.ranking import Fusion

FUSION = {"first_stage_weight": 0.7, "bssan_weight": 0.4}


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory, tiny_checkpoints):
    """A copy of the tiny BSSAN checkpoint with a fusion.json bound to the tiny dual encoder."""
    root = tmp_path_factory.mktemp("fused") / "bssan"
    shutil.copytree(tiny_checkpoints["bssan"], root)
    sha = file_sha256(tiny_checkpoints["shortlist"] / "weights.pt")
    (root / "fusion.json").write_text(json.dumps({**FUSION, "first_stage_sha256": sha, "tuned_on": "dev", "k": 20}))
    return root


def _export(model_dir, out, shortlist=None):
    from export.pipeline import ExportOptions, export_artifact

    return export_artifact(ExportOptions(model_dir=model_dir, out=out, precisions=("fp32",), shortlist_dir=shortlist,
                                         tensorrt="off", assets_dir=None, progress=False))


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory, fused_checkpoint, tiny_checkpoints):
    pytest.importorskip("onnx", reason="exporting needs onnx (the export extra)")
    out = tmp_path_factory.mktemp("fused-artifact") / "artifact"
    _export(fused_checkpoint, out, tiny_checkpoints["shortlist"])
    return out


def test_export_writes_the_fusion_section(fused_artifact, tiny_artifact):
    from engine.artifact import load_artifact

    assert load_artifact(fused_artifact).manifest["fusion"] == FUSION
    assert load_artifact(fused_artifact).fusion == Fusion(**FUSION)
    assert load_artifact(tiny_artifact).fusion == Fusion(0.0, 1.0)  # no fusion.json: BSSAN alone


def test_export_refuses_fusion_without_its_first_stage(fused_checkpoint, tiny_checkpoints, tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(ArtifactError, match=r"fusion.json: fusion weights tuned with a first stage \([0-9a-f]{12}\); "
                                            r"expected --shortlist with that dual-encoder checkpoint"):
        _export(fused_checkpoint, tmp_path / "a")
    other = tmp_path / "other-dual"
    shutil.copytree(tiny_checkpoints["shortlist"], other)
    (other / "weights.pt").write_bytes((other / "weights.pt").read_bytes() + b"\0")  # another dual encoder's weights
    with pytest.raises(ArtifactError, match=r"fusion.json: first_stage_sha256 [0-9a-f]{12} differs from --shortlist"):
        _export(fused_checkpoint, tmp_path / "b", other)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_fusion_error_is_one_line(fused_checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx")
    from export.__main__ import main

    assert main([str(fused_checkpoint), "--out", str(tmp_path / "a"), "--tensorrt", "off", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "expected --shortlist" in err


@pytest.fixture(scope="module")
def scorers(fused_artifact):
    from engine.runtime import Scorer

    with Scorer.load(fused_artifact, backend="onnxruntime-cpu", threads=1) as fused, \
            Scorer.load(fused_artifact, backend="onnxruntime-cpu", threads=1, fusion=False) as alone:
        yield fused, alone


@pytest.fixture(scope="module")
def gallery(scorers, tiny_store):
    from engine.store import FeatureStore

    split = FeatureStore(tiny_store).split("test")
    fused, _ = scorers
    return fused.encode_images(split), fused.encode_captions(split)


def test_scorer_fuses_in_every_mode_and_opts_out(scorers, gallery):
    fused, alone = scorers
    images, captions = gallery
    assert fused.fusion == Fusion(**FUSION) and alone.fusion == Fusion(0.0, 1.0)
    bssan = alone.score_matrix(images, captions)  # [N_img, N_cap] MS
    cosines = (np.asarray(images.arrays["image_vectors"], np.float32) @ np.asarray(captions.arrays["text_vectors"], np.float32).T)
    want = (0.7 * cosines.astype(np.float64) + 0.4 * bssan.astype(np.float64)).astype(np.float32)
    matrix = fused.score_matrix(images, captions)
    np.testing.assert_allclose(matrix, want, atol=1e-6)
    np.testing.assert_array_equal(fused.score_matrix(images, captions, fuse=False), bssan)
    pairs = np.array([[0, 3], [2, 7], [9, 49], [5, 5]])
    np.testing.assert_allclose(fused.score_pairs(images, captions, pairs), want[pairs[:, 0], pairs[:, 1]], atol=1e-6)
    for direction in ("i2t", "t2i"):
        table = matrix if direction == "i2t" else matrix.T
        exhaustive = fused.top_k(images, captions, 5, direction)
        np.testing.assert_allclose(exhaustive.scores, -np.sort(-table, axis=1)[:, :5], atol=1e-6)
        shortlisted = fused.top_k(images, captions, 5, direction, shortlist_k=8)
        got = np.take_along_axis(table, shortlisted.indices, axis=1)
        np.testing.assert_allclose(shortlisted.scores, got, atol=1e-6)  # re-ranked by the fused score
        bssan_table = bssan if direction == "i2t" else bssan.T
        np.testing.assert_allclose(shortlisted.bssan, np.take_along_axis(bssan_table, shortlisted.indices, axis=1), atol=1e-6)
        assert (np.diff(shortlisted.scores, axis=1) <= 0).all()


def test_score_cli_fuses_and_no_fusion_scores_bssan_alone(fused_artifact, tiny_store, capsys):
    from engine.score import main

    runs = {}
    for flags in ([], ["--no-fusion"]):
        assert main(["--model", str(fused_artifact), "--images", str(tiny_store), "--evaluate", "--direction", "both",
                     "--backend", "onnxruntime-cpu", *flags]) == 0
        runs[bool(flags)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs[False]["protocol"]["fusion"] == FUSION
    assert runs[True]["protocol"]["fusion"] == {"first_stage_weight": 0.0, "bssan_weight": 1.0}
