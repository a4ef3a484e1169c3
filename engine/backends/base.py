"""The surface every backend shares: the Backend names, how to install each, and the Runner base
(validation in `infer`, computation in `_infer`). Imports numpy and the engine's declarations only."""


from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import ArtifactError, ClosedError, InputError
from engine.graphs import FLOAT_DTYPE, GRAPHS, PRECISIONS

if TYPE_CHECKING:
    from engine.artifact import Artifact


class Backend(str, enum.Enum):
    AUTO = "auto"
    ORT_CPU = "onnxruntime-cpu"
    ORT_CUDA = "onnxruntime-cuda"
    TENSORRT = "tensorrt"
    TORCH = "torch"


INSTALL = {
    Backend.ORT_CPU: "pip install onnxruntime (bssan-engine's core dependency)",
    Backend.ORT_CUDA: "pip install 'bssan-engine[gpu]' on a CUDA host (onnxruntime-gpu; uninstall onnxruntime first, they share one folder)",
    Backend.TENSORRT: "pip install 'bssan-engine[trt]' on a CUDA host (tensorrt and cuda-python)",
    Backend.TORCH: "pip install 'bssan-engine[train]' (torch)",
}


def parse_backend(name: str | Backend) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise InputError(f"backend {name!r}: expected one of {[b.value for b in Backend]}") from None


def graph_precision(artifact: Artifact, name: str, precision: str) -> str:
    """The precision a graph runs at: `precision` if the artifact has it; in an int8 run, fp32 for the
    graphs the exporter did not quantize (image/text graphs, and a pair graph with no weight MatMul in
    the int8 scope, e.g. o2w_pair); anything else is an ArtifactError naming what the artifact has."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    if artifact.has_graph(name, precision):
        return precision
    if precision == "int8" and "int8" in artifact.precisions and artifact.has_graph(name, "fp32"):
        return "fp32"
    artifact.graph_path(name, precision)  # raises, listing the artifact's graphs
    raise AssertionError("unreachable")


def check_pair_feeds(graph: str, feeds: dict[str, np.ndarray]) -> None:
    """Indices and lengths a graph cannot check itself (TensorRT's Gather does not): pair rows inside
    the rows passed, caption lengths in [1, words]."""
    spec = GRAPHS[graph]
    if "lengths" in feeds:
        lengths, words = feeds["lengths"], feeds["words" if "words" in feeds else "states"].shape[1]
        if lengths.size and (lengths.min() < 1 or lengths.max() > words):
            raise InputError(f"{graph}.lengths: expected caption lengths in [1, {words}] (the words axis), "
                             f"got [{lengths.min()}, {lengths.max()}]")
    if spec.stage != "pair":
        return
    pairs = feeds["pairs"]
    image_rows = feeds[spec.input_names[0]].shape[0]
    caption_rows = feeds["lengths"].shape[0]
    for column, rows, what in ((0, image_rows, "image"), (1, caption_rows, "caption")):
        if pairs.size and (pairs[:, column].min() < 0 or pairs[:, column].max() >= rows):
            raise InputError(f"{graph}.pairs[:, {column}]: expected {what} rows in [0, {rows}), "
                             f"got [{pairs[:, column].min()}, {pairs[:, column].max()}]")


class Runner:
    """Base of every backend: validation in `infer`, computation in `_infer`."""

    backend: Backend
    runs_grid_graphs = True  # False: this backend ignores the artifact's grid graphs (TensorRT: no plans built for them)
    spinning = True  # ONNX Runtime runners: whether idle intra-op threads busy-wait (engine.backends.onnxruntime.open_session)
    concurrent_calls = 1  # pair/grid calls the Scorer may run at once (the ONNX Runtime CPU runner: one per thread)
    text_concurrent_calls = 1  # caption blocks the Encoder may run through the text graphs at once (idem)
    closed = False  # set by close(): infer() then raises ClosedError instead of a backend's KeyError

    def __init__(self, artifact: Artifact, precision: str = "fp32", threads: int | None = None):
        if threads is not None and threads < 1:
            raise InputError(f"threads={threads}: expected at least 1 (or None for the backend's default)")
        self.artifact = artifact
        self.precision = precision
        self.threads = threads
        # Grid graphs (engine/graphs.py: optional, one-image blocks) run only at the run's own precision and
        # where the backend runs them; without them the Scorer uses the pair graphs.
        self.precisions = {name: graph_precision(artifact, name, precision) for name in artifact.graph_names
                           if GRAPHS[name].stage != "grid" or (self.runs_grid_graphs and artifact.has_graph(name, precision))}
        self.reason = f"{self.backend.value} requested"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        self.closed = True

    def has_graph(self, name: str) -> bool:
        return name in self.precisions

    def float_dtype(self, name: str) -> np.dtype:
        """dtype of the FLOAT tensors of a graph at the precision it runs at."""
        return np.dtype(FLOAT_DTYPE[self.precisions[name]])

    def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise ClosedError(f"{self.backend.value} runner of {self.artifact.root}: used after close(); "
                              f"expected calls inside its `with` block (load a new Scorer to score again)")
        if name not in self.precisions:
            raise ArtifactError(f"{self.artifact.root}: no graph {name!r}; the artifact has {sorted(self.precisions)}")
        GRAPHS[name].check_inputs(feeds, self.artifact.dims, self.precisions[name])
        check_pair_feeds(name, feeds)
        return self._infer(name, feeds)

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.backend.value, "precision": self.precision, "threads": self.threads,
                "concurrent_calls": self.concurrent_calls, "text_concurrent_calls": self.text_concurrent_calls,
                "reason": self.reason}
