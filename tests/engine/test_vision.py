"""engine.vision: every bad-image case, preprocessing, asset manifests, and the graph runners' checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import AssetError, BackendUnavailableError, ImageError, InputError
from engine.vision import (
    MIN_IMAGE_SIDE,
    ObjectFeatures,
    Preprocessing,
    RegionBackbone,
    load_batch,
    load_image,
    open_session,
    read_asset_manifest,
    regions_from_feature_map,
)

PREPROCESSING = Preprocessing(size=32, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


def photo(width: int = 64, height: int = 48) -> Image.Image:
    """A deterministic RGB image with structure (gradients), so resizes and conversions show."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8))


def test_corrupt_file_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match=r"corrupt\.jpg: cannot decode image"):
        load_image(path)


def test_truncated_jpeg_is_rejected_naming_the_file(tmp_path):
    full = tmp_path / "full.jpg"
    photo(256, 256).save(full, quality=90)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg: cannot decode image \(image file is truncated"):
        load_image(path)


def test_truncated_png_is_rejected(tmp_path):
    full = tmp_path / "full.png"
    photo(256, 256).save(full)
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode image"):
        load_image(path)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match=r"absent\.jpg: image file not found"):
        load_image(tmp_path / "absent.jpg")


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    photo().convert("L").save(path)
    image = np.asarray(load_image(path))
    assert image.shape == (48, 64, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(path)  # PIL's own convert would clip to 255
    assert np.asarray(load_image(path))[0, 0].tolist() == [40000 >> 8] * 3


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    photo().convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(photo(), np.int16)).mean() < 10  # same picture


def test_png_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:16, :, 3] = 255  # top half opaque, bottom half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = np.asarray(load_image(path))
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[-1, -1].tolist() == [255, 255, 255]


def test_palette_png_with_transparency(tmp_path):
    path = tmp_path / "palette.png"
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(path, transparency=0)
    assert np.asarray(load_image(path))[5, 5].tolist() == [255, 255, 255]


def test_one_pixel_image_is_rejected(tmp_path):
    path = tmp_path / "pixel.gif"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    with pytest.raises(ImageError, match=rf"pixel\.gif: image is 1x1 px; expected at least {MIN_IMAGE_SIDE} px per side"):
        load_image(path)


def test_ten_thousand_pixel_wide_panorama_is_handled(tmp_path):
    path = tmp_path / "panorama.jpg"
    Image.new("RGB", (10_000, 400), (200, 100, 50)).save(path, quality=90)
    batch, decoded, bad = load_batch([path], PREPROCESSING)
    assert bad == {} and decoded[0].size == (10_000, 400)
    assert batch.shape == (1, 3, 32, 32) and np.isfinite(batch).all()
    np.testing.assert_allclose(batch[0, :, 16, 16], (np.array([200, 100, 50]) - 127) / 128, atol=0.05)


def test_ten_thousand_pixel_wide_strip_is_rejected(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (10_000, 2)).save(path)
    with pytest.raises(ImageError, match=r"strip\.png: image is 10000x2 px"):
        load_image(path)


def test_oversized_image_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 1-bit: tiny file, 100 M pixels once decoded
    with pytest.raises(ImageError, match=r"huge\.png: image is 10000x10000 px \(100,000,000 pixels\); expected at most"):
        load_image(path)


def test_load_batch_zeroes_and_reports_bad_images_and_keeps_going(tmp_path):
    good = tmp_path / "good.png"
    photo().save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    batch, decoded, reasons = load_batch([good, bad, good], PREPROCESSING)
    assert list(reasons) == [1] and "bad.jpg" in reasons[1]
    assert decoded[1] is None and (batch[1] == 0).all()
    np.testing.assert_array_equal(batch[0], batch[2])
    np.testing.assert_allclose(batch[0], PREPROCESSING.apply(photo()))


def test_preprocessing_is_rgb_chw_normalised_and_stretched():
    image = Image.new("RGB", (50, 20), (255, 127, 0))
    out = PREPROCESSING.apply(image)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [128 / 128, 0.0, -127 / 128])


def test_preprocessing_from_dict_is_strict():
    values = PREPROCESSING.to_dict()
    assert Preprocessing.from_dict(values, "m.json") == PREPROCESSING
    with pytest.raises(AssetError, match=r"m\.json: unknown preprocessing keys \['crop'\]"):
        Preprocessing.from_dict({**values, "crop": 0.875}, "m.json")
    with pytest.raises(AssetError, match=r"m\.json: preprocessing .* not supported"):
        Preprocessing.from_dict({**values, "channel_order": "BGR"}, "m.json")


def test_regions_are_the_grid_flattened_row_major():
    feature_map = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)  # [B, C, h, w]
    regions = regions_from_feature_map(feature_map)
    assert regions.shape == (2, 8, 3)
    np.testing.assert_array_equal(regions[1, 1 * 4 + 2], feature_map[1, :, 1, 2])


def test_manifest_checks_kind_and_graph_hash(backbone_assets, tmp_path):
    for name in ("roi_align.json", "roi_align.onnx"):
        (tmp_path / name).write_bytes((backbone_assets / name).read_bytes())
    with pytest.raises(AssetError, match=r"roi_align\.json: expected an asset of kind 'region-backbone', got 'roi-align'"):
        RegionBackbone.from_manifest(tmp_path / "roi_align.json")
    with (tmp_path / "roi_align.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(AssetError, match=r"roi_align\.onnx: sha256 differs from roi_align\.json"):
        ObjectFeatures.from_manifest(tmp_path / "roi_align.json")
    with pytest.raises(AssetError, match=r"absent\.json: asset manifest not found; build it with python -m export\.backbones"):
        read_asset_manifest(tmp_path / "absent.json", "roi-align")


def test_session_never_falls_back_to_another_provider(backbone_assets):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"onnxruntime-cuda: CUDAExecutionProvider is not in this onnxruntime's providers"):
            open_session(backbone_assets / "roi_align.onnx", "onnxruntime-cuda", threads=1)
    with pytest.raises(InputError, match=r"threads=0: expected at least 1"):
        open_session(backbone_assets / "roi_align.onnx", threads=0)


def test_backbone_runner_checks_input_shape_and_describes_itself(backbone_assets):
    with RegionBackbone.from_manifest(backbone_assets / "efficientnet-lite0-7x7.json", threads=2) as backbone:
        assert backbone.preprocessing.size == 224 and backbone.grid == 7 and backbone.channels == 1280
        with pytest.raises(InputError, match=r"image: expected float32 \[B, 3, 224, 224\], got \[1, 3, 32, 32\]"):
            backbone.run(np.zeros((1, 3, 32, 32), np.float32))
        description = backbone.describe()
    assert "graph_path" not in description and json.dumps(description)  # JSON-ready for the store manifest
    assert description["weights"]["sha256"] and description["preprocessing"]["size"] == 224


def test_object_runner_checks_shapes(backbone_assets):
    roi = ObjectFeatures.from_manifest(backbone_assets / "roi_align.json")
    with pytest.raises(InputError, match=r"boxes: expected feature map \[B, C, h, w\] and boxes \[B, P, 4\]"):
        roi.run(np.zeros((2, 8, 7, 7), np.float32), np.zeros((3, 10, 4), np.float32))
