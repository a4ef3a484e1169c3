"""Images to region maps and object features: loading, preprocessing, and the ONNX graphs.

No torch here: the graphs are made once by `python -m export.backbones --out build/assets`,
each with a JSON manifest beside it (`<stem>.onnx` + `<stem>.json`) that declares its inputs,
outputs and, for a backbone, its preprocessing. This file is the only place where that
preprocessing is applied; training and export read it from here.

    backbone = RegionBackbone.from_manifest("build/assets/efficientnet-lite0-7x7.json", threads=2)
    images, bad = load_batch(paths, backbone.preprocessing)        # [B, 3, S, S] float32
    feature_map = backbone.run(images)                              # [B, C, h, w]
    regions = regions_from_feature_map(feature_map)                 # [B, R=h*w, C]
    objects = ObjectFeatures.from_manifest("build/assets/roi_align.json").run(feature_map, boxes)

Image loading: EXIF orientation is applied (a phone photo stored sideways with an Orientation tag
is scored upright, as a viewer shows it and a search user expects; EXIF_ORIENTATION is recorded
in every store's extractor record), grayscale / palette / CMYK / 16-bit grayscale become RGB, transparent
pixels are composited on white, and the image is stretched to the backbone's square size
(Flickr8K's images are already 224x224 stretched, so 224 is a no-op there). Files that cannot
be decoded, are truncated, or are too small or too large raise `ImageError` with one line
naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from engine.backends.onnxruntime import open_session  # noqa: F401  (THE session factory; re-exported)
from engine.errors import AssetError, ImageError, InputError
from engine.files import file_sha256

# Graph I/O names: the exporter (export/backbones.py) and these runners share them.
IMAGE_INPUT = "image"  # float32 [B, 3, S, S], preprocessed
FEATURE_MAP_OUTPUT = "feature_map"  # float32 [B, C, h, w]
LOGITS_OUTPUT = "logits"  # float32 [B, 1000] ImageNet classes (EfficientNet only: proves the weights are real)
FEATURE_MAP_INPUT = "feature_map"
BOXES_INPUT = "boxes"  # float32 [B, P, 4] x1, y1, x2, y2 in [0, 1]
OBJECTS_OUTPUT = "objects"  # float32 [B, P, C]
BATCH_AXIS = "batch"

MIN_IMAGE_SIDE = 16  # below this an image is an icon or a tracking pixel: no layout for a region grid
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; decoding more costs >190 MB per image and is likely a bomb
RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
WHITE = (255, 255, 255, 255)
EXIF_ORIENTATION = "applied"  # the store's extractor record says so (stores made before recorded "ignored")


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input: square `size` px, RGB, (pixel[0..255] - mean) / std, NCHW."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"  # stretch to size x size, aspect not kept (as Flickr8K's own 224x224 files)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "Preprocessing":
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise AssetError(f"{where}: unknown preprocessing keys {sorted(unknown)}; expected some of {sorted(known)}")
        try:
            result = cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})
        except (KeyError, TypeError) as exc:
            raise AssetError(f"{where}: preprocessing incomplete ({exc}); expected keys {sorted(known)}") from exc
        if result.resize not in RESIZE_FILTERS or result.channel_order != "RGB" or result.layout != "NCHW":
            raise AssetError(f"{where}: preprocessing {asdict(result)} not supported; expected resize in {sorted(RESIZE_FILTERS)}, RGB, NCHW")
        return result

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def apply(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> float32 [3, size, size]."""
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), RESIZE_FILTERS[self.resize])
        pixels = np.asarray(image, dtype=np.float32)  # [S, S, 3]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [S, S, 3] -> [3, S, S]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode one image file into an 8-bit RGB PIL image, or raise ImageError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # MAX_IMAGE_PIXELS below is the limit; PIL's bomb warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            width, height = opened.size
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ImageError(f"{path}: image is {width}x{height} px; expected at least {MIN_IMAGE_SIDE} px per side")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{path}: image is {width}x{height} px ({width * height:,} pixels); expected at most {MAX_IMAGE_PIXELS:,}")
            opened.load()  # decodes now, so a truncated file fails here rather than later
            return _to_rgb(_upright(opened), path)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: image file not found") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot decode image ({reason}); expected a readable JPEG/PNG/... file") from exc


def _upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF Orientation tag says it is viewed (rotated / mirrored); unchanged without the tag."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):  # an unreadable EXIF block: the pixels as stored
        return image


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16"):  # 16-bit grayscale PNG: keep the top 8 bits, PIL's convert would clip
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    elif mode in ("I", "F"):
        raise ImageError(f"{path}: pixel mode {mode!r} (32-bit) not supported; expected 8- or 16-bit images")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def load_batch(paths: list[Path], preprocessing: Preprocessing) -> tuple[np.ndarray, list[Image.Image | None], dict[int, str]]:
    """Load and preprocess images; a bad one becomes zeros and its reason is returned, never raised.

    Returns (images float32 [B, 3, S, S], the RGB images or None, {index: one-line reason}).
    """
    batch = np.zeros((len(paths), 3, preprocessing.size, preprocessing.size), dtype=np.float32)
    decoded: list[Image.Image | None] = []
    bad: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except ImageError as exc:
            bad[i] = str(exc)
            decoded.append(None)
            continue
        batch[i] = preprocessing.apply(image)
        decoded.append(image)
    return batch, decoded, bad


