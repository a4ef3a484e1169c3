"""TensorRT engines (plans) from an artifact's ONNX graphs. NOT YET RUN ON HARDWARE.

    from export.tensorrt import build_artifact_engines
    build_artifact_engines(load_artifact("artifacts/f8k"))         # ARTIFACT/tensorrt/<graph>.<precision>.plan + .json
    python -m export MODEL_DIR --out ARTIFACT_DIR --tensorrt on      # the same, as the export's last step

TensorRT cannot be installed in this workplace (PyPI's wheels are stubs that download from a
host we cannot reach), so this file is written against the documented Python API of TensorRT
10 and 11 and only its pure-Python parts are tested (profiles, cache keys, flag choice, error
paths with a fake module). It imports neither torch nor TensorRT at module level.

- Precision: fp32 plans from the fp32 ONNX with TF32 off (fp32 means fp32). fp16 plans from the
  fp16 ONNX (the graphs' I/O is float16 there, as engine/graphs.py declares): TensorRT 11 networks
  are always strongly typed (no FP16 builder flag), so the ONNX's types are the plan's types,
  including a recurrence the exporter kept in fp32. TensorRT 10: the FP16 builder flag, with
  every layer whose ONNX outputs are float32 pinned to float32 (OBEY_PRECISION_CONSTRAINTS), so
  the fp32 islands stay fp32 there too. int8 graphs are ONNX Runtime quantization ops: no plans.
- Optimization profiles: one per caption-length bucket (WORD_BUCKETS, capped at max_words) for
  graphs with a words axis, each spanning the batch ranges of BATCH_RANGES; `choose_profile`
  picks the tightest profile holding a call's shapes (the runtime's first-fit gives the same,
  since profiles are ordered by bucket).
- Timing cache: ARTIFACT/tensorrt/timing.cache, loaded before and saved after each build.
- Engine cache: a plan is stored with a key {onnx_sha256, precision, gpu_name, compute_capability,
  tensorrt_version, profiles} (the fields engine/backends.py checks). A cached plan whose key
  differs from the current one is rebuilt here, and refused by the runtime; never used.
- Every status-returning TensorRT call is checked and its failure names the graph and tensor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from engine.artifact import TENSORRT_DIR, Artifact
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import DYNAMIC_AXES, GRAPHS, GraphSpec

TENSORRT_PRECISIONS = ("fp32", "fp16")
WORD_BUCKETS = (8, 16, 30)  # caption-length buckets; Flickr8K captions: median ~11 words, few above 20
# (min, opt, max) rows per call of each batch axis: opt is the block size the engine's runtime uses.
BATCH_RANGES = {"images": (1, 16, 128), "captions": (1, 256, 1024), "pairs": (1, 256, 4096)}
WORKSPACE_BYTES = 4 << 30
TIMING_CACHE = "timing.cache"


# ---------------------------------------------------------------------------------------------
# Profiles and keys (pure Python)


def word_buckets(max_words: int, buckets: tuple[int, ...] = WORD_BUCKETS) -> list[tuple[int, int]]:
    """[(low, high)] caption-length ranges covering 1..max_words."""
    edges = sorted({min(b, max_words) for b in buckets} | {max_words})
    return [(low, high) for low, high in zip([1] + [e + 1 for e in edges[:-1]], edges)]


def graph_profiles(spec: GraphSpec, dims: dict[str, int], batch_ranges: dict = BATCH_RANGES,
                   buckets: tuple[int, ...] = WORD_BUCKETS) -> list[dict[str, list[list[int]]]]:
    """Optimization profiles of a graph: [{input: [min shape, opt shape, max shape]}], one per
    words bucket (one profile if the graph has no words axis)."""
    has_words = any("words" in t.dims for t in spec.inputs)
    profiles = []
    for low, high in (word_buckets(dims["max_words"], buckets) if has_words else [(0, 0)]):
        axis = {name: batch_ranges[name] for name in DYNAMIC_AXES if name != "words"}
        axis["words"] = (low, high, high)
        profile = {}
        for tensor in spec.inputs:
            shapes = [[], [], []]
            for d in tensor.dims:
                for k in range(3):
                    shapes[k].append(axis[d][k] if d in DYNAMIC_AXES else d if isinstance(d, int) else int(dims[d]))
            profile[tensor.name] = shapes
        profiles.append(profile)
    return profiles


def choose_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]], graph: str = "") -> int:
    """Index of the profile with the smallest max volume that holds every input shape."""
    fitting = [(sum(_volume(s[2]) for s in p.values()), i) for i, p in enumerate(profiles)
               if all(all(lo <= x <= hi for lo, x, hi in zip(p[t][0], shape, p[t][2])) for t, shape in shapes.items())]
    if not fitting:
        raise InputError(f"tensorrt {graph}: input shapes {({t: list(s) for t, s in shapes.items()})} fit none of "
                         f"{len(profiles)} optimization profiles; split the call or rebuild with larger BATCH_RANGES")
    return min(fitting)[1]


def _volume(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def engine_key(onnx_sha256: str, precision: str, gpu_name: str, compute_capability: str, tensorrt_version: str,
               profiles: list) -> dict:
    """What a plan is built for; the same fields as engine.backends.tensorrt_engine_key."""
    return {"onnx_sha256": onnx_sha256, "precision": precision, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "tensorrt_version": tensorrt_version, "profiles": profiles}


def plan_paths(root: Path, name: str, precision: str) -> tuple[Path, Path]:
    """(plan, key json) of a graph's engine under ARTIFACT/tensorrt/ (the runtime reads the same paths)."""
    stem = Path(root) / TENSORRT_DIR / f"{name}.{precision}"
    return stem.with_suffix(".plan"), stem.with_suffix(".json")


