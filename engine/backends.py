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
- `tensorrt`: TensorRT 10/11 Python API (name-based I/O, set_input_shape, execute_async_v3) with
  cuda-python buffers, running engine plans from ARTIFACT/tensorrt/ built by the exporter.
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
import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np

from engine.artifact import TENSORRT_DIR, Artifact
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
TENSORRT_PRECISIONS = ("fp32", "fp16")  # int8 graphs use ONNX Runtime's dynamic-quantization ops


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
# TensorRT (NOT YET RUN ON HARDWARE)


def tensorrt_engine_key(onnx_sha256: str, precision: str, gpu_name: str, compute_capability: str,
                        tensorrt_version: str, profiles: list) -> dict:
    """What a cached TensorRT plan was built for; a plan is used only when every field matches."""
    return {"onnx_sha256": onnx_sha256, "precision": precision, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "tensorrt_version": tensorrt_version, "profiles": profiles}


def tensorrt_plan_paths(artifact: Artifact, name: str, precision: str) -> tuple[Path, Path]:
    """(plan, key json) of a graph's cached engine under ARTIFACT/tensorrt/."""
    stem = artifact.root / TENSORRT_DIR / f"{name}.{precision}"
    return stem.with_suffix(".plan"), stem.with_suffix(".json")


def check_tensorrt_key(key_path: Path, current: dict) -> None:
    """Refuse a cached plan whose key differs from the current GPU/TensorRT/ONNX: it must be rebuilt, never used."""
    try:
        recorded = json.loads(key_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{key_path}: missing; expected the key of the TensorRT plan beside it (rebuild it with the exporter)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{key_path}: not valid JSON ({exc}); rebuild the TensorRT plan") from None
    recorded = recorded.get("key", recorded) if isinstance(recorded, dict) else {}
    differing = [f"{field} {recorded.get(field)!r} != {value!r}" for field, value in current.items() if recorded.get(field) != value]
    if differing:
        raise ArtifactError(f"{key_path}: TensorRT plan was built for another setup ({'; '.join(differing)}); "
                            f"expected a plan for this GPU/TensorRT/ONNX; rebuild it with the exporter")


def _cuda_runtime():
    """cuda-python's runtime module (cuda.bindings.runtime since 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError(f"tensorrt backend: cuda-python is not installed; {INSTALL[Backend.TENSORRT]}") from None
    return cudart


def _cuda_check(result, what: str):
    """cuda-python calls return (error, *values); raise on any error, naming the call."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendUnavailableError(f"tensorrt backend: {what} failed with CUDA error {error}")
    return values[0] if len(values) == 1 else values


class TensorRTRunner(Runner):
    """Deserialized engine + execution context per graph; device buffers sized per call.
    NOT YET RUN ON HARDWARE (written against the TensorRT 10/11 and cuda-python documentation)."""

    backend = Backend.TENSORRT

    def __init__(self, artifact: Artifact, precision: str = "fp32", threads: int | None = None):
        if precision not in TENSORRT_PRECISIONS:
            raise BackendUnavailableError(f"tensorrt backend: precision {precision!r}; expected one of {list(TENSORRT_PRECISIONS)} "
                                          f"(int8 graphs are ONNX Runtime dynamic quantization: use onnxruntime-cpu)")
        super().__init__(artifact, precision, threads)
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailableError(f"tensorrt backend: tensorrt is not installed; {INSTALL[Backend.TENSORRT]}")
        import tensorrt as trt

        self.trt, self.cudart = trt, _cuda_runtime()
        count = _cuda_check(self.cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count < 1:
            raise BackendUnavailableError("tensorrt backend: no CUDA device visible")
        props = _cuda_check(self.cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        capability = f"{props.major}.{props.minor}"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = _cuda_check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.lock = threading.Lock()
        self.engines, self.contexts = {}, {}
        for name, graph_prec in self.precisions.items():
            plan, key_path = tensorrt_plan_paths(artifact, name, graph_prec)
            if not plan.is_file():
                raise ArtifactError(f"{plan}: no TensorRT plan for graph {name} ({graph_prec}); build the artifact's "
                                    f"TensorRT engines with the exporter on this GPU")
            onnx_rel = artifact.manifest["graphs"][name][graph_prec]["file"]
            recorded = json.loads(key_path.read_text(encoding="utf-8")) if key_path.is_file() else {}
            profiles = (recorded.get("key", recorded) if isinstance(recorded, dict) else {}).get("profiles")
            check_tensorrt_key(key_path, tensorrt_engine_key(artifact.manifest["files"][onnx_rel]["sha256"], graph_prec, gpu,
                                                             capability, trt.__version__, profiles))
            engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ArtifactError(f"{plan}: TensorRT could not deserialize the plan; rebuild it")
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.reason = f"tensorrt {trt.__version__} on {gpu} (sm {capability})"

    def close(self) -> None:
        self.contexts, self.engines = {}, {}
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def _select_profile(self, name: str, feeds: dict[str, np.ndarray]) -> int:
        """First optimization profile whose [min, max] holds every input shape."""
        engine = self.engines[name]
        for index in range(engine.num_optimization_profiles):
            fits = True
            for tensor, array in feeds.items():
                low, _, high = engine.get_tensor_profile_shape(tensor, index)
                fits &= all(lo <= s <= hi for lo, s, hi in zip(low, array.shape, high))
            if fits:
                return index
        shapes = {t: list(a.shape) for t, a in feeds.items()}
        raise InputError(f"tensorrt {name}: input shapes {shapes} fit none of the engine's {engine.num_optimization_profiles} "
                         f"optimization profiles; use smaller batches or rebuild with larger profiles")

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, spec = self.cudart, GRAPHS[name]
        with self.lock:  # an execution context is not re-entrant
            context = self.contexts[name]
            profile = self._select_profile(name, feeds)
            if not context.set_optimization_profile_async(profile, self.stream):
                raise BackendUnavailableError(f"tensorrt {name}: set_optimization_profile_async({profile}) failed")
            buffers = []
            try:
                for tensor in spec.input_names:
                    array = np.ascontiguousarray(feeds[tensor])
                    if not context.set_input_shape(tensor, array.shape):
                        raise InputError(f"tensorrt {name}.{tensor}: set_input_shape({list(array.shape)}) refused")
                    pointer = _cuda_check(cudart.cudaMallocAsync(max(array.nbytes, 1), self.stream), f"cudaMalloc {tensor}")
                    buffers.append(pointer)
                    _cuda_check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                       cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), f"copy {tensor} to device")
                    if not context.set_tensor_address(tensor, pointer):
                        raise BackendUnavailableError(f"tensorrt {name}.{tensor}: set_tensor_address failed")
                outputs = {}
                for tensor in spec.outputs:
                    shape = tuple(context.get_tensor_shape(tensor.name))
                    if any(s < 0 for s in shape):
                        raise BackendUnavailableError(f"tensorrt {name}.{tensor.name}: output shape {shape} unresolved after setting inputs")
                    host = np.empty(shape, dtype=tensor.numpy_dtype(self.precisions[name]))
                    pointer = _cuda_check(cudart.cudaMallocAsync(max(host.nbytes, 1), self.stream), f"cudaMalloc {tensor.name}")
                    buffers.append(pointer)
                    if not context.set_tensor_address(tensor.name, pointer):
                        raise BackendUnavailableError(f"tensorrt {name}.{tensor.name}: set_tensor_address failed")
                    outputs[tensor.name] = (host, pointer)
                if not context.execute_async_v3(self.stream):
                    raise BackendUnavailableError(f"tensorrt {name}: execute_async_v3 failed")
                for tensor, (host, pointer) in outputs.items():
                    _cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes,
                                                       cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), f"copy {tensor} to host")
                _cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            finally:
                for pointer in buffers:
                    cudart.cudaFreeAsync(pointer, self.stream)
            return {tensor: host for tensor, (host, _) in outputs.items()}


# ---------------------------------------------------------------------------------------------
# Choosing a backend

RUNNERS = {Backend.ORT_CPU: OnnxRuntimeCpuRunner, Backend.ORT_CUDA: OnnxRuntimeCudaRunner,
           Backend.TENSORRT: TensorRTRunner, Backend.TORCH: TorchRunner}


def open_runner(artifact: Artifact, backend: str | Backend = Backend.AUTO, precision: str = "fp32",
                threads: int | None = None, **options) -> Runner:
    """A runner for `backend`; an explicit backend that cannot run raises BackendUnavailableError
    (with how to install it). `auto` tries TensorRT, then ONNX Runtime CUDA, then CPU, and records
    in `runner.reason` why it chose what it chose (also logged on the "engine" logger)."""
    backend = parse_backend(backend)
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    if backend is not Backend.AUTO:
        return RUNNERS[backend](artifact, precision, threads, **options)
    skipped = []
    for candidate in (Backend.TENSORRT, Backend.ORT_CUDA):
        try:
            runner = RUNNERS[candidate](artifact, precision, threads)
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