def regions_from_feature_map(feature_map: np.ndarray) -> np.ndarray:
    """[B, C, h, w] -> [B, R=h*w, C], regions in row-major grid order (as the paper flattens 14x14)."""
    batch, channels = feature_map.shape[:2]
    return feature_map.reshape(batch, channels, -1).transpose(0, 2, 1)  # [B, C, h, w] -> [B, R, C]


def read_asset_manifest(path: str | os.PathLike, kind: str) -> dict:
    """Read `<stem>.json`, check its kind and its graph's sha256; returns the dict plus `graph_path`."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: asset manifest not found; build it with python -m export.backbones --out {path.parent}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AssetError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("kind") != kind:
        raise AssetError(f"{path}: expected an asset of kind {kind!r}, got {manifest.get('kind')!r}")
    graph = path.parent / manifest["graph"]
    if not graph.is_file():
        raise AssetError(f"{graph}: graph named by {path.name} not found; re-run python -m export.backbones")
    if file_sha256(graph) != manifest["graph_sha256"]:
        raise AssetError(f"{graph}: sha256 differs from {path.name}; the graph was changed after export (re-run python -m export.backbones)")
    return {**manifest, "graph_path": graph}


class _GraphRunner:
    """Owns one lazily opened session (engine.backends.onnxruntime.open_session, on the ONNX Runtime
    provider of `backend`); usable in a `with` block that releases it."""

    kind = ""

    def __init__(self, manifest: dict, threads: int = 1, backend: str = "onnxruntime-cpu"):
        self.manifest = manifest
        self.threads = threads
        self.backend = backend
        self._session = None

    @classmethod
    def from_manifest(cls, path: str | os.PathLike, threads: int = 1, backend: str = "onnxruntime-cpu"):
        return cls(read_asset_manifest(path, cls.kind), threads, backend)

    @property
    def session(self):
        if self._session is None:
            self._session = open_session(self.manifest["graph_path"], self.backend, self.threads)
        return self._session

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._session = None

    def describe(self) -> dict:
        """What went into the outputs: everything in the manifest but local paths, with the graph's
        fingerprint (engine/assets.py; computed here for assets exported before fingerprints)."""
        from engine.assets import graph_fingerprint

        described = {k: v for k, v in self.manifest.items() if k != "graph_path"}
        if "fingerprint" not in described:
            described["fingerprint"] = graph_fingerprint(self.manifest["graph_path"], self.manifest)
        return described


class RegionBackbone(_GraphRunner):
    """A CNN graph: images [B, 3, S, S] -> feature map [B, C, h, w] (+ ImageNet logits if exported)."""

    kind = "region-backbone"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"], str(self.manifest["graph_path"]))

    @property
    def grid(self) -> int:
        return int(self.manifest["grid"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    def _check(self, images: np.ndarray) -> np.ndarray:
        size = self.preprocessing.size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise InputError(f"{IMAGE_INPUT}: expected float32 [B, 3, {size}, {size}], got {list(images.shape)}")
        return np.ascontiguousarray(images, dtype=np.float32)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images [B, 3, S, S] -> feature map [B, C, h, w]."""
        return self.session.run([FEATURE_MAP_OUTPUT], {IMAGE_INPUT: self._check(images)})[0]

    def classify(self, images: np.ndarray) -> np.ndarray:
        """ImageNet logits [B, 1000]; only for backbones exported with their classifier."""
        if LOGITS_OUTPUT not in self.manifest["outputs"]:
            raise InputError(f"{self.manifest['graph']}: has no {LOGITS_OUTPUT!r} output; only {sorted(self.manifest['outputs'])}")
        return self.session.run([LOGITS_OUTPUT], {IMAGE_INPUT: self._check(images)})[0]


class ObjectFeatures(_GraphRunner):
    """The RoIAlign graph: feature map [B, C, h, w] + boxes [B, P, 4] in [0, 1] -> objects [B, P, C]."""

    kind = "roi-align"

    def run(self, feature_map: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if feature_map.ndim != 4 or boxes.ndim != 3 or boxes.shape[2] != 4 or boxes.shape[0] != feature_map.shape[0]:
            raise InputError(
                f"{BOXES_INPUT}: expected feature map [B, C, h, w] and boxes [B, P, 4] with the same B, "
                f"got {list(feature_map.shape)} and {list(boxes.shape)}"
            )
        feeds = {FEATURE_MAP_INPUT: np.ascontiguousarray(feature_map, np.float32), BOXES_INPUT: np.ascontiguousarray(boxes, np.float32)}
        return self.session.run([OBJECTS_OUTPUT], feeds)[0]
