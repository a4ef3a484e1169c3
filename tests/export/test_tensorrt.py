"""export/tensorrt.py without TensorRT: profiles and buckets, profile choice, cache keys, the build
mode per TensorRT version, and the engine cache's reuse/rebuild logic and error paths.

The build itself is exercised against a small fake `tensorrt` module that records the calls; it
shows what our code does with TensorRT's answers (status checks, cache handling), not that
TensorRT accepts the graphs: that is NOT YET RUN ON HARDWARE. A real build runs under the `trt` marker.
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from engine.artifact import load_artifact
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.graphs import GRAPHS
from export.tensorrt import (
    TIMING_CACHE, build_artifact_engines, build_mode, cached_plan_status, choose_profile, engine_key, graph_profiles,
    plan_paths, tensorrt_available, word_buckets,
)

DIMS = {"region_count": 9, "region_dim": 16, "object_count": 4, "object_dim": 16, "word_dim": 12, "max_words": 30,
        "w2r_gates": 32, "w2r_values": 16, "o2w_hidden": 6, "o2w_first": 6, "shortlist_dim": 8}


def test_word_buckets():
    assert word_buckets(30) == [(1, 8), (9, 16), (17, 30)]
    assert word_buckets(12) == [(1, 8), (9, 12)]
    assert word_buckets(8) == [(1, 8)]
    assert word_buckets(40) == [(1, 8), (9, 16), (17, 30), (31, 40)]


def test_profiles_and_choice():
    profiles = graph_profiles(GRAPHS["w2r_pair"], DIMS)
    assert len(profiles) == 3
    words = profiles[1]["words"]
    assert words == [[1, 9, 12], [256, 16, 12], [1024, 16, 12]]  # [min, opt, max] shapes: captions x words x E
    assert profiles[0]["regions_values"][2] == [128, 9, 16] and profiles[0]["pairs"][2] == [4096, 2]
    assert len(graph_profiles(GRAPHS["w2r_image"], DIMS)) == 1  # no words axis: one profile
    shapes = lambda n, length: {"regions_attn": (1, 9, 12), "regions_values": (1, 9, 16), "words": (n, length, 12),  # noqa: E731
                                "gates_words": (n, length, 32), "lengths": (n,), "pairs": (n, 2)}
    assert [choose_profile(profiles, shapes(256, length)) for length in (1, 8, 9, 12, 30)] == [0, 0, 1, 1, 2]
    with pytest.raises(InputError, match=r"tensorrt w2r_pair: input shapes .* fit none of 3 optimization profiles"):
        choose_profile(profiles, shapes(2000, 5), "w2r_pair")


def test_key_fields_match_the_runtime():
    key = engine_key("abc", "fp16", "NVIDIA H200", "9.0", "10.3.0", [{"x": [[1], [2], [3]]}])
    assert set(key) == {"onnx_sha256", "precision", "gpu_name", "compute_capability", "tensorrt_version", "profiles"}
    backends = pytest.importorskip("engine.backends", reason="engine/backends.py not present")
    if hasattr(backends, "tensorrt_engine_key"):
        assert backends.tensorrt_engine_key("abc", "fp16", "NVIDIA H200", "9.0", "10.3.0", [{"x": [[1], [2], [3]]}]) == key


def test_cached_plan_status(tmp_path):
    plan, key_path = plan_paths(tmp_path, "w2r_pair", "fp16")
    key = engine_key("abc", "fp16", "NVIDIA H200", "9.0", "10.3.0", [])
    assert cached_plan_status(plan, key_path, key) == "missing"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    key_path.write_text(json.dumps({"key": key}))
    assert cached_plan_status(plan, key_path, key) == "ok"
    assert cached_plan_status(plan, key_path, {**key, "gpu_name": "NVIDIA A100", "tensorrt_version": "11.0"}) == \
        "key changed: gpu_name, tensorrt_version"
    key_path.write_text("{not json")
    assert cached_plan_status(plan, key_path, key) == "unreadable key file"


def test_build_mode_per_version():
    assert build_mode("10.3.0", "fp16") == {"strongly_typed": False, "fp16_flag": True, "tf32": False, "pin_fp32_layers": True}
    assert build_mode("11.0.0", "fp16") == {"strongly_typed": True, "fp16_flag": False, "tf32": False, "pin_fp32_layers": False}
    assert build_mode("10.3.0", "fp32")["fp16_flag"] is False
    with pytest.raises(InputError, match="tensorrt precision 'int8'"):
        build_mode("10.3.0", "int8")
    with pytest.raises(BackendUnavailableError, match="tensorrt 8.6.1: expected TensorRT 10 or 11"):
        build_mode("8.6.1", "fp32")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_unavailable_here():
    assert tensorrt_available() == (False, "tensorrt is not installed")


# ---------------------------------------------------------------------------------------------
# The engine cache against a fake tensorrt module


def _fake_trt(version="11.0.0", parse_ok=True, build_ok=True, profile_index=0):
    calls = []

    class Config:
        def set_memory_pool_limit(self, *a): calls.append("workspace")
        def clear_flag(self, flag): calls.append(f"clear {flag}")
        def set_flag(self, flag): calls.append(f"set {flag}")
        def create_timing_cache(self, data): return SimpleNamespace(serialize=lambda: b"cache" + data[:0])
        def set_timing_cache(self, cache, ignore_mismatch): return True
        def add_optimization_profile(self, profile): calls.append("profile"); return profile_index
        def get_timing_cache(self): return SimpleNamespace(serialize=lambda: b"timing")

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): calls.append(f"network {flags}"); return SimpleNamespace(num_layers=0)
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return SimpleNamespace(set_shape=lambda *a: None)
        def build_serialized_network(self, network, config): calls.append("build"); return b"PLAN" if build_ok else None

    class Parser:
        def __init__(self, network, logger): self.num_errors = 0 if parse_ok else 1
        def parse_from_file(self, path): calls.append(f"parse {path.rsplit('/', 1)[-1]}"); return parse_ok
        def get_error(self, i): return "In node 12 (Loop): unsupported"

    trt = SimpleNamespace(__version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
                          Builder=Builder, OnnxParser=Parser, MemoryPoolType=SimpleNamespace(WORKSPACE=0),
                          BuilderFlag=SimpleNamespace(FP16="FP16", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY"),
                          NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1), float32="float32")
    return trt, calls


IDENTITY = ("NVIDIA H200", "9.0")


def test_engine_cache_builds_reuses_and_rebuilds(demo_artifact, tmp_path):
    import shutil

    root = tmp_path / "a"
    shutil.copytree(demo_artifact, root)
    artifact = load_artifact(root)
    trt, calls = _fake_trt()
    report = build_artifact_engines(artifact, ("fp16",), trt=trt, identity=IDENTITY)
    pair_path = [n for n in artifact.graph_names if GRAPHS[n].stage != "grid"]  # grid graphs: the ONNX Runtime path only
    assert set(report["engines"].values()) == {"built"} and len(report["engines"]) == len(pair_path)
    assert "set FP16" not in calls and "clear TF32" in calls  # TensorRT 11: strongly typed, no FP16 flag
    plan, key_path = plan_paths(root, "w2r_pair", "fp16")
    assert plan.read_bytes() == b"PLAN" and json.loads(key_path.read_text())["key"]["gpu_name"] == "NVIDIA H200"
    assert (root / "tensorrt" / TIMING_CACHE).read_bytes() == b"timing"
    assert calls.count("profile") == sum(len(graph_profiles(GRAPHS[n], artifact.dims)) for n in pair_path)
    calls.clear()
    report = build_artifact_engines(artifact, ("fp16",), trt=trt, identity=IDENTITY)
    assert set(report["engines"].values()) == {"cached"} and "build" not in calls
    report = build_artifact_engines(artifact, ("fp16",), trt=trt, identity=("NVIDIA A100", "8.0"))
    assert report["engines"]["w2r_pair.fp16"] == "rebuilt (key changed: compute_capability, gpu_name)"
    trt10, calls10 = _fake_trt(version="10.3.0")
    build_artifact_engines(artifact, ("fp16",), trt=trt10, identity=IDENTITY)
    assert "set FP16" in calls10 and "set OBEY" in calls10 and "network 0" in calls10


@pytest.mark.parametrize("failure, pattern", [
    ({"parse_ok": False}, r"w2r_image.fp32.onnx: TensorRT's ONNX parser refused graph w2r_image: In node 12 \(Loop\): unsupported"),
    ({"build_ok": False}, r"TensorRT could not build graph w2r_image \(fp32\)"),
    ({"profile_index": -1}, r"TensorRT refused optimization profile 0 of graph w2r_image"),
])
def test_build_failures_are_one_line_errors(demo_artifact, failure, pattern):
    trt, _ = _fake_trt(**failure)
    with pytest.raises(ArtifactError, match=pattern):
        build_artifact_engines(load_artifact(demo_artifact), ("fp32",), trt=trt, identity=IDENTITY)
    assert not plan_paths(demo_artifact, "w2r_image", "fp32")[0].exists()


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU")
def test_real_tensorrt_build(demo_artifact, tmp_path):
    import shutil

    root = tmp_path / "a"
    shutil.copytree(demo_artifact, root)
    available, reason = tensorrt_available()
    if not available:
        pytest.skip(reason)
    report = build_artifact_engines(load_artifact(root))
    assert all(status == "built" for status in report["engines"].values())
