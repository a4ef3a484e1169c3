"""export.backbones: each ONNX graph equals its torch module, the packaged weights are real,
VGG-19 loads a torchvision-format state dict, and the RoIAlign graph equals a numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch (pip install 'bssan-engine[export]')")

from engine.errors import AssetError  # noqa: E402
from engine.vision import ObjectFeatures, RegionBackbone, load_image  # noqa: E402
from export import backbones  # noqa: E402

ROI_REFERENCE_ATOL = 1e-5  # fp32 bilinear sums of <= 64 points
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def max_rel_diff(module, runner: RegionBackbone, images: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        expected = module(torch.from_numpy(images))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = runner.session.run(list(runner.manifest["outputs"]), {"image": images})
    return {name: backbones.parity_error(e.numpy(), g) for name, e, g in zip(runner.manifest["outputs"], expected, got)}


def test_efficientnet_graph_equals_torch(backbone_assets):
    runner = RegionBackbone.from_manifest(backbone_assets / "efficientnet-lite0-7x7.json")
    module, _ = backbones.efficientnet_lite0(224)
    images = np.random.default_rng(1).normal(size=(3, 3, 224, 224)).astype(np.float32)  # batch 3: the axis is dynamic
    diffs = max_rel_diff(module, runner, images)
    print(f"efficientnet-lite0 7x7 max |diff| / max |torch|: {diffs}")
    assert set(diffs) == {"feature_map", "logits"}
    assert max(diffs.values()) <= backbones.PARITY_TOLERANCE
    assert runner.manifest["outputs"]["feature_map"]["shape"] == ["batch", 1280, 7, 7]
    assert runner.run(images).shape == (3, 1280, 7, 7)


def test_packaged_weights_classify_the_cat_photo_as_a_cat(backbone_assets, tmp_path):
    data = pytest.importorskip("skimage.data", reason="the cat photo comes from scikit-image (dev extra)")
    from PIL import Image

    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    runner = RegionBackbone.from_manifest(backbone_assets / "efficientnet-lite0-7x7.json")
    logits = runner.classify(runner.preprocessing.apply(load_image(path))[None])  # [1, 1000]
    top = int(np.argmax(logits[0]))
    print(f"chelsea.png -> ImageNet class {top}")
    assert top in IMAGENET_CATS


def torchvision_vgg19_state(seed: int) -> dict:
    """Random weights under torchvision's vgg19 key names, plus one classifier key that must be reported unused."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in backbones.vgg19_features().state_dict().items()}
    state = {f"features.{k}": v for k, v in state.items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def test_vgg19_from_torchvision_state_dict_equals_torch(tmp_path):
    weights = tmp_path / "vgg19.pth"
    torch.save(torchvision_vgg19_state(seed=0), weights)
    module, source = backbones.vgg19(weights)
    assert source["unused_keys"] == ["classifier.6.bias"]
    size = 7 * backbones.VGG19_STRIDE  # 112 px keeps the test fast; 224 px (14x14) is the same graph at 4x cost
    preprocessing = backbones.Preprocessing(**{**backbones.VGG19_PREPROCESSING.to_dict(), "size": size})
    manifest = backbones.export_backbone("vgg19", module, source, preprocessing, 7, ["feature_map"], tmp_path)
    runner = RegionBackbone.from_manifest(manifest)
    images = np.random.default_rng(2).normal(size=(2, 3, size, size)).astype(np.float32)
    diffs = max_rel_diff(module, runner, images)
    print(f"vgg19 conv5_4 7x7 max |diff| / max |torch|: {diffs}")
    assert diffs["feature_map"] <= backbones.PARITY_TOLERANCE
    assert runner.channels == 512 and runner.grid == 7
    assert json.loads(manifest.read_text())["preprocessing"]["mean"] == [123.675, 116.28, 103.53]


def test_vgg19_rejects_foreign_and_missing_keys(tmp_path):
    state = torchvision_vgg19_state(seed=0)
    torch.save({**state, "backbone.body.conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(AssetError, match=r"foreign\.pth: keys \['backbone\.body\.conv1\.weight'\] are not VGG-19 layers"):
        backbones.vgg19(tmp_path / "foreign.pth")
    del state["features.34.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(AssetError, match=r"missing\.pth: missing 1 VGG-19 keys, first features\.34\.weight"):
        backbones.vgg19(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(AssetError, match=r"garbage\.pth: not a readable torch state-dict file"):
        backbones.vgg19(tmp_path / "garbage.pth")


def test_cli_reports_a_bad_weight_file_in_one_line_before_exporting(tmp_path, capsys):
    assert backbones.main(["--out", str(tmp_path / "assets"), "--vgg19-weights", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.pth" in err
    assert not (tmp_path / "assets").exists()


def _bilinear(channel_map: np.ndarray, y: float, x: float) -> np.ndarray:
    """ONNX RoiAlign's sampling (the Caffe2/Detectron rule): zero outside [-1, size], edge-clamped inside."""
    _, height, width = channel_map.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(channel_map.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * channel_map[:, y0, x0] + (1 - ly) * lx * channel_map[:, y0, x1]
            + ly * (1 - lx) * channel_map[:, y1, x0] + ly * lx * channel_map[:, y1, x1])


def roi_align_reference(feature_map: np.ndarray, boxes: np.ndarray, bins: int, samples: int) -> np.ndarray:
    """Plain-loop RoIAlign (avg, half_pixel) then the mean over bins: [B,C,h,w], [B,P,4] -> [B,P,C]."""
    batch, channels, height, width = feature_map.shape
    out = np.zeros((batch, boxes.shape[1], channels))
    for b in range(batch):
        for p, (x1, y1, x2, y2) in enumerate(boxes[b].astype(np.float64)):
            x1, x2 = x1 * width - 0.5, x2 * width - 0.5
            y1, y2 = y1 * height - 0.5, y2 * height - 0.5
            bin_w, bin_h = (x2 - x1) / bins, (y2 - y1) / bins
            points = [
                _bilinear(feature_map[b].astype(np.float64), y1 + ph * bin_h + (iy + 0.5) * bin_h / samples,
                          x1 + pw * bin_w + (ix + 0.5) * bin_w / samples)
                for ph in range(bins) for pw in range(bins) for iy in range(samples) for ix in range(samples)
            ]
            out[b, p] = np.mean(points, axis=0)
    return out


def test_roi_align_graph_equals_numpy_reference(backbone_assets):
    rng = np.random.default_rng(3)
    feature_map = rng.normal(size=(2, 5, 7, 6)).astype(np.float32)  # h != w catches a swapped scale
    boxes = np.array([
        [[0, 0, 1, 1], [0.1, 0.2, 0.4, 0.9], [0.9, 0.9, 1.0, 1.0]],  # whole map, a tall box, a corner sliver
        [[0.5, 0, 1, 0.5], [0.33, 0.33, 0.34, 0.34], [0, 0.6, 0.25, 1]],
    ], dtype=np.float32)
    with ObjectFeatures.from_manifest(backbone_assets / "roi_align.json") as roi:
        got = roi.run(feature_map, boxes)
    expected = roi_align_reference(feature_map, boxes, backbones.ROI_OUTPUT_SIZE, backbones.ROI_SAMPLING_RATIO)
    diff = float(np.abs(got - expected).max())
    print(f"RoIAlign graph vs numpy reference: max |diff| {diff:.2e}")
    assert got.shape == (2, 3, 5)
    assert diff <= ROI_REFERENCE_ATOL


def test_roi_align_takes_any_batch_boxes_and_channels(backbone_assets):
    roi = ObjectFeatures.from_manifest(backbone_assets / "roi_align.json")
    feature_map = np.ones((4, 1280, 7, 7), dtype=np.float32)
    objects = roi.run(feature_map, np.tile(np.array([0.2, 0.2, 0.6, 0.8], np.float32), (4, 10, 1)))
    assert objects.shape == (4, 10, 1280)
    np.testing.assert_allclose(objects, 1.0, atol=1e-6)  # the mean of a constant map is the constant
