"""Runners: one parity check run against every backend, explicit backends that are not there,
`auto`'s choice, no silent provider fallback, input validation, TensorRT's pure-Python parts,
and `import engine.runtime` without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.artifact import load_artifact
from engine.backends import Backend, BackendUnavailableError, OnnxRuntimeCudaRunner, open_runner
from engine.errors import ArtifactError, InputError
from engine.graphs import GRAPHS
from engine.backends.tensorrt import TensorRTRunner, check_tensorrt_key, tensorrt_engine_key
from tests.engine.conftest import assert_close

MARKS = {Backend.ORT_CUDA: [pytest.mark.gpu], Backend.TENSORRT: [pytest.mark.gpu, pytest.mark.trt]}
ALL_BACKENDS = [pytest.param(b, marks=MARKS.get(b, []), id=b.value) for b in Backend if b is not Backend.AUTO]
FP32_TOLERANCE = 1e-5  # scores of one model on two backends: summation order only (~1e-7 seen)


def example_feeds(name: str, dims: dict, precision: str = "fp32", seed: int = 0) -> dict[str, np.ndarray]:
    from export.onnx_export import example_inputs

    return example_inputs(GRAPHS[name], dims, precision, {"images": 3, "captions": 5, "pairs": 7, "words": dims["max_words"] - 1}, seed)


def torch_options(backend: Backend, checkpoints: dict) -> dict:
    """The torch reference runner needs the checkpoints the artifact was exported from (the manifest
    records their hashes, not their paths)."""
    return {"checkpoint": checkpoints["bssan"], "shortlist_checkpoint": checkpoints["shortlist"]} if backend is Backend.TORCH else {}


def open_or_skip(artifact, backend: Backend, precision: str = "fp32", checkpoints: dict | None = None):
    try:
        return open_runner(artifact, backend, precision, threads=1, **torch_options(backend, checkpoints or {}))
    except BackendUnavailableError as exc:
        reason = "TensorRT: not yet run on hardware; " if backend is Backend.TENSORRT else ""
        pytest.skip(f"{reason}{backend.value} not available here: {exc}")


@pytest.fixture(scope="module")
def reference(tiny_artifact, tiny_checkpoints):
    """Every graph's outputs from the torch reference runner on fixed random inputs."""
    artifact = load_artifact(tiny_artifact)
    with open_runner(artifact, Backend.TORCH, threads=1, **torch_options(Backend.TORCH, tiny_checkpoints)) as runner:
        return {name: runner.infer(name, example_feeds(name, artifact.dims)) for name in artifact.graph_names}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_graph_matches_the_torch_reference(tiny_artifact, tiny_checkpoints, reference, backend):
    """THE check function, run against every backend that is available here (others skip with a reason)."""
    artifact = load_artifact(tiny_artifact)
    with open_or_skip(artifact, backend, checkpoints=tiny_checkpoints) as runner:
        assert runner.backend is backend
        for name, want in reference.items():
            got = runner.infer(name, example_feeds(name, artifact.dims))
            assert sorted(got) == sorted(want)
            for output in want:
                assert got[output].dtype == want[output].dtype
                assert_close(got[output], want[output], FP32_TOLERANCE, f"{backend.value} {name}.{output}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scores_match_the_training_model(tiny_artifact, tiny_store, tiny_checkpoints, backend):
    """End to end on every available backend: Scorer.score_matrix == training.model's score_matrix."""
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from training.checkpoint import load_checkpoint

    split = FeatureStore(tiny_store).split("test")
    model = load_checkpoint(tiny_checkpoints["bssan"]).model
    want = model.score_matrix(np.array(split.regions), np.array(split.objects), np.array(split.words("glove50")),
                              np.asarray(split.lengths)).numpy()
    artifact = load_artifact(tiny_artifact)
    runner = open_or_skip(artifact, backend, checkpoints=tiny_checkpoints)
    with Scorer(artifact, runner) as scorer:
        got = scorer.score_matrix(scorer.encode_images(split), scorer.encode_captions(split))
    assert_close(got, want, FP32_TOLERANCE, f"{backend.value} score matrix")


def test_explicit_backends_that_are_absent_say_how_to_install(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider is not in .*pip install 'bssan-engine\[gpu\]'"):
            OnnxRuntimeCudaRunner(artifact)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match=r"tensorrt is not installed; pip install 'bssan-engine\[trt\]'"):
            TensorRTRunner(artifact)
    with pytest.raises(BackendUnavailableError, match=r"int8 is ONNX Runtime dynamic quantization"):
        open_runner(artifact, "torch", "int8")
    with pytest.raises(InputError, match=r"backend 'onnx': expected one of \['auto', 'onnxruntime-cpu'"):
        open_runner(artifact, "onnx")


def test_auto_says_what_it_chose(tiny_artifact, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="engine"):
        runner = open_runner(load_artifact(tiny_artifact), "auto", threads=1)
    assert runner.backend in (Backend.TENSORRT, Backend.ORT_CUDA, Backend.ORT_CPU)
    assert runner.reason.startswith(f"auto chose {runner.backend.value}")
    if runner.backend is Backend.ORT_CPU:  # it says why the faster ones were passed over
        assert "tensorrt" in runner.reason and "onnxruntime-cuda" in runner.reason
    assert runner.reason in caplog.text


def test_no_silent_fallback_from_cuda(tiny_artifact, monkeypatch):
    """ONNX Runtime silently runs on CPU when CUDA cannot load; the runner must notice and raise."""
    import onnxruntime

    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda path, sess_options=None, providers=None: real_session(path, sess_options=sess_options,
                                                                                     providers=["CPUExecutionProvider"]))
    with pytest.raises(BackendUnavailableError, match=r"asked onnxruntime for CUDAExecutionProvider, it gave \['CPUExecutionProvider'\]"):
        OnnxRuntimeCudaRunner(load_artifact(tiny_artifact))


