"""`python -m engine.features ... --ray [ADDRESS]`: the image batches of engine.features on a Ray actor pool.

The command is engine.features' own `extract` (dataset checks, the store lock, StoreWriter, content
hashes, progress.json, the manifest) with one change: its Extractor is a `RayExtractor`, whose
`images_pipelined` sends each single-process batch (the same paths, the same batch boundaries) to an
actor holding one loaded Extractor, which runs `Extractor.images` on it, and hands the results back in
batch order. The driver writes them into the store's memory maps and lists each batch in progress.json
exactly as one process does, so a killed job resumes from its progress file and the store is
byte-identical. Word features likewise: `words_pipelined` sends each WORD_CHUNK of captions (the
single-process chunks) to an actor holding that one word set (a split of one chunk is encoded on the
driver); a caption error comes back as a value and is raised at its chunk, so its message names the
same caption as one process would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator

from engine.distributed import Cluster
from engine.errors import CaptionError
from engine.features import ExtractConfig, Extractor, ObserveBatch, SplitReport, extract
from engine.text import load_word_features


class ImageBatchWorker:
    """On a Ray worker: one Extractor without word sets; `run(paths)` = `Extractor.images(paths)`."""

    def __init__(self, config: ExtractConfig):
        self.extractor = Extractor(config)

    def run(self, paths: list[str]):
        return self.extractor.images([Path(p) for p in paths])


class WordChunkWorker:
    """On a Ray worker: one word-feature set; `run(captions)` = its `encode`, a CaptionError returned as a value."""

    def __init__(self, spec: str, config: ExtractConfig):
        self.word_set = load_word_features(spec, config.assets, config.cache_dir, config.backend)
        self.max_words = config.max_words

    def run(self, captions: list[str]):
        try:
            return self.word_set.encode(captions, self.max_words)
        except CaptionError as exc:
            return ("caption-error", exc.reason, exc.index)


class RayExtractor(Extractor):
    """The driver's Extractor (its description, word sets and array shapes), whose image batches run on Ray."""

    def __init__(self, config: ExtractConfig, address: str, workers: int | None = None):
        super().__init__(config)
        self.cluster = Cluster.connect(address, config.threads, workers, want_gpu=config.backend != "onnxruntime-cpu")

    def images_pipelined(self, batches: Iterable[list[Path]]) -> Iterator[tuple]:
        works = [[str(path) for path in paths] for paths in batches]
        worker_config = dataclasses.replace(self.config, word_features=())  # image workers load no word set
        yield from self.cluster.run(ImageBatchWorker, {"config": worker_config}, works, "image batches")

    def words_pipelined(self, name: str, chunks: Iterable[list[str]]):
        chunks = [list(c) for c in chunks]
        if len(chunks) < 2:  # one call: the driver's own word set, rather than a worker started for it
            yield from super().words_pipelined(name, chunks)
            return
        spec = dict(zip(self.word_sets, self.config.word_features))[name]  # the --word-features entry of this set
        init = {"spec": spec, "config": dataclasses.replace(self.config, word_features=())}
        for result in self.cluster.run(WordChunkWorker, init, [list(c) for c in chunks], f"{name} word chunks"):
            if isinstance(result, tuple) and result[:1] == ("caption-error",):
                raise CaptionError(result[1], result[2])
            yield result


def extract_on_ray(config: ExtractConfig, address: str, workers: int | None = None,
                   observe: ObserveBatch | None = None) -> dict[str, SplitReport]:
    """engine.features.extract with the image batches on Ray (the cluster is joined after the inputs are checked)."""
    return extract(config, observe, make_extractor=lambda c: RayExtractor(c, address, workers))
