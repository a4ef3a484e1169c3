"""ONNX Runtime: THE place where an ONNX Runtime session is created, for every graph of the project
(the artifact's pair/image/text graphs through `OnnxRuntimeRunner`, and the feature graphs of
engine/vision.py, engine/text.py, engine/detect.py and export/validate.py through `open_session`).

A session is created on exactly the requested provider and `session.get_providers()` is checked
afterwards: ONNX Runtime falls back to CPU silently when CUDA cannot load; we raise instead.
"""

from __future__ import annotations

import os

import numpy as np

from engine.backends.base import INSTALL, Backend, Runner, parse_backend
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import GRAPHS

ORT_PROVIDER = {Backend.ORT_CPU: "CPUExecutionProvider", Backend.ORT_CUDA: "CUDAExecutionProvider"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(f"onnxruntime is not installed; {INSTALL[Backend.ORT_CPU]}") from None
    return onnxruntime


def session_backend(backend: str | Backend) -> Backend:
    """The ONNX Runtime backend that runs a plain ONNX file (a feature graph) in a run on `backend`:
    CUDA for the GPU backends (TensorRT plans exist only for the artifact's graphs), CPU otherwise."""
    backend = parse_backend(backend)
    return Backend.ORT_CUDA if backend in (Backend.ORT_CUDA, Backend.TENSORRT) else Backend.ORT_CPU


def open_session(path: str | os.PathLike | bytes, backend: str | Backend = Backend.ORT_CPU, threads: int | None = None,
                 spinning: bool = True, denormal_as_zero: bool = True):
    """An ONNX Runtime InferenceSession of `path` (or a serialized model's bytes) on exactly the provider of `backend` (see
    `session_backend`); `threads` intra-op threads (None: ONNX Runtime's choice); spinning=False: idle intra-op
    threads sleep instead of busy-waiting for the next parallel node (ONNX Runtime's default spins: less latency on
    cores of its own, CPU burnt on shared ones; a served text query at 2 threads used ~120 ms CPU spinning vs ~40 ms
    not, on 2 shared cores); denormal_as_zero: ONNX Runtime flushes denormal floats to zero (its
    `session.set_denormal_as_zero`, see OnnxRuntimeRunner). Measured (onnxruntime 1.32, CPU): the option takes
    effect only when the FIRST session of the process has it, and then for the whole process (every session, and
    numpy too, as after torch.set_flush_denormal(True)); so every session the engine opens sets it. Raises
    BackendUnavailableError (with how to install) rather than running on another provider, and a
    one-line ArtifactError when onnxruntime cannot load the file."""
    backend = session_backend(backend)
    if threads is not None and threads < 1:
        raise InputError(f"threads={threads}: expected at least 1 (or None for the backend's default)")
    ort = _onnxruntime()
    provider = ORT_PROVIDER[backend]
    if provider not in ort.get_available_providers():
        raise BackendUnavailableError(f"{backend.value}: {provider} is not in this onnxruntime's providers "
                                      f"{ort.get_available_providers()}; {INSTALL[backend]}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if denormal_as_zero:  # see OnnxRuntimeRunner: the pair graphs' focused attention makes denormals
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3  # fp16 graphs on CPU warn once per inserted cast
    try:
        source = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(source, sess_options=options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        path = "<serialized model>" if isinstance(path, bytes) else path
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if session.get_providers()[0] != provider:  # ORT falls back to CPU silently when CUDA cannot load
        path = "<serialized model>" if isinstance(path, bytes) else path
        raise BackendUnavailableError(f"{path}: asked onnxruntime for {provider}, it gave {session.get_providers()}; "
                                      f"{INSTALL[backend]}")
    return session


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeRunner(Runner):
    """One InferenceSession per graph on exactly one execution provider, opened at construction.

    On the CPU with `threads` > 1 (None: every CPU of the process), the pair and grid graphs get ONE intra-op
    thread each and `concurrent_calls` = threads: the Scorer runs that many pair calls at once. A pair call is a
    chain of small GEMMs and elementwise nodes (the W2R recurrence: one step per word); splitting each node over
    threads costs a wake-up and a join per node, and on shared cores a spinning worker waits for a core someone
    else holds. Measured on 2 shared cores (benchmarks/README.md, "Scoring paths"): 2 calls x 1 thread 10.0k
    pairs/s, 1 call x 2 threads 4.8k, 1 call x 1 thread 7.9k. The image and text graphs (large GEMMs, called
    once per item) keep `threads` intra-op threads, the text graphs `text_threads` when given: they are
    recurrences over the words too, and for a few captions at a time (a served query) one thread is cheaper
    and no slower (shortlist_text, 2 shared cores: 1 caption 4.2 ms CPU at 1 thread vs 12.7 at 2, 16 captions
    17 vs 46). So by default (text_threads None, several cores) the text graphs too get one intra-op thread
    and `text_concurrent_calls` = threads: the Encoder runs that many caption blocks at once. Results do not
    depend on it (each call computes the same; the caches are bit-identical at 1 and 2 threads).

    Denormal floats are flushed to zero (open_session's denormal_as_zero): a trained model's focused attention
    puts softmax weights of 1e-30 and less into the recurrence, and x86 CPUs multiply denormals ~100x slower.
    Measured on Flickr8K test (60 images x 5,000 captions, 2 one-thread calls, idle 2-core Xeon): the reference
    23.0k -> 32.8k pairs/s, the previous reference 26.5k -> 31.8k, the 300,000 scores' sum equal to the last
    printed digit (a float32 denormal is below 1.2e-38). ONNX Runtime applies it process-wide (numpy included,
    as after torch.set_flush_denormal(True)), and only if the process's first session asks for it."""

    backend = Backend.ORT_CPU

    def __init__(self, artifact, precision: str = "fp32", threads: int | None = None, spinning: bool = True,
                 text_threads: int | None = None):
        super().__init__(artifact, precision, threads)
        self.spinning = spinning  # open_session's; the Encoder opens the MiniLM session with it too
        self.concurrent_calls, pair_threads = 1, threads
        if self.backend is Backend.ORT_CPU:
            cores = threads if threads is not None else cpu_count()
            if cores > 1:
                self.concurrent_calls, pair_threads = cores, 1
        if text_threads is not None and text_threads < 1:
            raise InputError(f"text_threads={text_threads}: expected at least 1 (or None: one per call, calls at once)")
        if text_threads is None and self.concurrent_calls > 1:  # as the pair graphs: one thread each, calls at once
            text_threads, self.text_concurrent_calls = 1, self.concurrent_calls
        stage_threads = {"pair": pair_threads, "grid": pair_threads, "text": text_threads or threads}
        self.sessions = {name: open_session(artifact.graph_path(name, graph_prec), self.backend,
                                            stage_threads.get(GRAPHS[name].stage, threads), spinning)
                         for name, graph_prec in self.precisions.items()}
        for name, session in self.sessions.items():  # a swapped graph or an edited dim: refused now, not mid-run
            GRAPHS[name].check_declared_io(session.get_inputs(), session.get_outputs(), artifact.dims, self.precisions[name],
                                           str(artifact.graph_path(name, self.precisions[name])))

    def close(self) -> None:
        self.sessions = {}
        super().close()

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = GRAPHS[name]
        outputs = self.sessions[name].run(spec.output_names, feeds)
        return dict(zip(spec.output_names, outputs))


class OnnxRuntimeCpuRunner(OnnxRuntimeRunner):
    backend = Backend.ORT_CPU


class OnnxRuntimeCudaRunner(OnnxRuntimeRunner):
    backend = Backend.ORT_CUDA
