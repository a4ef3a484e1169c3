"""Dataset readers: the real Flickr8K files, tiny hand-made files with every quirk, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data import read_caption_lines, read_flickr8k, read_karpathy
from engine.errors import DataError


# ---------------------------------------------------------------- real Flickr8K
def test_flickr8k_real_split_sizes_and_quirks(flickr8k):
    dataset = read_flickr8k(flickr8k)
    assert {split: len(images) for split, images in dataset.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(len(image.captions) == 5 for images in dataset.splits.values() for image in images)
    warnings = "\n".join(dataset.warnings)
    assert "split_train.txt: 74 images have no file" in warnings
    assert "split_dev.txt: 13 images have no file" in warnings
    assert "split_test.txt: 13 images have no file" in warnings
    assert "captions.txt line 40809: expected '<image>#<n>\\t<caption>'" in warnings
    assert len(dataset.warnings) < 20  # summarised, not one line per missing image


def test_flickr8k_real_order_is_split_file_order(flickr8k):
    dataset = read_flickr8k(flickr8k)
    existing = {p.name for p in (flickr8k / "images").iterdir()}
    listed = [n.strip() for n in (flickr8k / "split_test.txt").read_text().splitlines() if n.strip() in existing]
    assert [image.name for image in dataset.splits["test"]] == listed
    first = dataset.splits["test"][0]
    lines = [line.split("\t", 1)[1] for line in (flickr8k / "captions.txt").read_text().splitlines() if line.startswith(first.name + "#")]
    assert first.captions == lines
    assert dataset.image_path(first).is_file()


# ---------------------------------------------------------------- tiny Flickr8K with quirks
def make_flickr(root: Path, lines: list[str], splits: dict[str, list[str]], images: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    for name in images:
        (root / "images" / name).write_bytes(b"")
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, names in splits.items():
        (root / f"split_{split}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root


def tiny_flickr(root: Path) -> Path:
    lines = [
        "a.jpg#1\tA second caption of a .",       # 1: out of order, sorted by #n
        "a.jpg#0\tA first caption of a .",        # 2
        "b.jpg#0\tOnly caption of b .",           # 3
        "b.jpg 1 no tab here",                    # 4: malformed
        "b.jpg#1\t   ",                           # 5: empty caption
        "a.jpg#1\tA duplicate number .",          # 6: duplicate
        "gone.jpg#0\tAn image with no file .",    # 7: no image file
        "c.jpg#0\tC caption .",                   # 8
        "c.jpg#1\tC second caption .",            # 9
    ]
    return make_flickr(root, lines, {"train": ["a.jpg", "gone.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["c2.jpg"]},
                       ["a.jpg", "b.jpg", "c.jpg", "c2.jpg"])


def test_flickr8k_quirks_are_reported_with_file_and_line(tmp_path):
    dataset = read_flickr8k(tiny_flickr(tmp_path))
    train = dataset.splits["train"]
    assert [image.name for image in train] == ["a.jpg", "b.jpg"]
    assert train[0].captions == ["A first caption of a .", "A second caption of a ."]
    assert dataset.splits["test"] == []
    warnings = "\n".join(dataset.warnings)
    assert "captions.txt line 4: expected '<image>#<n>\\t<caption>', got 'b.jpg 1 no tab here'" in warnings
    assert "captions.txt line 5: empty caption for b.jpg#1" in warnings
    assert "captions.txt line 6: duplicate caption number a.jpg#1; kept the first" in warnings
    assert "split_train.txt: 1 images have no file" in warnings and "gone.jpg" in warnings
    assert "split_test.txt line 1: c2.jpg has no caption in captions.txt" in warnings
    assert "split_train.txt: 1 images do not have 2 captions (b.jpg (1)); kept" in warnings


def test_flickr8k_captions_per_image_drops_other_counts(tmp_path):
    dataset = read_flickr8k(tiny_flickr(tmp_path), captions_per_image=2)
    assert [image.name for image in dataset.splits["train"]] == ["a.jpg"]
    assert any("b.jpg has 1 captions, expected 2; dropped" in w for w in dataset.warnings)


def test_flickr8k_many_malformed_lines_are_summarised(tmp_path):
    lines = ["a.jpg#0\tfine ."] + [f"broken line {i}" for i in range(30)]
    dataset = read_flickr8k(make_flickr(tmp_path, lines, {"train": ["a.jpg"], "dev": [], "test": []}, ["a.jpg"]))
    assert dataset.warnings[-1] == "... and 20 more warnings of kind 'malformed'"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "captions.txt").unlink(), r"captions.txt: captions file not found"),
        (lambda root: (root / "split_dev.txt").unlink(), r"split_dev.txt: split list of 'dev' not found"),
        (lambda root: (root / "captions.txt").write_bytes(b"a.jpg#0\tok .\na.jpg#1\tcaf\xe9 .\n"),
         r"captions.txt line 2: not valid UTF-8 \(byte 0xe9 at column 12\)"),
        (lambda root: (root / "captions.txt").write_text("a,b,c\nd,e,f\n"), r"captions.txt: no line of the form .* \(2 malformed lines\)"),
        (lambda root: (root / "split_test.txt").write_text("a.jpg\n"), r"split_test.txt line 1: a.jpg is also in split 'train'; expected disjoint splits"),
        (lambda root: __import__("shutil").rmtree(root / "images"), r"images: images folder not found"),
    ],
)
def test_flickr8k_bad_input_is_one_line(tmp_path, breakage, message):
    root = tiny_flickr(tmp_path)
    breakage(root)
    with pytest.raises(DataError, match=message):
        read_flickr8k(root)


# ---------------------------------------------------------------- Karpathy JSON
def karpathy_json(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"dataset": "coco", "images": images}), encoding="utf-8")
    return path


def entry(filename: str, split: str, *captions: str, filepath: str | None = None) -> dict:
    item = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        item["filepath"] = filepath
    return item


def test_karpathy_splits_filepath_and_missing_images(tmp_path):
    images = tmp_path / "images"
    (images / "train2014").mkdir(parents=True)
    (images / "val2014").mkdir()
    for name in ("train2014/t.jpg", "val2014/v.jpg", "val2014/r.jpg", "val2014/x.jpg"):
        (images / name).write_bytes(b"")
    path = karpathy_json(tmp_path / "dataset_coco.json", [
        entry("t.jpg", "train", "A train caption .", " ", filepath="train2014"),
        entry("v.jpg", "val", "A dev caption .", filepath="val2014"),
        entry("r.jpg", "restval", "A restval caption .", filepath="val2014"),
        entry("x.jpg", "test", "A test caption .", "Another .", filepath="val2014"),
        entry("lost.jpg", "test", "No file .", filepath="val2014"),
    ])
    dataset = read_karpathy(path, images)
    assert {s: [i.name for i in v] for s, v in dataset.splits.items()} == {
        "train": ["train2014/t.jpg", "val2014/r.jpg"], "dev": ["val2014/v.jpg"], "test": ["val2014/x.jpg"]}
    assert dataset.splits["train"][0].captions == ["A train caption ."]
    assert dataset.splits["test"][0].captions == ["A test caption .", "Another ."]
    warnings = "\n".join(dataset.warnings)
    assert "dataset_coco.json images[0].sentences[1]: empty or missing 'raw' caption" in warnings
    assert "dataset_coco.json: 1 images have no file" in warnings and "val2014/lost.jpg" in warnings
    kept = read_karpathy(path, images, restval_to_train=False)
    assert [i.name for i in kept.splits["restval"]] == ["val2014/r.jpg"]
    assert read_karpathy(path, None).counts()["test"] == {"images": 2, "captions": 3}


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", r"bad.json: not valid UTF-8 JSON"),
        ("[1, 2]", r"bad.json: expected an object with an 'images' list, got list"),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "holdout", "sentences": []}]}),
         r"bad.json images\[0\]: split 'holdout'; expected one of \['restval', 'test', 'train', 'val'\]"),
        (json.dumps({"images": [{"split": "train"}]}), r"bad.json images\[0\]: expected an object with a 'filename' string"),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}), r"bad.json: no image with captions found"),
    ],
)
def test_karpathy_bad_input_is_one_line(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(payload, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_karpathy(path, None)


# ---------------------------------------------------------------- one caption a line
def test_caption_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"A dog runs .\r\n  Two cats sleep on a sofa  \n\n")
    assert read_caption_lines(path) == ["A dog runs .", "Two cats sleep on a sofa"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"A dog .\n\nA cat .\n", r"queries.txt line 2: empty caption; expected at least one word"),
        (b"A dog .\nA cat .\nA \xff bird\n", r"queries.txt line 3: not valid UTF-8 \(byte 0xff at column 3\)"),
        (b"\n\n", r"queries.txt: no captions; expected one caption per line"),
    ],
)
def test_caption_lines_bad_input(tmp_path, content, message):
    path = tmp_path / "queries.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_caption_lines(path)


def test_caption_lines_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing.txt: captions file not found"):
        read_caption_lines(tmp_path / "nothing.txt")


def test_cli(tmp_path, capsys):
    from engine.data import main

    assert main([str(tiny_flickr(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "train: 2 images, 3 captions" in out and "warning: captions.txt line 4:" in out
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
