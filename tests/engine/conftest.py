"""Artifacts for the runtime tests, exported ONCE per session with the project's exporter
(python -m export's export_artifact) from tiny random-weight models.

- `tiny_artifact`: a `demo`-preset BSSAN (sizes of tests/conftest.py build_store) plus a demo
  dual encoder as the shortlist; fp32, fp16 and int8 graphs (~20 s on 2 cores).
- `image_artifact`: the input sizes of the real features (EfficientNet-Lite0 7x7x1280 regions,
  10 x 1280 objects, GloVe 50-d words) with tiny hidden sizes, its checkpoint recording the
  feature extractor of `backbone_assets`, which the export copies in: image files and caption
  strings can go through it (~35 s, most of it the backbone export shared with other tests).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def _randomize_batchnorm(model, seed: int) -> None:
    """Non-trivial running statistics, so folded BatchNorm is exercised."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_store) -> dict[str, Path]:
    torch = pytest.importorskip("torch", reason="building the test artifact needs torch (the train/export extras)")
    from engine.store import FeatureStore
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset
    from training.model import BSSAN

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = BSSAN(preset("demo")).eval()
    _randomize_batchnorm(model, 0)
    torch.manual_seed(1)
    shortlist = DualEncoder(dual_encoder_preset("demo")).eval()
    store = FeatureStore(tiny_store)
    return {"bssan": save_checkpoint(root / "bssan", model, TrainConfig(), store=store),
            "shortlist": save_checkpoint(root / "shortlist", shortlist, TrainConfig(), store=store)}


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_checkpoints) -> Path:
    pytest.importorskip("onnx", reason="exporting needs onnx (the export extra)")
    from export.pipeline import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_artifact(ExportOptions(model_dir=tiny_checkpoints["bssan"], out=out, precisions=("fp32", "fp16", "int8"),
                                  shortlist_dir=tiny_checkpoints["shortlist"], tensorrt="off", assets_dir=None, progress=False))
    return out


@pytest.fixture(scope="session")
def image_artifact(tmp_path_factory, backbone_assets) -> Path:
    torch = pytest.importorskip("torch", reason="building the test artifact needs torch (the train/export extras)")
    from engine.features import ExtractConfig, Extractor
    from export.pipeline import ExportOptions, export_artifact
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset, replace_strict
    from training.model import BSSAN

    extractor = Extractor(ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=backbone_assets, word_features=(), threads=2))
    description = extractor.describe()
    config = replace_strict(preset("flickr8k"), w2r_hidden=8, w2r_mlp=[8, 1], o2w_hidden=6, o2w_mlp=[6, 1])
    torch.manual_seed(2)
    model = BSSAN(config).eval()
    _randomize_batchnorm(model, 2)
    root = tmp_path_factory.mktemp("image-model")
    store = SimpleNamespace(manifest={"extractor": description, "splits": {}}, root=root / "no-store")
    checkpoint = save_checkpoint(root / "bssan", model, TrainConfig(word_set="glove50"), store=store)
    out = root / "artifact"
    export_artifact(ExportOptions(model_dir=checkpoint, out=out, precisions=("fp32",), tensorrt="off",
                                  assets_dir=backbone_assets, progress=False))
    return out


@pytest.fixture(scope="session")
def demo_photos() -> list[Path]:
    """Three of the demo's photos (real, colour, shipped inside scikit-image)."""
    pytest.importorskip("skimage", reason="the demo photos come from scikit-image (the demo/dev extras)")
    from engine.demo import demo_gallery

    return demo_gallery()[0][:3]


def assert_close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    diff = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()) if np.size(want) else 0.0
    assert np.shape(got) == np.shape(want) and diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:g}"
