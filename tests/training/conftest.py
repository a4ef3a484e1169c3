"""Fixtures of the training tests: a synthetic store big enough for retrieval metrics to rise above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import build_store

TRAIN_STORE_SPLITS = {"train": 60, "dev": 30, "test": 30}  # 300 training pairs; chance dev rsum ~103 on 30 images


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("train_store"), splits=TRAIN_STORE_SPLITS)


def random_dual_checkpoint(path: Path, store: Path) -> Path:
    """A random-weight demo-preset dual encoder (seed 0) saved as a checkpoint at `path` for `store`."""
    import torch

    from engine.store import FeatureStore
    from training.baseline import DualEncoder, dual_encoder_preset
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig

    torch.manual_seed(0)
    save_checkpoint(path, DualEncoder(dual_encoder_preset("demo")).eval(), TrainConfig(), store=FeatureStore(store))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread makes them ~40x slower (spin-waits), not faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
