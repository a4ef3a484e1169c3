"""The TensorRT runner: engine plans from ARTIFACT/tensorrt/, run with the TensorRT 10/11 Python API.

NOT YET RUN ON HARDWARE: TensorRT cannot be installed in this workplace, so this is written against
the documented API (name-based I/O: set_input_shape, set_tensor_address, execute_async_v3;
optimization profiles chosen per call) with cuda-python for device buffers and the stream. Only its
pure-Python parts run in the tests (the plan key check, the error when TensorRT is absent).

Plans are built by the exporter (export/tensorrt.py, `python -m export ... --tensorrt on`), each with
a key json {onnx_sha256, precision, gpu_name, compute_capability, tensorrt_version, profiles}; a
plan whose key differs from this GPU / TensorRT / ONNX file is refused here, never used.

    with open_runner(load_artifact(path), backend="tensorrt", precision="fp16") as runner: ...
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np

from engine.artifact import TENSORRT_DIR, Artifact
from engine.backends.base import INSTALL, Backend, Runner
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import GRAPHS

TENSORRT_PRECISIONS = ("fp32", "fp16")  # int8 graphs use ONNX Runtime's dynamic-quantization ops




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

    runs_grid_graphs = False  # export/tensorrt.py builds plans for the pair graphs only

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
        super().close()
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
