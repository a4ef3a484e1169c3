"""Dataset readers: image names and their raw captions, per split (numpy-free, torch-free).

Three inputs are understood:

- Flickr8K token format (`read_flickr8k`): `captions.txt` with `<image>#<n>\\t<caption>` lines
  plus `split_train.txt`, `split_dev.txt`, `split_test.txt` (one image name a line).
- Karpathy split JSON (`read_karpathy`): `dataset_flickr8k.json`, `dataset_flickr30k.json`,
  `dataset_coco.json` (images[].filename, filepath, split, sentences[].raw).
- One caption a line (`read_caption_lines`): what `--captions` of the engine reads.

Real files have quirks (Flickr8K names 104 images that do not exist, one line holds two
captions, ...). Quirks are skipped and reported in `Dataset.warnings`, one line each naming the
file and line; a file that cannot be read at all raises `DataError` with one line.

    python -m engine.data ../shared/data/flickr8k        # prints the split sizes and warnings
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli import ArgumentParser, command
from engine.errors import DataError
from engine.files import file_sha256

SPLITS = ("train", "dev", "test")
KARPATHY_SPLITS = {"train": "train", "val": "dev", "test": "test", "restval": "restval"}
FLICKR_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>[^\t]*)$")
NAMED_LINE = re.compile(r"^(?P<image>[^\t]+)\t(?P<caption>[^\t]*)$")  # `<image file><TAB><caption>`
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FOLDER_SPLIT = "all"  # the one split of a plain folder of images
SHOWN_PER_KIND = 10  # individual warnings of one kind before the rest are summarised in a count
EXAMPLES_IN_SUMMARY = 3  # names quoted in a summarised warning


@dataclass
class CaptionedImage:
    """One image (its path relative to the images folder) and its raw captions, in order."""

    name: str
    captions: list[str]


@dataclass
class Dataset:
    """Splits of captioned images, the quirks met while reading, and the files read (path -> sha256)."""

    splits: dict[str, list[CaptionedImage]]
    warnings: list[str] = field(default_factory=list)
    images_dir: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def image_path(self, image: CaptionedImage) -> Path:
        if self.images_dir is None:
            raise DataError(f"{image.name}: this dataset was read without an images folder; pass images_dir")
        return self.images_dir / image.name

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {"images": len(images), "captions": sum(len(i.captions) for i in images)}
            for split, images in self.splits.items()
        }


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _Report:
    """Collects warnings; after SHOWN_PER_KIND of one kind, further ones are only counted."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.hidden: collections.Counter[str] = collections.Counter()
        self.shown: collections.Counter[str] = collections.Counter()

    def add(self, kind: str, line: str) -> None:
        if self.shown[kind] < SHOWN_PER_KIND:
            self.shown[kind] += 1
            self.lines.append(line)
        else:
            self.hidden[kind] += 1

    def finish(self) -> list[str]:
        for kind, count in self.hidden.items():
            self.lines.append(f"... and {count} more warnings of kind {kind!r}")
        return self.lines


def _summary(names: list[str]) -> str:
    examples = ", ".join(names[:EXAMPLES_IN_SUMMARY])
    return f"{examples}{', ...' if len(names) > EXAMPLES_IN_SUMMARY else ''}"


def _read_text(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file without their line ends; DataError naming the line otherwise."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    lines = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                lines.append(text.removeprefix("\ufeff") if number == 1 else text)  # a byte-order mark is not text
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path.name} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); expected UTF-8 text"
                ) from None
    return lines


def image_files(folder: Path) -> tuple[list[Path], int]:
    """(image files of a folder sorted by name, hidden files skipped). A name with an image suffix is an
    image, a broken symbolic link included (reading it reports it, never a silent skip); a hidden name
    (`.x.jpg`, macOS `._x.jpg` sidecars) is not an image: skipped and counted, the caller says so."""
    paths, hidden = [], 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not (path.is_file() or (path.is_symlink() and not path.exists())):
            continue
        if path.name.startswith("."):
            hidden += 1
            continue
        paths.append(path)
    return paths, hidden


def _existing_files(images_dir: Path) -> set[str]:
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    return set(os.listdir(images_dir))


