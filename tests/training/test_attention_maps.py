"""Attention pictures (training/attention_maps.py): pictures and JSON from features in hand (tiny demo
model, fake image), the weights' sums and padding, refusal to overwrite, single-branch variants,
one-line errors, and the full image path on one Flickr8K photo when the assets and data exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine.detect import padding_boxes
from engine.errors import ArtifactError, AssetError, ImageError, InputError
from engine.text import DEFAULT_ASSETS_DIR
from tests.conftest import randomize_batchnorm
from engine.detect import Detections
from training.attention_maps import (O2W_PICTURE, W2R_PICTURE, WEIGHTS_JSON, AttentionMapsConfig, ImageFeatures,
                                     attention_maps, attention_pictures, check_word_features, image_features, main,
                                     pair_attention)
from training.baseline import DualEncoder, dual_encoder_preset
from training.checkpoint import save_checkpoint
from training.config import TrainConfig, preset, replace_strict
from training.model import BSSAN

CAPTION = "A dog runs on the grass."
WORDS = ["a", "dog", "runs", "on", "the", "grass"]
DOG_PHOTO = "1003163366_44323f5815.jpg"  # Flickr8K: "A man lays on a bench while his dog sits by him ."


def demo_model(variant: str = "full", seed: int = 0) -> BSSAN:
    torch.manual_seed(seed)
    model = BSSAN(replace_strict(preset("demo"), variant=variant)).eval()
    randomize_batchnorm(model, seed)
    return model


def fake_photo(width: int = 90, height: int = 60) -> Image.Image:
    """Non-square, with shapes and a gradient: the heat map must be laid over a non-square photo."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 40, 45), fill=(250, 250, 0))
    draw.rectangle((55, 20, 85, 55), fill=(0, 200, 0))
    return image


def fake_features(model: BSSAN, real: int = 2, seed: int = 0) -> ImageFeatures:
    c, rng = model.config, np.random.default_rng(seed)
    detected = np.array([[0.1, 0.15, 0.45, 0.75], [0.6, 0.3, 0.95, 0.9]], np.float32)[:real]
    boxes = np.concatenate([detected, padding_boxes(c.object_count - real)])  # [P, 4]
    return ImageFeatures(image=fake_photo(), regions=rng.normal(size=(c.region_count, c.region_dim)).astype(np.float32),
                         objects=rng.normal(size=(c.object_count, c.object_dim)).astype(np.float32), boxes=boxes,
                         objects_real=real, grid=(3, 3), labels=["dog 0.90", "person 0.80"][:real])


def word_vectors(model: BSSAN, padding: float = 0.0, seed: int = 1) -> np.ndarray:
    """[max_words, E]: one vector per word of WORDS, then `padding` (zeros as encode() gives, or any value)."""
    c, rng = model.config, np.random.default_rng(seed)
    vectors = np.full((c.max_words, c.word_dim), padding, np.float32)
    vectors[: len(WORDS)] = rng.normal(size=(len(WORDS), c.word_dim))
    return vectors


def assert_picture(path: Path) -> None:
    """A real picture: big enough, not blank, many colours (heat maps / bars over a photo)."""
    assert path.stat().st_size > 10_000, f"{path}: {path.stat().st_size} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, pixels.shape
    assert pixels.std() > 20, f"{path}: nearly blank (std {pixels.std():.1f})"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 64


def test_pictures_and_json_from_features(tmp_path):
    model = demo_model()
    features = fake_features(model)
    written = attention_pictures(model, features, CAPTION, WORDS, word_vectors(model), tmp_path / "out", record={"image": "fake"})
    assert [p.name for p in written.paths] == [W2R_PICTURE, O2W_PICTURE, WEIGHTS_JSON] and written.notes == []
    for name in (W2R_PICTURE, O2W_PICTURE):
        assert_picture(tmp_path / "out" / name)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([W2R_PICTURE, O2W_PICTURE, WEIGHTS_JSON])  # no temp files
    saved = json.loads((tmp_path / "out" / WEIGHTS_JSON).read_text())
    assert saved["words"] == WORDS and saved["image"] == "fake" and saved["grid"] == [3, 3] and saved["objects_real"] == 2
    w2r, o2w = np.array(saved["word_to_region"]), np.array(saved["object_to_word"])
    assert w2r.shape == (len(WORDS), 9) and o2w.shape == (4, len(WORDS))
    assert (w2r >= 0).all() and (o2w >= 0).all()
    np.testing.assert_allclose(w2r.sum(axis=1), 1.0, atol=1e-5)  # over the regions, per word
    np.testing.assert_allclose(o2w.sum(axis=1), 1.0, atol=1e-5)  # over the real words, per object: none left for padding
    assert saved["box_labels"][:2] == ["object 1: dog 0.90", "object 2: person 0.80"]
    assert saved["box_labels"][2] == "padding box 3: whole photo"
    np.testing.assert_allclose(np.array(saved["boxes"]), features.boxes, atol=1e-6)
    # the JSON's score is the model's score of the pair (independent path: score_pairs of a batch)
    lengths = np.array([len(WORDS)])
    want = model.score_pairs(features.regions[None], features.objects[None], word_vectors(model)[None], lengths, [0], [0])
    assert saved["score"] == pytest.approx(float(want[0]), abs=1e-5)
    assert set(saved["branch_scores"]) == {"w2r", "o2w"}
    w_y, w_yp = model.config.branch_weights
    assert saved["score"] == pytest.approx(w_y * saved["branch_scores"]["w2r"] + w_yp * saved["branch_scores"]["o2w"], abs=1e-6)