def test_infer_validates_before_computing(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    with open_runner(artifact, "onnxruntime-cpu", threads=1) as runner:
        feeds = example_feeds("w2r_pair", artifact.dims)
        with pytest.raises(InputError, match=r"w2r_pair.words: expected dtype float32, got float64"):
            runner.infer("w2r_pair", {**feeds, "words": feeds["words"].astype(np.float64)})
        bad_pairs = feeds["pairs"].copy()
        bad_pairs[0, 1] = 5
        with pytest.raises(InputError, match=r"w2r_pair.pairs\[:, 1\]: expected caption rows in \[0, 5\), got \[0, 5\]"):
            runner.infer("w2r_pair", {**feeds, "pairs": bad_pairs})
        lengths = feeds["lengths"].copy()
        lengths[0] = 0
        with pytest.raises(InputError, match=r"w2r_pair.lengths: expected caption lengths in \[1, 7\]"):
            runner.infer("w2r_pair", {**feeds, "lengths": lengths})
        with pytest.raises(InputError, match=r"regions: expected shape \[images, 9, 16\], got \[3, 9, 15\]"):
            runner.infer("w2r_image", {"regions": np.zeros((3, 9, 15), np.float32)})


def test_int8_runs_pair_graphs_at_int8_and_the_rest_at_fp32(tiny_artifact, reference):
    artifact = load_artifact(tiny_artifact)
    with open_runner(artifact, "onnxruntime-cpu", "int8", threads=1) as runner:
        assert runner.precisions["w2r_pair"] == "int8" and runner.precisions["w2r_image"] == "fp32"
        for name in ("w2r_text", "o2w_image"):
            assert_close(runner.infer(name, example_feeds(name, artifact.dims))[next(iter(reference[name]))],
                         reference[name][next(iter(reference[name]))], FP32_TOLERANCE, name)
        got = runner.infer("w2r_pair", example_feeds("w2r_pair", artifact.dims))["scores"]
        assert_close(got, reference["w2r_pair"]["scores"], 0.1, "int8 w2r_pair")  # quantized: close, not equal


def test_fp16_runner_takes_and_gives_float16(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    with open_runner(artifact, "onnxruntime-cpu", "fp16", threads=1) as runner:
        out = runner.infer("w2r_image", example_feeds("w2r_image", artifact.dims, "fp16"))
        assert out["regions_attn"].dtype == np.float16
        assert runner.infer("w2r_pair", example_feeds("w2r_pair", artifact.dims, "fp16"))["scores"].dtype == np.float32


def test_torch_backend_needs_its_checkpoint(tiny_artifact, tiny_checkpoints, tmp_path):
    artifact = load_artifact(tiny_artifact)
    with pytest.raises(BackendUnavailableError, match=r"checkpoint '.*nowhere' not found; expected the checkpoint directory "
                                                      r"the artifact was exported from \(weights sha256 [0-9a-f]{12}; pass checkpoint=DIR\)"):
        open_runner(artifact, "torch", checkpoint=tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match=r"weights.pt: sha256 differs from the checkpoint the artifact was exported from"):
        open_runner(artifact, "torch", checkpoint=tiny_checkpoints["shortlist"])  # another checkpoint's weights


def test_manifest_records_checkpoints_by_hash_not_path(tiny_artifact, tiny_checkpoints):
    from engine.files import file_sha256

    model = load_artifact(tiny_artifact).manifest["model"]
    assert "source" not in model and "shortlist_source" not in model
    assert model["checkpoint"] == {"weights_sha256": file_sha256(tiny_checkpoints["bssan"] / "weights.pt"), "name": "bssan"}
    assert model["shortlist_checkpoint"]["weights_sha256"] == file_sha256(tiny_checkpoints["shortlist"] / "weights.pt")


# ---------------------------------------------------------------------------------------------
# TensorRT: only what runs without TensorRT (the runner itself: not yet run on hardware)


def test_tensorrt_plan_of_another_gpu_is_refused(tmp_path):
    key = tensorrt_engine_key("abc", "fp16", "NVIDIA H200", "9.0", "10.9.0", [{"words": [[1], [8], [8]]}])
    path = tmp_path / "w2r_pair.fp16.json"
    path.write_text(json.dumps({"key": {**key, "gpu_name": "NVIDIA A100", "compute_capability": "8.0"}}))
    with pytest.raises(ArtifactError, match=r"built for another setup \(gpu_name 'NVIDIA A100' != 'NVIDIA H200'; "
                                            r"compute_capability '8.0' != '9.0'\)"):
        check_tensorrt_key(path, key)
    path.write_text(json.dumps({"key": key}))
    check_tensorrt_key(path, key)  # the same key: accepted
    with pytest.raises(ArtifactError, match=r"missing; expected the key of the TensorRT plan"):
        check_tensorrt_key(tmp_path / "absent.json", key)


def test_tensorrt_key_fields_agree_with_the_exporter():
    from export.tensorrt import engine_key

    args = ("abc", "fp32", "gpu", "9.0", "10.0", [])
    assert tensorrt_engine_key(*args) == engine_key(*args)


# ---------------------------------------------------------------------------------------------
# The engine without torch


def test_engine_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import engine.runtime, engine.score, engine.backends, engine.cache, engine.attention, engine.demo\n"
            "import engine.encode, engine.journal, engine.backends.tensorrt\n"
            "from engine.backends import open_runner\n"
            "assert sys.modules['torch'] is None\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_torch_backend_without_torch_says_how_to_install(tiny_artifact):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from engine.artifact import load_artifact\nfrom engine.backends import open_runner\n"
            f"open_runner(load_artifact({str(tiny_artifact)!r}), 'torch')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "BackendUnavailableError" in result.stderr and "pip install 'bssan-engine[train]'" in result.stderr


def test_every_session_asks_to_flush_denormals(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    with open_runner(artifact, "onnxruntime-cpu", "fp32", threads=1) as runner:
        for name, session in runner.sessions.items():
            assert session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1", name


_DENORMAL = """
import sys
import numpy as np
from onnx import TensorProto, helper
from engine.backends.onnxruntime import open_session
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]); y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"]), helper.make_node("Div", ["t", "x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]); model.ir_version = 8
v = np.array([1e-20, 1.0], np.float32)  # 1e-20 squared is a denormal (1e-40)
got = open_session(model.SerializeToString(), threads=1, denormal_as_zero=sys.argv[1] == "1").run(None, {"x": v})[0]
print(float(got[0]), float(got[1]), float((v[:1] * v[:1] / v[:1])[0]))
"""


@pytest.mark.parametrize("flush", [True, False])
def test_denormal_as_zero_in_a_fresh_process(flush):
    # what the option does, where no earlier session of the process decided it (ONNX Runtime: the first one does)
    out = subprocess.run([sys.executable, "-c", _DENORMAL, "1" if flush else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    tiny, one, numpy_after = map(float, out)
    assert one == 1.0
    if flush:
        assert tiny == 0.0 and numpy_after == 0.0  # process-wide: numpy on this thread flushes too
    else:
        assert tiny == pytest.approx(1e-20, rel=1e-3) and numpy_after == pytest.approx(1e-20, rel=1e-3)
