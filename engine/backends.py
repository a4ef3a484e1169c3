"""Backends that run an artifact's graphs (engine/graphs.py): ONNX Runtime CPU/CUDA, TensorRT, torch.

    from engine.artifact import load_artifact
    from engine.backends import open_runner
    with open_runner(load_artifact("artifacts/flickr8k"), backend="auto", precision="fp32", threads=2) as runner:
        print(runner.backend, runner.reason)          # what `auto` chose, and why
        out = runner.infer("w2r_text", {"words": words})   # {"gates_words": [B_txt, L, 4H]}

Every runner has the same surface: `infer(graph, feeds) -> {output: array}` validates the feeds
against the graph's declaration (names, dtypes, shapes; pair indices inside their rows; caption
lengths in [1, words]) and `_infer` computes. Runners own their sessions/engines and release
them on `close()` or at the end of a `with` block.

Backends (imported lazily: `import engine.backends` needs numpy only):
- `onnxruntime-cpu`: the default everywhere. `onnxruntime-cuda`: needs `onnxruntime-gpu`.
  A session is created on exactly the requested provider and `session.get_providers()` is checked
  afterwards: ONNX Runtime falls back to CPU silently when CUDA cannot load; we raise instead.
- `tensorrt`: engine/trt_runner.py, plans from ARTIFACT/tensorrt/ built by the exporter.
  NOT YET RUN ON HARDWARE: no TensorRT in this workplace; only its pure-Python parts are tested.
- `torch`: the reference. Runs the checkpoint the artifact was exported from through the same
  graph modules the exporter traced (export/graphs.py, built from training.model); needs torch.
- `auto`: TensorRT if usable, else ONNX Runtime CUDA, else ONNX Runtime CPU; `runner.reason` says why.

Precision: fp32 and fp16 run every graph at that precision; int8 runs the graphs the exporter
quantized (pair graphs) at int8 and the others at fp32 (`runner.precisions` lists each graph's).

Thread safety: one runner may be called from several threads at once. ONNX Runtime's
`InferenceSession.run` and torch inference under no_grad are re-entrant; a TensorRT execution
context is not, so the TensorRT runner serialises its calls with a lock.
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path

import numpy as np

from engine.artifact import Artifact
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import FLOAT_DTYPE, GRAPHS, PRECISIONS

log = logging.getLogger("engine")


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
ORT_PROVIDER = {Backend.ORT_CPU: "CPUExecutionProvider", Backend.ORT_CUDA: "CUDAExecutionProvider"}


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

    def __init__(self, artifact: Artifact, precision: str = "fp32", threads: int | None = None):
        if threads is not None and threads < 1:
            raise InputError(f"threads={threads}: expected at least 1 (or None for the backend's default)")
        self.artifact = artifact
        self.precision = precision
        self.threads = threads
        self.precisions = {name: graph_precision(artifact, name, precision) for name in artifact.graph_names}
        self.reason = f"{self.backend.value} requested"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        pass

    def has_graph(self, name: str) -> bool:
        return name in self.precisions

    def float_dtype(self, name: str) -> np.dtype:
        """dtype of the FLOAT tensors of a graph at the precision it runs at."""
        return np.dtype(FLOAT_DTYPE[self.precisions[name]])

    def infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name not in self.precisions:
            raise ArtifactError(f"{self.artifact.root}: no graph {name!r}; the artifact has {sorted(self.precisions)}")
        GRAPHS[name].check_inputs(feeds, self.artifact.dims, self.precisions[name])
        check_pair_feeds(name, feeds)
        return self._infer(name, feeds)

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.backend.value, "precision": self.precision, "threads": self.threads, "reason": self.reason}


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(f"onnxruntime is not installed; {INSTALL[Backend.ORT_CPU]}") from None
    return onnxruntime


class OnnxRuntimeRunner(Runner):
    """One InferenceSession per graph on exactly one execution provider, opened at construction."""

    backend = Backend.ORT_CPU

    def __init__(self, artifact: Artifact, precision: str = "fp32", threads: int | None = None):
        super().__init__(artifact, precision, threads)
        ort = _onnxruntime()
        provider = ORT_PROVIDER[self.backend]
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(f"{self.backend.value}: {provider} is not in this onnxruntime's providers "
                                          f"{ort.get_available_providers()}; {INSTALL[self.backend]}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # fp16 graphs on CPU warn once per inserted cast
        self.sessions = {}
        for name, graph_prec in self.precisions.items():
            path = artifact.graph_path(name, graph_prec)
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
                raise ArtifactError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
            if session.get_providers()[0] != provider:  # ORT falls back to CPU silently when CUDA cannot load
                raise BackendUnavailableError(f"{path}: asked onnxruntime for {provider}, it gave {session.get_providers()}; "
                                              f"{INSTALL[self.backend]}")
            self.sessions[name] = session

    def close(self) -> None:
        self.sessions = {}

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = GRAPHS[name]
        outputs = self.sessions[name].run(spec.output_names, feeds)
        return dict(zip(spec.output_names, outputs))


class OnnxRuntimeCpuRunner(OnnxRuntimeRunner):
    backend = Backend.ORT_CPU


class OnnxRuntimeCudaRunner(OnnxRuntimeRunner):
    backend = Backend.ORT_CUDA


# ---------------------------------------------------------------------------------------------
# torch (reference)


class TorchRunner(Runner):
    """The checkpoint the artifact came from (manifest model.source, or `checkpoint=`), as the torch
    modules the exporter traces. fp32 or fp16; CPU, or CUDA when torch sees a GPU and `device="cuda"`.
    `threads` sets torch's intra-op threads, which is process-wide in torch."""

    backend = Backend.TORCH

    def __init__(self, artifact: Artifact, precision: str = "fp32", threads: int | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu"):
        if precision == "int8":
            raise BackendUnavailableError("torch backend: precision int8 is ONNX Runtime dynamic quantization; "
                                          "expected fp32 or fp16 (or --backend onnxruntime-cpu for int8)")
        super().__init__(artifact, precision, threads)
        try:
            import torch

            from export.graphs import build_graph_modules
            from training.checkpoint import load_checkpoint
        except ImportError as exc:
            raise BackendUnavailableError(f"torch backend: {exc}; {INSTALL[Backend.TORCH]}") from None
        if threads is not None:
            torch.set_num_threads(threads)
        model_info = artifact.manifest["model"]
        source = Path(checkpoint or model_info.get("source") or "")
        if not source.is_dir():
            raise BackendUnavailableError(f"torch backend: checkpoint {str(source)!r} (manifest model.source) not found; "
                                          f"expected the checkpoint directory the artifact was exported from (pass checkpoint=)")
        model = load_checkpoint(source).model
        shortlist = None
        if any(GRAPHS[n].branch == "shortlist" for n in self.precisions):
            shortlist_source = Path(model_info.get("shortlist_source") or "")
            if not shortlist_source.is_dir():
                raise BackendUnavailableError(f"torch backend: shortlist checkpoint {str(shortlist_source)!r} "
                                              f"(manifest model.shortlist_source) not found")
            shortlist = load_checkpoint(shortlist_source).model
        self.torch, self.device = torch, torch.device(device)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        modules = build_graph_modules(model, dtype, recurrence_fp32=True, shortlist=shortlist)
        self.modules = {name: module.to(self.device) for name, module in modules.items() if name in self.precisions}
        missing = sorted(set(self.precisions) - set(self.modules))
        if missing:
            raise ArtifactError(f"{source}: the checkpoint builds no module for graph(s) {missing} of {artifact.root}")

    def close(self) -> None:
        self.modules = {}

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, spec = self.torch, GRAPHS[name]
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in spec.input_names]
            out = self.modules[name](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.cpu().numpy().astype(t.numpy_dtype(self.precisions[name]), copy=False) for t, o in zip(spec.outputs, out)}