def test_padding_words_get_no_weight_and_change_nothing():
    model = demo_model()
    features = fake_features(model)
    c, n = model.config, len(WORDS)
    raw = model.attention_weights(features.regions[None], features.objects[None], word_vectors(model, padding=3.0)[None],
                                  np.array([n]), [0], [0])
    assert raw["word_to_region"].shape == (1, c.max_words, c.region_count)
    assert torch.all(raw["word_to_region"][0, n:] == 0) and torch.all(raw["object_to_word"][0, :, n:] == 0)
    exact = pair_attention(model, features.regions, features.objects, word_vectors(model)[:n], WORDS)  # no padding at all
    for padding in (0.0, 3.0):  # zeros as the encoders give, and garbage: neither may leak in
        padded = pair_attention(model, features.regions, features.objects, word_vectors(model, padding), WORDS)
        np.testing.assert_allclose(padded.word_to_region, exact.word_to_region, atol=1e-6)
        np.testing.assert_allclose(padded.object_to_word, exact.object_to_word, atol=1e-6)
        assert padded.score == pytest.approx(exact.score, abs=1e-5)


def test_refuses_to_overwrite_unless_force(tmp_path):
    model = demo_model()
    out = tmp_path / "out"
    attention_pictures(model, fake_features(model), CAPTION, WORDS, word_vectors(model), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match=r"w2r_words\.png: exists; expected a new file \(pass --force"):
        attention_pictures(model, fake_features(model, seed=5), CAPTION, WORDS, word_vectors(model), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / W2R_PICTURE).unlink()  # any one output left is enough to refuse
    with pytest.raises(InputError, match=r"o2w_objects\.png: exists"):
        attention_pictures(model, fake_features(model, seed=5), CAPTION, WORDS, word_vectors(model), out)
    attention_pictures(model, fake_features(model, seed=5), CAPTION, WORDS, word_vectors(model), out, force=True)
    assert (out / W2R_PICTURE).is_file() and (out / WEIGHTS_JSON).read_bytes() != before[WEIGHTS_JSON]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


@pytest.mark.parametrize("variant, drawn, missing, key", [("w2r", W2R_PICTURE, O2W_PICTURE, "object_to_word"),
                                                          ("o2w", O2W_PICTURE, W2R_PICTURE, "word_to_region")])