def read_flickr8k(
    root: str | Path,
    images_dir: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    captions_file: str = "captions.txt",
    captions_per_image: int | None = None,
) -> Dataset:
    """Read Flickr8K in its original token format.

    Order is deterministic: images in split-file order, each image's captions by #n.
    Images that have no file in `images_dir` (default `root/images`) are dropped, with one
    summary warning per file. If `captions_per_image` is given, images with another number of
    captions are dropped with a warning; otherwise they are kept and reported.
    """
    root = Path(root)
    images_dir = Path(images_dir) if images_dir is not None else root / "images"
    captions_path = root / captions_file
    existing = _existing_files(images_dir)
    report = _Report()

    captions: dict[str, dict[int, str]] = {}
    malformed = 0
    for number, line in enumerate(_read_text(captions_path, "captions file"), start=1):
        if not line.strip():
            report.add("empty line", f"{captions_file} line {number}: empty line; skipped")
            continue
        match = FLICKR_LINE.match(line)
        if match is None:
            malformed += 1
            report.add("malformed", f"{captions_file} line {number}: expected '<image>#<n>\\t<caption>', got {_shorten(line)}; skipped")
            continue
        image, n, caption = match["image"], int(match["n"]), match["caption"].strip()
        if not caption:
            report.add("empty caption", f"{captions_file} line {number}: empty caption for {image}#{n}; skipped")
            continue
        per_image = captions.setdefault(image, {})
        if n in per_image:
            report.add("duplicate", f"{captions_file} line {number}: duplicate caption number {image}#{n}; kept the first")
            continue
        per_image[n] = caption
    if not captions:
        raise DataError(f"{captions_path}: no line of the form '<image>#<n>\\t<caption>' ({malformed} malformed lines)")

    no_file = sorted(name for name in captions if name not in existing)
    result: dict[str, list[CaptionedImage]] = {}
    seen_in: dict[str, str] = {}
    listed: set[str] = set()
    sources = {str(captions_path): file_sha256(captions_path)}
    for split in splits:
        split_path = root / f"split_{split}.txt"
        names = _read_text(split_path, f"split list of {split!r}")
        sources[str(split_path)] = file_sha256(split_path)
        images: list[CaptionedImage] = []
        missing: list[str] = []
        for number, raw in enumerate(names, start=1):
            name = raw.strip()
            if not name:
                continue
            listed.add(name)
            if name in seen_in:
                if seen_in[name] == split:
                    report.add("duplicate", f"{split_path.name} line {number}: {name} listed twice; kept the first")
                    continue
                raise DataError(f"{split_path.name} line {number}: {name} is also in split {seen_in[name]!r}; expected disjoint splits")
            seen_in[name] = split
            if name not in existing:
                missing.append(name)
                continue
            if name not in captions:
                report.add("no captions", f"{split_path.name} line {number}: {name} has no caption in {captions_file}; dropped")
                continue
            ordered = [text for _, text in sorted(captions[name].items())]
            if captions_per_image is not None and len(ordered) != captions_per_image:
                report.add("caption count", f"{split_path.name} line {number}: {name} has {len(ordered)} captions, expected {captions_per_image}; dropped")
                continue
            images.append(CaptionedImage(name, ordered))
        if missing:
            report.add("no image file", f"{split_path.name}: {len(missing)} images have no file in {images_dir} ({_summary(missing)}); dropped")
        counts = collections.Counter(len(image.captions) for image in images)
        if len(counts) > 1:
            usual = counts.most_common(1)[0][0]
            odd = [f"{image.name} ({len(image.captions)})" for image in images if len(image.captions) != usual]
            report.add("caption count", f"{split_path.name}: {len(odd)} images do not have {usual} captions ({_summary(odd)}); kept")
        result[split] = images

    unlisted_no_file = [name for name in no_file if name not in listed]
    if unlisted_no_file:
        report.add("no image file", f"{captions_file}: {len(unlisted_no_file)} more images named there have no file in {images_dir} and are in no split ({_summary(unlisted_no_file)}); ignored")
    return Dataset(result, report.finish(), images_dir, sources)