# ---------------------------------------------------------------------------------------------
# Choosing a backend

def runner_class(backend: Backend) -> type[Runner]:
    if backend is Backend.TENSORRT:
        from engine.trt_runner import TensorRTRunner  # its own module: it is written against TensorRT's API

        return TensorRTRunner
    return {Backend.ORT_CPU: OnnxRuntimeCpuRunner, Backend.ORT_CUDA: OnnxRuntimeCudaRunner, Backend.TORCH: TorchRunner}[backend]


def open_runner(artifact: Artifact, backend: str | Backend = Backend.AUTO, precision: str = "fp32",
                threads: int | None = None, **options) -> Runner:
    """A runner for `backend`; an explicit backend that cannot run raises BackendUnavailableError
    (with how to install it). `auto` tries TensorRT, then ONNX Runtime CUDA, then CPU, and records
    in `runner.reason` why it chose what it chose (also logged on the "engine" logger)."""
    backend = parse_backend(backend)
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    if backend is not Backend.AUTO:
        return runner_class(backend)(artifact, precision, threads, **options)
    skipped = []
    for candidate in (Backend.TENSORRT, Backend.ORT_CUDA):
        try:
            runner = runner_class(candidate)(artifact, precision, threads)
        except (BackendUnavailableError, ArtifactError) as exc:
            reason = str(exc).split(";")[0]
            skipped.append(reason if reason.startswith(candidate.value) else f"{candidate.value}: {reason}")
            continue
        runner.reason = f"auto chose {candidate.value}" + (f" ({'; '.join(skipped)})" if skipped else "")
        log.info(runner.reason)
        return runner
    runner = OnnxRuntimeCpuRunner(artifact, precision, threads)
    runner.reason = f"auto chose {Backend.ORT_CPU.value} ({'; '.join(skipped)})"
    log.info(runner.reason)
    return runner

