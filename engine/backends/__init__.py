"""Backends that run an artifact's graphs (engine/graphs.py): ONNX Runtime CPU/CUDA, TensorRT, torch.

    from engine.artifact import load_artifact
    from engine.backends import open_runner
    with open_runner(load_artifact("artifacts/flickr8k"), backend="auto", precision="fp32", threads=2) as runner:
        print(runner.backend, runner.reason)          # what `auto` chose, and why
        out = runner.infer("w2r_text", {"words": words})   # {"gates_words": [B_txt, L, 4H]}

Every runner has the same surface (base.py): `infer(graph, feeds) -> {output: array}` validates the
feeds against the graph's declaration (names, dtypes, shapes; pair indices inside their rows;
caption lengths in [1, words]) and `_infer` computes. Runners own their sessions/engines and
release them on `close()` or at the end of a `with` block.

The package (imported lazily: `import engine.backends` needs numpy only):
- base.py         Backend names, install hints, the Runner base.
- onnxruntime.py  `onnxruntime-cpu` (the default everywhere), `onnxruntime-cuda` (needs onnxruntime-gpu),
                  and `open_session`: THE place an ONNX Runtime session is made, also for the feature
                  graphs (backbone, RoIAlign, MiniLM, ONNX detector), so `--backend` applies end to end.
- tensorrt.py     `tensorrt`: plans from ARTIFACT/tensorrt/ built by the exporter.
                  NOT YET RUN ON HARDWARE: no TensorRT in this workplace; only its pure-Python parts are tested.
- this file       THE registry: name -> runner class, `open_runner`, and `auto`'s choice.
- `torch`: the reference runner lives with the exporter (export/torch_runner.py: it needs the
  checkpoint and the torch graph modules), never in the engine. It is registered under the entry
  point group `bssan_engine.backends` (pyproject.toml) or in-process with `register_backend`.
- `auto`: TensorRT if usable, else ONNX Runtime CUDA, else ONNX Runtime CPU; `runner.reason` says why.

Precision: fp32 and fp16 run every graph at that precision; int8 runs the graphs the exporter
quantized (pair graphs) at int8 and the others at fp32 (`runner.precisions` lists each graph's).

Thread safety: one runner may be called from several threads at once. ONNX Runtime's
`InferenceSession.run` and torch inference under no_grad are re-entrant; a TensorRT execution
context is not, so the TensorRT runner serialises its calls with a lock.
"""

from __future__ import annotations

import importlib.metadata
import logging

from engine.backends.base import INSTALL, Backend, Runner, check_pair_feeds, graph_precision, parse_backend  # noqa: F401
from engine.backends.onnxruntime import (  # noqa: F401
    ORT_PROVIDER, OnnxRuntimeCpuRunner, OnnxRuntimeCudaRunner, OnnxRuntimeRunner, open_session, session_backend,
)
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import PRECISIONS

log = logging.getLogger("engine")
ENTRY_POINT_GROUP = "bssan_engine.backends"  # name = Backend value, object = runner class (e.g. torch)
_REGISTERED: dict[Backend, type[Runner]] = {}


def register_backend(backend: str | Backend, runner: type[Runner]) -> None:
    """Make `runner` the class of `backend` in this process (e.g. a test's or a plugin's runner)."""
    _REGISTERED[parse_backend(backend)] = runner


def _from_entry_point(backend: Backend) -> type[Runner] | None:
    # Every distribution's entry points, not importlib.metadata.entry_points(): that keeps only the first
    # distribution of a name on sys.path, and a stale `bssan_engine.egg-info` in the working directory
    # (left by an older editable install) would hide the installed one.
    entries = (e for dist in importlib.metadata.distributions() for e in dist.entry_points if e.group == ENTRY_POINT_GROUP)
    for entry in entries:
        if entry.name == backend.value:
            try:
                return entry.load()
            except ImportError as exc:
                raise BackendUnavailableError(f"{backend.value} backend: {exc}; {INSTALL[backend]}") from None
    return None


def runner_class(backend: str | Backend) -> type[Runner]:
    backend = parse_backend(backend)
    if backend in _REGISTERED:
        return _REGISTERED[backend]
    if backend is Backend.TENSORRT:
        from engine.backends.tensorrt import TensorRTRunner  # its own module: it is written against TensorRT's API

        return TensorRTRunner
    if backend in (Backend.ORT_CPU, Backend.ORT_CUDA):
        return {Backend.ORT_CPU: OnnxRuntimeCpuRunner, Backend.ORT_CUDA: OnnxRuntimeCudaRunner}[backend]
    runner = _from_entry_point(backend)
    if runner is None:
        raise BackendUnavailableError(f"{backend.value} backend: no runner registered (entry point group {ENTRY_POINT_GROUP!r}); "
                                      f"{INSTALL[backend]}, or register_backend({backend.value!r}, RunnerClass)")
    return runner


def open_runner(artifact, backend: str | Backend = Backend.AUTO, precision: str = "fp32",
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
