"""Shared fixtures: a tiny synthetic feature store with a learnable image-caption signal,
and the location of the real Flickr8K data (tests that need it skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.store import StoreWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = REPO_ROOT.parent / "shared" / "data" / "flickr8k"


def build_store(
    root: Path,
    splits: dict[str, int] = {"train": 40, "dev": 10, "test": 10},
    captions_per_image: int = 5,
    regions: int = 9,
    region_dim: int = 16,
    objects: int = 4,
    object_dim: int = 16,
    max_words: int = 8,
    word_dim: int = 12,
    word_set: str = "glove50",
    classes: int = 6,
    seed: int = 0,
) -> Path:
    """Write a small store where each image has a latent class shared by its captions.

    Regions and objects carry a class prototype plus noise; each caption's words carry the
    word prototype of the same class plus noise, so a model can learn to match them.
    """
    rng = np.random.default_rng(seed)
    region_proto = rng.normal(size=(classes, region_dim))
    object_proto = rng.normal(size=(classes, object_dim))
    word_proto = rng.normal(size=(classes, word_dim))
    writer = StoreWriter(root, extractor={"name": "synthetic", "seed": seed})
    for split, n_img in splits.items():
        label = rng.integers(0, classes, size=n_img)
        n_cap = n_img * captions_per_image
        r = writer.open_array(split, "regions", (n_img, regions, region_dim))
        r[:] = region_proto[label][:, None, :] * rng.uniform(0, 2, size=(n_img, regions, 1)) + rng.normal(size=(n_img, regions, region_dim))
        o = writer.open_array(split, "objects", (n_img, objects, object_dim))
        o[:] = object_proto[label][:, None, :] + rng.normal(size=(n_img, objects, object_dim))
        b = writer.open_array(split, "boxes", (n_img, objects, 4))
        b[:] = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
        writer.open_array(split, "objects_real", (n_img,))[:] = objects
        caption_image = np.repeat(np.arange(n_img, dtype=np.int32), captions_per_image)
        writer.open_array(split, "caption_image", (n_cap,))[:] = caption_image
        lengths = rng.integers(2, max_words + 1, size=n_cap).astype(np.int32)
        writer.open_array(split, "lengths", (n_cap,))[:] = lengths
        words = rng.normal(size=(n_cap, max_words, word_dim)) + word_proto[label[caption_image]][:, None, :]
        words[np.arange(max_words)[None, :] >= lengths[:, None]] = 0.0
        writer.open_array(split, f"words_{word_set}", (n_cap, max_words, word_dim))[:] = words
        writer.write_lines(split, "image_names", [f"{split}_{i:04d}.jpg" for i in range(n_img)])
        writer.write_lines(split, "captions", [f"caption {j} of image {caption_image[j]}" for j in range(n_cap)])
        writer.finish_split(split, {"images": n_img, "captions": n_cap})
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (FLICKR8K / "captions.txt").is_file():
        pytest.skip(f"Flickr8K not found at {FLICKR8K}; these tests read the real data from ../shared/data/flickr8k")
    return FLICKR8K


@pytest.fixture(scope="session")
def minilm_assets(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 exported to ONNX once per test session (~15 s on 2 cores): the assets dir."""
    pytest.importorskip("torch", reason="exporting MiniLM needs torch (the export extra)")
    pytest.importorskip("transformers", reason="exporting MiniLM needs transformers (the export extra)")
    from export.text import export_minilm

    out = tmp_path_factory.mktemp("assets")
    export_minilm(out)
    return out


@pytest.fixture(scope="session")
def glove50(tmp_path_factory):
    """GloVe 6B 50d from its package, vocabulary cached in a session temp dir (not ~/.cache)."""
    from engine.text import GloveVectors

    return GloveVectors.from_package(cache_dir=tmp_path_factory.mktemp("bssan-cache"))


@pytest.fixture(scope="session")
def backbone_assets(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 (7x7, real ImageNet weights) and RoIAlign graphs, exported once per session."""
    pytest.importorskip("torch", reason="exporting the backbone graphs needs torch (pip install 'bssan-engine[export]')")
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (the export extra)")
    from export.backbones import export_all

    out = tmp_path_factory.mktemp("assets")
    export_all(out)
    return out


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Give every BatchNorm1d non-trivial running statistics and affine weights (fresh ones are the
    identity, which would hide a wrong BatchNorm fold in export parity tests)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.5)


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory, tiny_store) -> Path:
    """A random-weight demo-preset BSSAN (max_words 30, BatchNorm statistics randomised) and dual
    encoder, saved as checkpoints (ARTIFACT/../bssan, ARTIFACT/../shortlist) and exported once per
    session with fp32, fp16 and int8 graphs and the shortlist graphs (~15 s on 2 cores)."""
    torch = pytest.importorskip("torch", reason="exporting needs torch (pip install 'bssan-engine[export]')")
    pytest.importorskip("onnx", reason="exporting needs onnx (the export extra)")
    from engine.store import FeatureStore
    from export.pipeline import ExportOptions, export_artifact
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset, replace_strict
    from training.model import BSSAN

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = BSSAN(replace_strict(preset("demo"), max_words=30)).eval()
    randomize_batchnorm(model)
    shortlist = DualEncoder(replace_strict(dual_encoder_preset("demo"), max_words=30)).eval()
    store = FeatureStore(tiny_store)
    save_checkpoint(root / "bssan", model, TrainConfig(), store=store, metrics={"note": "random weights"})
    save_checkpoint(root / "shortlist", shortlist, TrainConfig(), store=store)
    export_artifact(ExportOptions(model_dir=root / "bssan", out=root / "artifact", precisions=("fp32", "fp16", "int8"),
                                  shortlist_dir=root / "shortlist", tensorrt="auto", assets_dir=None, progress=False))
    return root / "artifact"