def read_folder(images_dir: str | Path, captions_path: str | Path | None = None, split: str = FOLDER_SPLIT) -> Dataset:
    """A plain folder of images (no split lists): every image file in it, sorted by name, as one split.

    Captions are optional: each line `<image file><TAB><caption>` or Flickr8K's `<image>#<n><TAB><caption>`
    captions that image (in line order). A caption has to name its image: the store ties every caption to
    one (engine/store.py caption_image); captions that describe no image are ranked straight from a text
    file with `python -m engine.score --captions FILE`. Images without captions are kept (a gallery)."""
    images_dir = Path(images_dir)
    _existing_files(images_dir)  # the folder exists
    paths, hidden = image_files(images_dir)
    names = [path.name for path in paths]
    if not names:
        raise DataError(f"{images_dir}: no image file ({', '.join(sorted(IMAGE_SUFFIXES))}); expected a folder of images")
    report = _Report()
    if hidden:
        report.add("hidden file", f"{images_dir}: {hidden} hidden files with an image suffix (e.g. macOS ._ sidecars) are not images; skipped")
    captions: dict[str, list[str]] = {name: [] for name in names}
    sources = {}
    if captions_path is not None:
        captions_path = Path(captions_path)
        sources[str(captions_path)] = file_sha256(captions_path) if captions_path.is_file() else ""
        for number, line in enumerate(_read_text(captions_path, "captions file"), start=1):
            if not line.strip():
                continue
            match = FLICKR_LINE.match(line) or NAMED_LINE.match(line)
            if match is None:
                raise DataError(f"{captions_path.name} line {number}: expected '<image file><TAB><caption>' (or "
                                f"'<image>#<n><TAB><caption>'), got {_shorten(line)}; captions that name no image are "
                                f"ranked with python -m engine.score --captions FILE, not stored")
            image, caption = match["image"].strip(), match["caption"].strip()
            if not caption:
                report.add("empty caption", f"{captions_path.name} line {number}: empty caption for {image}; skipped")
            elif image not in captions:
                report.add("no image file", f"{captions_path.name} line {number}: {image} is not an image in {images_dir}; skipped")
            else:
                captions[image].append(caption)
    return Dataset({split: [CaptionedImage(name, captions[name]) for name in names]}, report.finish(), images_dir, sources)


def read_karpathy(
    json_path: str | Path,
    images_dir: str | Path | None,
    restval_to_train: bool = True,
) -> Dataset:
    """Read a Karpathy split JSON (Flickr8K, Flickr30K, COCO).

    Splits are renamed train/dev/test ("val" -> "dev"); "restval" (COCO) joins train when
    `restval_to_train`, else stays a split of its own. An image's name is
    `filepath/filename` when the JSON has a filepath (COCO), else `filename`. With
    `images_dir=None` image files are not checked.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"{json_path}: Karpathy split JSON not found")
    try:
        payload = json.loads(json_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path.name}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise DataError(f"{json_path.name}: expected an object with an 'images' list, got {type(payload).__name__}")
    images_dir = Path(images_dir) if images_dir is not None else None
    report = _Report()
    result: dict[str, list[CaptionedImage]] = {}
    missing: list[str] = []
    checked_dirs: dict[Path, set[str]] = {}
    for index, entry in enumerate(payload["images"]):
        where = f"{json_path.name} images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DataError(f"{where}: expected an object with a 'filename' string, got {_shorten(str(entry))}")
        split = KARPATHY_SPLITS.get(entry.get("split"))
        if split is None:
            raise DataError(f"{where}: split {entry.get('split')!r}; expected one of {sorted(KARPATHY_SPLITS)}")
        if split == "restval" and restval_to_train:
            split = "train"
        name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{where}: expected a 'sentences' list for {name}, got {type(sentences).__name__}")
        texts = []
        for number, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                report.add("empty caption", f"{where}.sentences[{number}]: empty or missing 'raw' caption for {name}; skipped")
                continue
            texts.append(raw.strip())
        if not texts:
            report.add("no captions", f"{where}: {name} has no caption; dropped")
            continue
        if images_dir is not None:
            folder = (images_dir / name).parent
            if folder not in checked_dirs:
                checked_dirs[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if Path(name).name not in checked_dirs[folder]:
                missing.append(name)
                continue
        result.setdefault(split, []).append(CaptionedImage(name, texts))
    if missing:
        report.add("no image file", f"{json_path.name}: {len(missing)} images have no file in {images_dir} ({_summary(missing)}); dropped")
    if not result:
        raise DataError(f"{json_path.name}: no image with captions found; expected images[] with split and sentences")
    ordered = {split: result[split] for split in ("train", "dev", "test", "restval") if split in result}
    return Dataset(ordered, report.finish(), images_dir, {str(json_path): file_sha256(json_path)})


def read_caption_lines(path: str | Path) -> list[str]:
    """One caption a line (UTF-8). An empty line or undecodable bytes is a DataError naming the line."""
    path = Path(path)
    lines = _read_text(path, "captions file")
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are an editor habit, not captions
    if not lines:
        raise DataError(f"{path}: no captions; expected one caption per line")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path.name} line {number}: empty caption; expected at least one word")
    return [line.strip() for line in lines]


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Read a dataset and print its split sizes and quirks.")
    parser.add_argument("path", help="Flickr8K folder (captions.txt + split lists) or a Karpathy JSON file")
    parser.add_argument("--images", help="images folder (default: PATH/images for Flickr8K)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    dataset = read_karpathy(path, args.images) if path.suffix == ".json" else read_flickr8k(path, args.images)
    for split, count in dataset.counts().items():
        print(f"{split}: {count['images']} images, {count['captions']} captions")
    for warning in dataset.warnings:
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
