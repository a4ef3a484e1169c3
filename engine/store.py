"""The feature store: BSSAN inputs of a dataset, memory-mapped, one folder per split.

Layout of a store directory (written by `python -m engine.features`, read by training,
evaluation, the engine and the benchmarks):

    STORE/manifest.json                 format version, extractor (names, versions, settings),
                                        input hashes, and per split: counts and array specs
    STORE/<split>/image_names.txt       one image file name per line            [N_img]
    STORE/<split>/regions.npy           region maps R       float16 [N_img, D, M]
    STORE/<split>/objects.npy           object features O   float16 [N_img, P, Q]
    STORE/<split>/boxes.npy             object boxes x1,y1,x2,y2 in [0,1] float32 [N_img, P, 4]
    STORE/<split>/objects_real.npy      how many of the P boxes the detector found   int16 [N_img]
    STORE/<split>/captions.txt          one raw caption per line                     [N_cap]
    STORE/<split>/caption_image.npy     index of each caption's image                int32 [N_cap]
    STORE/<split>/lengths.npy           words per caption after tokenizing (>= 1)    int32 [N_cap]
    STORE/<split>/words_<set>.npy       word vectors of one word-feature set         float16 [N_cap, L, E]

A word-feature set is named ("glove50", "minilm", ...); each has its own array so one store
serves both the paper's fixed word vectors and the contextual ones. Positions past a
caption's length are zero.

Reading is lazy (np.load with mmap_mode="r"), so a 6,000-image split costs no RAM until a
batch is sliced. `validate()` checks every shape and dtype against the manifest; NaN checks
run per batch (`check_finite`) because scanning GBs up front would cost a full read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import StoreError
from engine.files import write_json_atomic, write_text_atomic

STORE_FORMAT = "bssan-feature-store"
STORE_VERSION = 1
MANIFEST_NAME = "manifest.json"

# name -> (dtype, rank) of every per-split array; words_<set> arrays share the "words" spec.
ARRAY_SPECS: dict[str, tuple[str, int]] = {
    "regions": ("float16", 3),
    "objects": ("float16", 3),
    "boxes": ("float32", 3),
    "objects_real": ("int16", 1),
    "caption_image": ("int32", 1),
    "lengths": ("int32", 1),
    "words": ("float16", 3),
}


def _spec_of(name: str) -> tuple[str, int]:
    return ARRAY_SPECS["words" if name.startswith("words_") else name]


def check_finite(array: np.ndarray, what: str) -> None:
    """Raise StoreError naming `what` if the array holds NaN or infinity."""
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        raise StoreError(f"{what}: non-finite value at index {bad}; expected finite features")


@dataclass
class SplitFeatures:
    """Lazy view of one split of a store. Arrays are read-only memory maps."""

    root: Path
    name: str
    spec: dict = field(default_factory=dict)

    def _path(self, array: str) -> Path:
        return self.root / self.name / f"{array}.npy"

    def array(self, name: str) -> np.ndarray:
        path = self._path(name)
        if not path.is_file():
            raise StoreError(f"{path}: missing array {name!r}; expected it in split {self.name!r} (re-run python -m engine.features)")
        try:
            data = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise StoreError(f"{path}: not a readable .npy array ({exc})") from exc
        dtype, rank = _spec_of(name)
        if data.dtype != np.dtype(dtype) or data.ndim != rank:
            raise StoreError(f"{path}: expected {dtype} array of rank {rank}, got {data.dtype} of shape {data.shape}")
        return data

    @property
    def regions(self) -> np.ndarray:
        return self.array("regions")  # [N_img, D, M]

    @property
    def objects(self) -> np.ndarray:
        return self.array("objects")  # [N_img, P, Q]

    @property
    def boxes(self) -> np.ndarray:
        return self.array("boxes")  # [N_img, P, 4]

    @property
    def objects_real(self) -> np.ndarray:
        return self.array("objects_real")  # [N_img]

    @property
    def caption_image(self) -> np.ndarray:
        return self.array("caption_image")  # [N_cap]

    @property
    def lengths(self) -> np.ndarray:
        return self.array("lengths")  # [N_cap]

    def words(self, word_set: str) -> np.ndarray:
        return self.array(f"words_{word_set}")  # [N_cap, L, E]

    @property
    def word_sets(self) -> list[str]:
        return sorted(p.stem[len("words_"):] for p in (self.root / self.name).glob("words_*.npy"))

    @property
    def image_names(self) -> list[str]:
        return _read_lines(self.root / self.name / "image_names.txt")

    @property
    def captions(self) -> list[str]:
        return _read_lines(self.root / self.name / "captions.txt")

    @property
    def num_images(self) -> int:
        return int(self.regions.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.lengths.shape[0])

    def validate(self) -> None:
        """Check every array's shape against the others and the manifest; one-line StoreError if not."""
        regions, objects, boxes = self.regions, self.objects, self.boxes
        n_img = regions.shape[0]
        for name, arr in (("objects", objects), ("boxes", boxes), ("objects_real", self.objects_real)):
            if arr.shape[0] != n_img:
                raise StoreError(f"{self._path(name)}: expected {n_img} rows (one per image, as regions.npy), got {arr.shape[0]}")
        if boxes.shape[1:] != (objects.shape[1], 4):
            raise StoreError(f"{self._path('boxes')}: expected shape [N_img, {objects.shape[1]}, 4], got {list(boxes.shape)}")
        lengths, caption_image = self.lengths, self.caption_image
        n_cap = lengths.shape[0]
        if caption_image.shape[0] != n_cap:
            raise StoreError(f"{self._path('caption_image')}: expected {n_cap} rows (as lengths.npy), got {caption_image.shape[0]}")
        if n_cap and (caption_image.min() < 0 or caption_image.max() >= n_img):
            raise StoreError(f"{self._path('caption_image')}: expected image indices in [0, {n_img}), got [{caption_image.min()}, {caption_image.max()}]")
        for word_set in self.word_sets:
            words = self.words(word_set)
            if words.shape[0] != n_cap:
                raise StoreError(f"{self._path('words_' + word_set)}: expected {n_cap} rows (as lengths.npy), got {words.shape[0]}")
            if n_cap and (lengths.min() < 1 or lengths.max() > words.shape[1]):
                raise StoreError(f"{self._path('lengths')}: expected lengths in [1, {words.shape[1]}], got [{lengths.min()}, {lengths.max()}]")
        if len(self.image_names) != n_img:
            raise StoreError(f"{self.root / self.name / 'image_names.txt'}: expected {n_img} lines, got {len(self.image_names)}")
        if len(self.captions) != n_cap:
            raise StoreError(f"{self.root / self.name / 'captions.txt'}: expected {n_cap} lines, got {len(self.captions)}")
        for name, expected in self.spec.get("shapes", {}).items():
            got = list(self.array(name).shape)
            if got != list(expected):
                raise StoreError(f"{self._path(name)}: manifest says shape {list(expected)}, file has {got}")

    def captions_per_image(self) -> int | None:
        """The constant number of captions per image when captions are grouped image by image, else None."""
        caption_image = np.asarray(self.caption_image)
        n_img = self.num_images
        if n_img == 0 or caption_image.shape[0] % n_img:
            return None
        per = caption_image.shape[0] // n_img
        expected = np.repeat(np.arange(n_img, dtype=np.int32), per)
        return per if np.array_equal(caption_image, expected) else None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise StoreError(f"{path}: missing; expected one entry per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []


class FeatureStore:
    """A feature store directory. `FeatureStore(path).split("test").regions` etc."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StoreError(f"{manifest_path}: missing; expected a feature store made by python -m engine.features")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{manifest_path}: expected format {STORE_FORMAT!r}, got {self.manifest.get('format')!r}")
        version = self.manifest.get("version")
        if not isinstance(version, int) or version > STORE_VERSION:
            raise StoreError(f"{manifest_path}: store format version {version!r} is newer than this code reads ({STORE_VERSION}); upgrade bssan-engine")

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest.get("splits", {}))

    def split(self, name: str) -> SplitFeatures:
        specs = self.manifest.get("splits", {})
        if name not in specs:
            raise StoreError(f"{self.root / MANIFEST_NAME}: no split {name!r}; the store has {sorted(specs)}")
        return SplitFeatures(self.root, name, specs[name])


class StoreWriter:
    """Creates or resumes a store: arrays are pre-allocated .npy memory maps filled in place.

    The manifest is written last (`finish_split`), so a store whose manifest lacks a split is
    incomplete by construction; progress within a split is the caller's (see engine.features).
    """

    def __init__(self, root: str | os.PathLike, extractor: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest_path = self.root / MANIFEST_NAME
        if manifest_path.is_file():
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if self.manifest.get("extractor") != extractor:
                raise StoreError(
                    f"{manifest_path}: store was made by a different extractor setup; expected {extractor}, "
                    f"got {self.manifest.get('extractor')} (write to a new --out directory)"
                )
        else:
            self.manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "extractor": extractor, "splits": {}}
            write_json_atomic(manifest_path, self.manifest, fsync=True)

    def open_array(self, split: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A writable memory map for `name`, created zero-filled or reopened if it exists with the same shape."""
        dtype, rank = _spec_of(name)
        if len(shape) != rank:
            raise StoreError(f"{name}: expected rank {rank}, got shape {shape}")
        path = self.root / split / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            existing = np.load(path, mmap_mode="r+")
            if existing.shape == tuple(shape) and existing.dtype == np.dtype(dtype):
                return existing
            del existing
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

    def write_lines(self, split: str, name: str, lines: list[str]) -> None:
        for i, line in enumerate(lines):
            if "\n" in line or "\r" in line:
                raise StoreError(f"{name} entry {i}: contains a line break; expected one line per entry")
        write_text_atomic(self.root / split / f"{name}.txt", "".join(line + "\n" for line in lines))

    def finish_split(self, split: str, info: dict) -> None:
        """Record a complete split in the manifest: `info` holds counts, shapes and input hashes."""
        arrays = sorted(p.stem for p in (self.root / split).glob("*.npy"))
        shapes = {name: list(np.load(self.root / split / f"{name}.npy", mmap_mode="r").shape) for name in arrays}
        self.manifest["splits"][split] = {**info, "shapes": shapes}
        write_json_atomic(self.root / MANIFEST_NAME, self.manifest, fsync=True)