def test_single_branch_variant_draws_its_picture_and_says_so(tmp_path, variant, drawn, missing, key):
    model = demo_model(variant)
    written = attention_pictures(model, fake_features(model), CAPTION, WORDS, word_vectors(model), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([drawn, WEIGHTS_JSON])
    assert_picture(tmp_path / drawn)
    branch = "O2W" if variant == "w2r" else "W2R"
    assert written.notes == [f"no {missing}: this model (variant {variant}) has no {branch} branch"]
    saved = json.loads((tmp_path / WEIGHTS_JSON).read_text())
    assert saved[key] is None and saved["notes"] == written.notes and list(saved["branch_scores"]) == [variant]


def test_nothing_detected_shows_the_padding_boxes(tmp_path):
    model = demo_model()
    attention_pictures(model, fake_features(model, real=0), CAPTION, WORDS, word_vectors(model), tmp_path)
    assert_picture(tmp_path / O2W_PICTURE)
    assert json.loads((tmp_path / WEIGHTS_JSON).read_text())["box_labels"][0] == "padding box 1: whole photo"


def test_grid_must_cover_the_regions(tmp_path):
    model = demo_model()
    features = fake_features(model)
    features.grid = (2, 4)
    with pytest.raises(InputError, match=r"grid \(2, 4\): 8 cells for 9 regions"):
        attention_pictures(model, features, CAPTION, WORDS, word_vectors(model), tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The command: one-line errors


def extractor_record(grid: int = 3, channels: int = 16, boxes: int = 4, sha: str = "a" * 64) -> dict:
    return {"name": "engine.features", "boxes_per_image": boxes, "detector": {"name": "ssd-mobilenet-v2-coco", "min_score": 0.3},
            "backbone": {"graph": "backbone.onnx", "grid": grid, "channels": channels, "graph_sha256": sha}}


def checkpoint(tmp_path: Path, name: str, model=None, extractor: dict | None = None) -> Path:
    store = None if extractor is None else SimpleNamespace(manifest={"extractor": extractor, "splits": {}}, root=tmp_path / "no-store")
    return save_checkpoint(tmp_path / name, model if model is not None else demo_model(), TrainConfig(), store=store)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    fake_photo().save(path)
    return path


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def test_command_errors_are_one_line(tmp_path, capsys, photo):
    ckpt = checkpoint(tmp_path, "synthetic")  # a store without an image pipeline
    cases = [
        (["--image", tmp_path / "missing.jpg", "--caption", CAPTION], r"missing\.jpg: image file not found"),
        (["--image", photo, "--caption", " . , ! "], r"caption ' \. , ! ': no word left after tokenizing; expected at least one word"),
        (["--image", photo, "--caption", CAPTION], r"store\.json: the model's features came from None, which has no image pipeline"),
    ]
    for args, message in cases:
        code, err = run_main(capsys, "--checkpoint", ckpt, "--out", tmp_path / "out", *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    dual = save_checkpoint(tmp_path / "dual", DualEncoder(dual_encoder_preset("demo")).eval(), TrainConfig())
    code, err = run_main(capsys, "--checkpoint", dual, "--image", photo, "--caption", CAPTION, "--out", tmp_path / "out")
    assert code == 2 and "a dual_encoder checkpoint has no attention; expected a BSSAN checkpoint" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / WEIGHTS_JSON).write_text("{}")
    code, err = run_main(capsys, "--checkpoint", ckpt, "--image", photo, "--caption", CAPTION, "--out", tmp_path / "out")
    assert code == 2 and "attention.json: exists; expected a new file (pass --force to replace it)" in err


def test_checkpoint_grid_must_match_its_model_and_the_assets(tmp_path, photo):
    wrong = checkpoint(tmp_path, "wrong-grid", extractor=extractor_record(grid=7))
    config = AttentionMapsConfig(wrong, photo, CAPTION, tmp_path / "out", assets=tmp_path / "assets")
    with pytest.raises(ArtifactError, match=r"store.json records a 7x7 grid of 16 channels and 4 boxes, but the model reads 9 regions"):
        attention_maps(config)
    good = checkpoint(tmp_path, "good", extractor=extractor_record())
    config = AttentionMapsConfig(good, photo, CAPTION, tmp_path / "out", assets=tmp_path / "assets")
    with pytest.raises(AssetError, match=r"backbone.json or roi_align.json not found; build them with: python -m export.backbones"):
        attention_maps(config)
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "roi_align.json").write_text("{}")
    (tmp_path / "assets" / "backbone.json").write_text(json.dumps({"grid": 2, "graph": "backbone.onnx", "graph_sha256": "a" * 64}))
    with pytest.raises(AssetError, match=r"backbone.json: grid 2; the model was trained on grid 3"):
        attention_maps(config)
    (tmp_path / "assets" / "backbone.json").write_text(json.dumps({"grid": 3, "graph": "backbone.onnx", "graph_sha256": "b" * 64}))
    (tmp_path / "assets" / "backbone.onnx").write_bytes(b"another graph")
    with pytest.raises(AssetError, match=r"backbone.onnx: sha256 differs from the backbone the model was trained with "
                                         r"\(aaaaaaaaaaaa\), whose record has no fingerprint"):
        attention_maps(config)
    assert not (tmp_path / "out").exists()


def test_word_features_must_match_the_checkpoint(glove50):
    description = {k: v for k, v in glove50.describe().items() if k != "cache"}
    check_word_features(glove50, {"name": "glove50", "description": description}, 50, Path("wf.json"))
    check_word_features(glove50, {"name": "glove50", "description": None}, 50, Path("wf.json"))  # unrecorded: width only
    with pytest.raises(AssetError, match=r"wf.json: word features 'glove50' have 50 dims; the model expects 12"):
        check_word_features(glove50, {"name": "glove50", "description": description}, 12, Path("wf.json"))
    with pytest.raises(AssetError, match=r"wf.json: word features 'glove50' sha256 \w+ differ from the model's training features \(0{16}\)"):
        check_word_features(glove50, {"name": "glove50", "description": description | {"sha256": "0" * 64}}, 50, Path("wf.json"))


def test_box_labels_when_the_detector_gives_one_box_two_classes(photo):
    """SSD's per-class NMS can return the same box as "person" and as "dog": both are selected
    (two objects), and each gets its own detection's label, in score order."""
    same, other = [0.5, 0.4, 0.6, 0.6], [0.1, 0.1, 0.4, 0.9]
    found = Detections(np.array([other, same, same], np.float32), np.array([0.99, 0.76, 0.58], np.float32), np.array([1, 1, 18]))
    boxes = np.concatenate([found.boxes, padding_boxes(1)])[None]  # [1, P=4, 4]: 3 detected + 1 padding
    features = np.random.default_rng(0).normal(size=(1, 9, 16)).astype(np.float32)
    extractor = SimpleNamespace(images=lambda paths: (features, features[:, :4], boxes, np.array([3]), {}),
                                detector=SimpleNamespace(detect=lambda images: [found]), backbone=SimpleNamespace(grid=3))
    result = image_features(extractor, photo)
    assert result.labels == ["person 0.99", "person 0.76", "dog 0.58"] and result.objects_real == 3 and result.grid == (3, 3)
    assert result.image.size == fake_photo().size and result.regions.dtype == np.float32
    bad = SimpleNamespace(images=lambda paths: (features, features, boxes, np.array([0]), {0: f"{paths[0]}: cannot decode image"}))
    with pytest.raises(ImageError, match="photo.png: cannot decode image"):
        image_features(bad, photo)


# ---------------------------------------------------------------------------------------------
# The full path: an image file through the model's own feature pipeline


def test_full_image_path_on_a_flickr8k_photo(tmp_path, flickr8k, glove50):
    if not (DEFAULT_ASSETS_DIR / "efficientnet-lite0-7x7.json").is_file() or not (DEFAULT_ASSETS_DIR / "roi_align.json").is_file():
        pytest.skip(f"backbone graphs not built at {DEFAULT_ASSETS_DIR}; python -m export.backbones --out {DEFAULT_ASSETS_DIR}")
    from engine.features import ExtractConfig, Extractor

    extractor = Extractor(ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=DEFAULT_ASSETS_DIR, word_features=(), threads=2))
    words = {"features": {k: v for k, v in glove50.describe().items() if k != "cache"}}
    store = SimpleNamespace(manifest={"extractor": extractor.describe(), "splits": {"train": {"word_sets": {"glove50": words}}}},
                            root=tmp_path / "no-store")
    torch.manual_seed(3)
    model = BSSAN(replace_strict(preset("flickr8k"), w2r_hidden=8, w2r_mlp=[8, 1], o2w_hidden=6, o2w_mlp=[6, 1])).eval()
    ckpt = save_checkpoint(tmp_path / "bssan", model, TrainConfig(word_set="glove50"), store=store)
    image = flickr8k / "images" / DOG_PHOTO
    written = attention_maps(AttentionMapsConfig(ckpt, image, "A man lays on a bench while his dog sits by him .", tmp_path / "out"),
                             word_set=glove50)
    for name in (W2R_PICTURE, O2W_PICTURE):
        assert_picture(tmp_path / "out" / name)
    saved = json.loads((tmp_path / "out" / WEIGHTS_JSON).read_text())
    assert saved["grid"] == [7, 7] and saved["words"][:3] == ["a", "man", "lays"] and saved["image"] == str(image)
    assert np.array(saved["word_to_region"]).shape == (len(saved["words"]), 49)
    assert 1 <= saved["objects_real"] <= 10 and any("dog" in label for label in saved["box_labels"]), saved["box_labels"]
    # the same score as the model on the extractor's features, rounded through float16 as a store holds them
    regions, objects, _, _, _ = extractor.images([image])
    vectors = glove50.encode([saved["caption"]], model.config.max_words).vectors.astype(np.float16).astype(np.float32)
    want = model.score_pairs(regions.astype(np.float16).astype(np.float32), objects.astype(np.float16).astype(np.float32),
                             vectors, np.array([len(saved["words"])]), [0], [0])
    assert written.attention.score == pytest.approx(float(want[0]), abs=1e-5)