def cached_plan_status(plan: Path, key_path: Path, key: dict) -> str:
    """"ok" when the cached plan was built for exactly `key`; else why it must be rebuilt."""
    if not plan.is_file() or not key_path.is_file():
        return "missing"
    try:
        recorded = json.loads(key_path.read_text(encoding="utf-8")).get("key", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "unreadable key file"
    differing = sorted(field for field in key if recorded.get(field) != key[field])
    return "ok" if not differing else "key changed: " + ", ".join(differing)


def build_mode(tensorrt_version: str, precision: str) -> dict:
    """How a plan is built: {"strongly_typed", "fp16_flag", "tf32": False, "pin_fp32_layers"}."""
    if precision not in TENSORRT_PRECISIONS:
        raise InputError(f"tensorrt precision {precision!r}: expected one of {list(TENSORRT_PRECISIONS)} "
                         f"(int8 graphs are ONNX Runtime dynamic quantization)")
    major = int(str(tensorrt_version).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"tensorrt {tensorrt_version}: expected TensorRT 10 or 11 (name-based I/O, execute_async_v3)")
    fp16 = precision == "fp16"
    return {"strongly_typed": major >= 11, "fp16_flag": fp16 and major == 10, "tf32": False,
            "pin_fp32_layers": fp16 and major == 10}


# ---------------------------------------------------------------------------------------------
# TensorRT calls (need TensorRT and a GPU)


def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA device visible."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed"
    try:
        device_identity()
    except BackendUnavailableError as exc:
        return False, str(exc)
    return True, "tensorrt and a CUDA device"


def device_identity() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of device 0, through cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError("cuda-python is not installed (pip install 'bssan-engine[trt]')") from None
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count < 1:
        raise BackendUnavailableError(f"no CUDA device visible (cudaGetDeviceCount: error {error}, {count} devices)")
    error, props = cudart.cudaGetDeviceProperties(0)
    if int(error) != 0:
        raise BackendUnavailableError(f"cudaGetDeviceProperties failed with CUDA error {error}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def _pin_fp32_layers(network, trt) -> int:
    """TensorRT 10 with the FP16 flag: keep every layer whose outputs the ONNX typed float32 in float32."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if outputs and all(t.dtype == trt.float32 for t in outputs):
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned += 1
    return pinned


def build_plan(onnx_path: Path, name: str, precision: str, profiles: list[dict], timing_cache: Path, trt=None) -> bytes:
    """Serialized engine of one ONNX graph; ArtifactError/BackendUnavailableError naming what failed."""
    if trt is None:
        import tensorrt as trt
    mode = build_mode(trt.__version__, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if mode["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # ignored (always on) in TensorRT 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser error recorded"
        raise ArtifactError(f"{onnx_path}: TensorRT's ONNX parser refused graph {name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if mode["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if mode["pin_fp32_layers"]:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32_layers(network, trt)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ArtifactError(f"{timing_cache}: TensorRT refused the timing cache (built by another TensorRT/GPU?); delete it")
    for index, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in shapes.items():
            if profile.set_shape(tensor, low, opt, high) is False:  # C++ setDimensions returns false on inconsistent dims
                raise ArtifactError(f"{onnx_path}: graph {name} profile {index}: TensorRT refused shapes {low}/{opt}/{high} of {tensor}")
        if config.add_optimization_profile(profile) < 0:
            raise ArtifactError(f"{onnx_path}: TensorRT refused optimization profile {index} of graph {name}: {shapes}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"{onnx_path}: TensorRT could not build graph {name} ({precision}); see the TensorRT log above")
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_artifact_engines(artifact: Artifact, precisions: tuple[str, ...] = TENSORRT_PRECISIONS,
                           rebuild: bool = False, trt=None, identity: tuple[str, str] | None = None) -> dict:
    """Build (or reuse, when the key matches) a plan for every fp32/fp16 graph of the artifact.
    Returns {"gpu_name", "compute_capability", "tensorrt_version", "engines": {"<graph>.<precision>": status}}."""
    if trt is None:
        import tensorrt as trt
    gpu_name, capability = identity or device_identity()
    engines = {}
    for name in artifact.graph_names:
        if GRAPHS[name].stage == "grid":  # the ONNX Runtime path's one-image graphs; TensorRT runs the pair graphs
            continue
        for precision in precisions:
            if not artifact.has_graph(name, precision):
                continue
            onnx_rel = artifact.manifest["graphs"][name][precision]["file"]
            profiles = graph_profiles(GRAPHS[name], artifact.dims)
            key = engine_key(artifact.manifest["files"][onnx_rel]["sha256"], precision, gpu_name, capability,
                             trt.__version__, profiles)
            plan, key_path = plan_paths(artifact.root, name, precision)
            status = cached_plan_status(plan, key_path, key)
            if status == "ok" and not rebuild:
                engines[f"{name}.{precision}"] = "cached"
                continue
            data = build_plan(artifact.root / onnx_rel, name, precision, profiles,
                              artifact.root / TENSORRT_DIR / TIMING_CACHE, trt)
            key_path.unlink(missing_ok=True)  # a plan without its key is never used
            _write_atomic(plan, data)
            _write_atomic(key_path, (json.dumps({"key": key, "build_mode": build_mode(trt.__version__, precision)},
                                                indent=2) + "\n").encode())
            engines[f"{name}.{precision}"] = "built" if status == "missing" else f"rebuilt ({status})"
    return {"gpu_name": gpu_name, "compute_capability": capability, "tensorrt_version": trt.__version__, "engines": engines}
