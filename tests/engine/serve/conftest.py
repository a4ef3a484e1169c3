"""Fixtures of the service tests: one artifact that can encode image FILES and caption strings
and has shortlist graphs (the service's first stage), exported once per session, and a small
gallery folder of real photos (scikit-image's demo photos)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.engine.conftest import _randomize_batchnorm


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory, backbone_assets) -> Path:
    """Real input sizes (EfficientNet-Lite0 7x7x1280 regions, 10 x 1280 objects, GloVe 50 words), tiny
    hidden sizes, random weights, and a tiny dual encoder as the shortlist (~40 s on 2 cores, most of
    it the backbone export that other tests share)."""
    torch = pytest.importorskip("torch", reason="building the test artifact needs torch (the train/export extras)")
    from engine.features import ExtractConfig, Extractor
    from export.pipeline import ExportOptions, export_artifact
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset, replace_strict

    from training.model import BSSAN

    extractor = Extractor(ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=backbone_assets, word_features=(), threads=2))
    root = tmp_path_factory.mktemp("serve-model")
    store = SimpleNamespace(manifest={"extractor": extractor.describe(), "splits": {}}, root=root / "no-store")
    torch.manual_seed(3)
    model = BSSAN(replace_strict(preset("flickr8k"), w2r_hidden=8, w2r_mlp=[8, 1], o2w_hidden=6, o2w_mlp=[6, 1])).eval()
    _randomize_batchnorm(model, 3)
    shortlist_config = replace_strict(dual_encoder_preset("flickr8k"), embed_dim=16, text_hidden=8)
    shortlist = DualEncoder(shortlist_config).eval()
    bssan = save_checkpoint(root / "bssan", model, TrainConfig(word_set="glove50"), store=store)
    dual = save_checkpoint(root / "shortlist", shortlist, TrainConfig(word_set="glove50"), store=store)
    out = root / "artifact"
    export_artifact(ExportOptions(model_dir=bssan, out=out, precisions=("fp32",), shortlist_dir=dual, tensorrt="off",
                                  assets_dir=backbone_assets, progress=False))
    return out


@pytest.fixture(scope="session")
def serve_photos(tmp_path_factory) -> list[Path]:
    """The six colour photos of the demo (scikit-image's wheel)."""
    pytest.importorskip("skimage", reason="the photos come from scikit-image (the demo/dev extras)")
    from engine.demo import demo_gallery

    return list(demo_gallery()[0])


@pytest.fixture()
def gallery_dir(tmp_path, serve_photos) -> Path:
    """A gallery folder of the first four photos (the other two are uploaded by tests)."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    for photo in serve_photos[:4]:
        shutil.copy(photo, folder / photo.name)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m engine.serve ...` as a child process on a free 127.0.0.1 port, its log in a file."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log, self.port, self.process = args, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_seconds: float = 120) -> "ServerProcess":
        import subprocess
        import sys
        import time

        import httpx

        self.port = free_port()
        handle = open(self.log, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "engine.serve", *self.args, "--port", str(self.port),
                                         "--no-progress", "--log-level", "warning"], stdout=handle, stderr=handle)
        deadline = time.time() + ready_seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"server not ready after {ready_seconds} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, seconds: float = 60) -> int:
        self.process.terminate()
        return self.process.wait(timeout=seconds)
