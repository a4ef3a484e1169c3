"""engine.features end to end on 20 real Flickr8K images (+ one corrupt file): a valid store,
resume after an interruption, determinism, no-op reruns, content hashing, adding a word set later."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import DataError, StoreError
from engine.features import LOCK_NAME, PROGRESS_NAME, CaptionFormat, ExtractConfig, extract, main
from engine.store import FeatureStore
from engine.text import tokenize
from engine.vision import RegionBackbone, load_image, regions_from_feature_map

SPLIT_SIZES = {"train": 12, "dev": 4, "test": 4}  # 20 real images
BATCH = 4
CORRUPT = "corrupt_0000.jpg"  # added to the test split: a bad image must not stop the run
STOP_AFTER = 2  # batches stored before the simulated kill


class Interrupted(Exception):
    """Stands in for kill -9: raised between batches, so nothing after the last stored batch runs."""


@pytest.fixture(scope="module")
def mini_flickr(flickr8k, tmp_path_factory) -> tuple[Path, Path]:
    """A Flickr8K-format folder: captions.txt and split lists for 20 real images (symlinked) and one corrupt file."""
    root = tmp_path_factory.mktemp("mini-flickr8k")
    images = root / "images"
    images.mkdir()
    lines = (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines()
    chosen: list[str] = []
    for split, size in SPLIT_SIZES.items():
        names = [n.strip() for n in (flickr8k / f"split_{split}.txt").read_text().splitlines()]
        names = [n for n in names if (flickr8k / "images" / n).is_file()][:size]
        if split == "test":
            names.append(CORRUPT)
        (root / f"split_{split}.txt").write_text("".join(n + "\n" for n in names))
        chosen += names
    for name in chosen:
        if name != CORRUPT:
            (images / name).symlink_to(flickr8k / "images" / name)
    (images / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    keep = set(chosen)
    mine = [line for line in lines if line.split("#")[0] in keep]
    mine += [f"{CORRUPT}#{i}\tA picture that cannot be opened ." for i in range(5)]
    (root / "captions.txt").write_text("\n".join(mine) + "\n", encoding="utf-8")
    return images, root / "captions.txt"


@pytest.fixture(scope="module")
def word_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("word-cache")  # not ~/.cache


@pytest.fixture
def cli_cache(word_cache, monkeypatch) -> None:
    monkeypatch.setenv("BSSAN_CACHE", str(word_cache))  # what the command line's word features read


@pytest.fixture(scope="module")
def config_for(mini_flickr, backbone_assets, word_cache):
    images, captions = mini_flickr
    cache = word_cache

    def make(out: Path, **overrides) -> ExtractConfig:
        values = dict(images=images, captions=captions, out=out, assets=backbone_assets, word_features=("glove50",),
                      batch_size=BATCH, threads=2, cache_dir=cache)
        return ExtractConfig(**{**values, **overrides})

    return make


@pytest.fixture(scope="module")
def stores(config_for, tmp_path_factory) -> dict[str, Path]:
    """'full': one uninterrupted run. 'resumed': interrupted after STOP_AFTER batches, then rerun."""
    base = tmp_path_factory.mktemp("stores")
    extract(config_for(base / "full"))
    seen: list[tuple[str, int]] = []

    def stop(split: str, batch: int) -> None:
        seen.append((split, batch))
        if len(seen) == STOP_AFTER:
            raise Interrupted

    with pytest.raises(Interrupted):
        extract(config_for(base / "resumed"), observe=stop)
    progress = json.loads((base / "resumed" / "train" / PROGRESS_NAME).read_text())
    manifest = json.loads((base / "resumed" / "manifest.json").read_text())
    assert progress["done"] == [0, 1] and "train" not in manifest["splits"]
    rerun: list[tuple[str, int]] = []
    extract(config_for(base / "resumed"), observe=lambda split, batch: rerun.append((split, batch)))
    assert rerun[0] == ("train", 2) and len(rerun) == 12 // BATCH - STOP_AFTER + 4 // BATCH + 2  # test: 5 images -> 2 batches
    return {"full": base / "full", "resumed": base / "resumed"}


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_is_valid_with_the_expected_shapes(stores):
    store = FeatureStore(stores["full"])
    assert store.splits == ["dev", "test", "train"]
    for split, size in SPLIT_SIZES.items():
        features = store.split(split)
        features.validate()
        n_img = size + (split == "test")
        assert features.regions.shape == (n_img, 49, 1280) and features.regions.dtype == np.float16
        assert features.objects.shape == (n_img, 10, 1280) and features.objects.dtype == np.float16
        assert features.boxes.shape == (n_img, 10, 4) and (features.boxes[:] >= 0).all() and (features.boxes[:] <= 1).all()
        assert features.word_sets == ["glove50"] and features.words("glove50").shape == (5 * n_img, 30, 50)
        assert features.captions_per_image() == 5
        assert features.lengths.tolist() == [len(tokenize(c)) for c in features.captions]
    manifest = store.manifest
    extractor = manifest["extractor"]
    assert extractor["backbone"]["name"] == "efficientnet-lite0" and extractor["backbone"]["grid"] == 7
    assert extractor["backbone"]["preprocessing"]["size"] == 224 and extractor["detector"]["name"] == "ssd-mobilenet-v2-coco"
    train = manifest["splits"]["train"]
    assert train["bad_images"] == [] and 0 < train["mean_real_boxes"] <= 10
    assert len(train["inputs"]["images_sha256"]) == 64 and train["word_sets"]["glove50"]["words"] > 0


def test_regions_are_the_backbone_map_of_the_image(stores, mini_flickr, backbone_assets):
    features = FeatureStore(stores["full"]).split("dev")
    backbone = RegionBackbone.from_manifest(backbone_assets / "efficientnet-lite0-7x7.json")
    image = load_image(mini_flickr[0] / features.image_names[1])
    expected = regions_from_feature_map(backbone.run(backbone.preprocessing.apply(image)[None]))[0]  # [R, C]
    np.testing.assert_array_equal(features.regions[1], expected.astype(np.float16))


def test_a_bad_image_is_zeroed_listed_and_the_run_goes_on(stores):
    store = FeatureStore(stores["full"])
    test = store.split("test")
    bad = store.manifest["splits"]["test"]["bad_images"]
    assert [b["name"] for b in bad] == [CORRUPT]
    assert bad[0]["reason"].startswith(f"{CORRUPT}: cannot decode image")
    row = test.image_names.index(CORRUPT)
    assert not test.regions[row].any() and not test.objects[row].any() and test.objects_real[row] == 0
    assert test.regions[row - 1].any() and test.objects_real[:row].min() >= 0


def test_resumed_store_is_byte_identical_to_an_uninterrupted_one(stores):
    full, resumed = store_files(stores["full"]), store_files(stores["resumed"])
    assert sorted(full) == sorted(resumed) and not any(name.endswith(PROGRESS_NAME) for name in full)
    different = [name for name in full if full[name] != resumed[name]]
    assert different == []


def test_rerun_on_a_finished_store_recomputes_nothing(stores, config_for, cli_cache, capsys, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(stores["full"], root)
    before = store_files(root)
    calls: list = []
    reports = extract(config_for(root), observe=lambda *batch: calls.append(batch))
    assert calls == [] and all(r.up_to_date for r in reports.values())
    assert store_files(root) == before
    cfg = config_for(root)
    argv = ["--images", str(cfg.images), "--captions", str(cfg.captions), "--out", str(root), "--assets", str(cfg.assets),
            "--batch-size", str(BATCH)]
    shutil.rmtree(root / "train")  # a split whose arrays vanished is not "up to date" ...
    assert main(argv) == 0  # ... so only that split is computed again
    out = capsys.readouterr().out
    assert "dev: 4 images (up to date, nothing recomputed)" in out and "train: 12 images (12 images computed)" in out
    assert store_files(root) == before


def test_adding_a_word_set_later_computes_only_that_set(stores, config_for, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(stores["full"], root)
    vectors = tmp_path / "tiny-vectors.txt"
    vectors.write_text("dog 1 0 0\nruns 0 1 0\na 0 0 1\n", encoding="utf-8")
    calls: list = []
    extract(config_for(root, word_features=("glove50", str(vectors))), observe=lambda *batch: calls.append(batch))
    assert calls == []
    store = FeatureStore(root)
    train = store.split("train")
    assert train.word_sets == ["glove3", "glove50"] and train.words("glove3").shape == (60, 30, 3)
    assert store.manifest["splits"]["train"]["word_sets"]["glove3"]["oov_rate"] > 0.5
    full = store_files(stores["full"])
    assert all(full[name] == data for name, data in store_files(root).items() if name.endswith(("regions.npy", "objects.npy", "words_glove50.npy")))


def test_changed_captions_recompute_words_but_not_images(stores, config_for, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(stores["full"], root)
    captions = tmp_path / "captions.txt"
    original = config_for(root).captions
    first_train = (original.parent / "split_train.txt").read_text().split()[0]
    text = original.read_text(encoding="utf-8")
    captions.write_text(text.replace(f"{first_train}#0\t", f"{first_train}#0\tA dog . ", 1), encoding="utf-8")
    for split_file in original.parent.glob("split_*.txt"):
        shutil.copy(split_file, tmp_path / split_file.name)
    calls: list = []
    reports = extract(config_for(root, captions=captions), observe=lambda *batch: calls.append(batch))
    assert calls == [] and [s for s, r in reports.items() if not r.up_to_date] == ["train"]
    train = FeatureStore(root).split("train")
    assert train.captions[0].startswith("A dog . ")
    assert train.lengths[0] == len(tokenize(train.captions[0]))


def test_a_different_extractor_setup_is_refused_in_one_line(stores, config_for, cli_cache, capsys):
    cfg = config_for(stores["full"])
    argv = ["--images", str(cfg.images), "--captions", str(cfg.captions), "--out", str(stores["full"]), "--assets", str(cfg.assets),
            "--boxes", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different extractor setup" in err[0]
    with pytest.raises(StoreError, match="different extractor setup"):
        extract(config_for(stores["full"], boxes_per_image=5))


def test_missing_assets_are_one_line_errors(config_for, cli_cache, tmp_path, capsys):
    cfg = config_for(tmp_path / "store")
    argv = ["--images", str(cfg.images), "--captions", str(cfg.captions), "--out", str(tmp_path / "store"), "--assets", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "efficientnet-lite0-7x7.json: asset manifest not found" in err
    assert not (tmp_path / "store").exists()


def test_karpathy_json_input(mini_flickr, config_for, tmp_path):
    images, _ = mini_flickr
    names = sorted(p.name for p in images.iterdir() if p.name != CORRUPT)[:3]
    payload = {"images": [
        {"filename": name, "split": split, "sentences": [{"raw": f"A photo number {i} ."}, {"raw": "Something happens here ."}]}
        for i, (name, split) in enumerate(zip(names, ["val", "test", "test"]))
    ]}
    captions = tmp_path / "dataset_flickr8k.json"
    captions.write_text(json.dumps(payload), encoding="utf-8")
    extract(config_for(tmp_path / "store", captions=captions, format=CaptionFormat.KARPATHY, splits=("dev", "test")))
    store = FeatureStore(tmp_path / "store")
    assert store.splits == ["dev", "test"] and store.split("test").image_names == names[1:]
    assert store.split("test").captions_per_image() == 2
    with pytest.raises(DataError, match=r"dataset_flickr8k\.json: no split \['train'\]; the file has \['dev', 'test'\]"):
        extract(config_for(tmp_path / "other", captions=captions, format=CaptionFormat.KARPATHY, splits=("train",)))


def test_a_second_writer_on_the_same_store_is_refused(config_for, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="store locking uses POSIX advisory locks")
    root = tmp_path / "store"
    root.mkdir()
    with open(root / LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running extraction holds it
        with pytest.raises(StoreError, match=r"store: another engine\.features process is writing this store"):
            extract(config_for(root))
    assert not (root / "manifest.json").exists()


def test_a_plain_folder_of_images_needs_no_split_lists(mini_flickr, config_for, cli_cache, tmp_path, capsys):
    """--format folder: every image file of the folder is split "all"; captions optional, each naming its image."""
    images, _ = mini_flickr
    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(p.name for p in images.iterdir() if p.name != CORRUPT)[:3]
    for name in names:
        (folder / name).symlink_to(images / name)
    (folder / "notes.txt").write_text("not an image")
    extract(config_for(tmp_path / "gallery", images=folder, captions=None, format=CaptionFormat.FOLDER, splits=("all",)))
    split = FeatureStore(tmp_path / "gallery").split("all")
    assert split.image_names == names and len(split.lengths) == 0
    lines = tmp_path / "captions.tsv"
    lines.write_text(f"{names[1]}\tTwo dogs play in the snow .\n\n{names[0]}#0\tA child smiles .\nabsent.jpg\tNobody .\n")
    assert main(["--format", "folder", "--images", str(folder), "--captions", str(lines), "--out", str(tmp_path / "captioned"),
                 "--assets", str(config_for(tmp_path / "x").assets)]) == 0
    assert "absent.jpg is not an image in" in capsys.readouterr().err
    split = FeatureStore(tmp_path / "captioned").split("all")
    assert split.captions == ["A child smiles .", "Two dogs play in the snow ."] and split.caption_image.tolist() == [0, 1]
    lines.write_text("a caption that names no image\n")
    assert main(["--format", "folder", "--images", str(folder), "--captions", str(lines), "--out", str(tmp_path / "plain"),
                 "--assets", str(config_for(tmp_path / "x").assets)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "captions.tsv line 1: expected '<image file><TAB><caption>'" in err


def test_words_pipelined_keeps_order_raises_at_its_chunk_and_stops_with_the_consumer():
    """Extractor.words_pipelined encodes the next chunk while the caller stores this one; nothing else changes."""
    import threading
    import time
    from types import SimpleNamespace

    from engine.errors import CaptionError
    from engine.features import Extractor

    encoded: list[str] = []
    lock = threading.Lock()

    def encode(captions, max_words):
        time.sleep(0.02 if captions[0] == "c0" else 0.0)  # the first chunk is the slowest: order must still hold
        with lock:
            encoded.append(captions[0])
        if captions[0] == "bad":
            raise CaptionError("no word", 0)
        return (captions[0], max_words)

    owner = SimpleNamespace(word_sets={"w": SimpleNamespace(encode=encode)}, config=SimpleNamespace(max_words=7))
    chunks = [[f"c{i}"] for i in range(5)]
    assert list(Extractor.words_pipelined(owner, "w", iter(chunks))) == [(f"c{i}", 7) for i in range(5)]
    results = Extractor.words_pipelined(owner, "w", iter([["c0"], ["bad"], ["c2"], ["c3"]]))
    assert next(results) == ("c0", 7)
    with pytest.raises(CaptionError):
        next(results)
    encoded.clear()
    results = Extractor.words_pipelined(owner, "w", iter(chunks))
    assert next(results) == ("c0", 7)
    results.close()  # the consumer stops: at most the one chunk in flight was encoded, none after it
    assert encoded in (["c0"], ["c0", "c1"])
