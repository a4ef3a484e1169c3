"""`python -m engine.features ... --ray [ADDRESS]`: the image batches of engine.features on a Ray actor pool.

The command is engine.features' own `extract` (dataset checks, the store lock, StoreWriter, content
hashes, progress.json, the manifest) with one change: its Extractor is a `RayExtractor`, whose
`images_pipelined` sends each single-process batch (the same paths, the same batch boundaries) to an
actor holding one loaded Extractor, which runs `Extractor.images` on it, and hands the results back in
batch order. The driver writes them into the store's memory maps and lists each batch in progress.json
exactly as one process does, so a killed job resumes from its progress file and the store is
byte-identical. Word features (a small part of the work: docs/ray.md) run on the driver.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator

from engine.distributed import Cluster
from engine.features import ExtractConfig, Extractor, ObserveBatch, SplitReport, extract


class ImageBatchWorker:
    """On a Ray worker: one Extractor without word sets; `run(paths)` = `Extractor.images(paths)`."""

    def __init__(self, config: ExtractConfig):
        self.extractor = Extractor(config)

    def run(self, paths: list[str]):
        return self.extractor.images([Path(p) for p in paths])


class RayExtractor(Extractor):
    """The driver's Extractor (its description, word sets and array shapes), whose image batches run on Ray."""

    def __init__(self, config: ExtractConfig, address: str, workers: int | None = None):
        super().__init__(config)
        self.cluster = Cluster.connect(address, config.threads, workers, want_gpu=config.backend != "onnxruntime-cpu")

    def images_pipelined(self, batches: Iterable[list[Path]]) -> Iterator[tuple]:
        works = [[str(path) for path in paths] for paths in batches]
        worker_config = dataclasses.replace(self.config, word_features=())  # words stay on the driver
        yield from self.cluster.run(ImageBatchWorker, {"config": worker_config}, works, "image batches")


def extract_on_ray(config: ExtractConfig, address: str, workers: int | None = None,
                   observe: ObserveBatch | None = None) -> dict[str, SplitReport]:
    """engine.features.extract with the image batches on Ray (the cluster is joined after the inputs are checked)."""
    return extract(config, observe, make_extractor=lambda c: RayExtractor(c, address, workers))
