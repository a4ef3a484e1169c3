"""engine/graphs.py declarations and engine/artifact.py loading: hashes, versions, corrupt files.

Uses a hand-made one-node ONNX graph (onnx.helper), so it runs without torch in a few ms.
The real exported artifact is checked end to end in tests/export/test_export.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.artifact import (
    ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST_NAME, check_onnx_structure, file_entry, load_artifact, read_manifest,
)
from engine.errors import ArtifactError, InputError
from engine.graphs import DYNAMIC_AXES, GRAPHS, STATIC_DIMS, graph_file, pair_bytes

onnx = pytest.importorskip("onnx")

DIMS = {"region_count": 9, "region_dim": 16, "object_count": 4, "object_dim": 16, "word_dim": 12, "max_words": 8,
        "w2r_gates": 32, "w2r_values": 32, "o2w_hidden": 6, "o2w_first": 6, "shortlist_dim": 5}


def _tiny_onnx(path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture()
def artifact_dir(tmp_path):
    root = tmp_path / "artifact"
    (root / "graphs").mkdir(parents=True)
    rel = graph_file("w2r_pair", "fp32")
    _tiny_onnx(root / rel)
    manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "model": {"score_weights": {"w2r": 1.0, "o2w": 0.6}},
                "dims": DIMS, "precisions": ["fp32"], "graphs": {"w2r_pair": {"fp32": {"file": rel}}},
                "files": {rel: file_entry(root / rel)}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def _edit_manifest(root, **changes):
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_every_declared_dim_is_dynamic_static_or_literal():
    for spec in GRAPHS.values():
        for tensor in (*spec.inputs, *spec.outputs):
            for dim in tensor.dims:
                assert isinstance(dim, int) or dim in DYNAMIC_AXES or dim in STATIC_DIMS, (spec.name, tensor.name, dim)
    # a pair graph reads only caches and the index: never raw regions, objects or words-only encoders' inputs
    assert "regions" not in GRAPHS["w2r_pair"].input_names and "objects" not in GRAPHS["o2w_pair"].input_names
    assert GRAPHS["w2r_pair"].dynamic_axes()["pairs"] == {0: "pairs"}


def test_check_inputs_names_the_tensor():
    spec = GRAPHS["o2w_text"]
    good = {"words": np.zeros((3, 5, 12), np.float32), "lengths": np.array([1, 5, 2])}
    spec.check_inputs(good, DIMS)
    with pytest.raises(InputError, match=r"o2w_text.words: expected shape \[captions, words, 12\], got \[3, 5, 11\]"):
        spec.check_inputs({**good, "words": np.zeros((3, 5, 11), np.float32)}, DIMS)
    with pytest.raises(InputError, match=r"o2w_text.lengths: axis 0 \(captions\) is 2, but words has 3"):
        spec.check_inputs({**good, "lengths": np.array([1, 2])}, DIMS)
    with pytest.raises(InputError, match="o2w_text.words: expected dtype float16, got float32"):
        spec.check_inputs(good, DIMS, precision="fp16")
    with pytest.raises(InputError, match=r"missing \['lengths'\]"):
        spec.check_inputs({"words": good["words"]}, DIMS)


def test_graph_file_and_pair_bytes():
    assert graph_file("o2w_pair", "int8") == "graphs/o2w_pair.int8.onnx"
    with pytest.raises(InputError, match="precision 'bf16'"):
        graph_file("o2w_pair", "bf16")
    assert pair_bytes(DIMS, 10, 4) == 10 * (9 * 32 + 2 * 4 * 32) * 4


def test_load_verifies_and_serves_paths(artifact_dir):
    artifact = load_artifact(artifact_dir)
    assert artifact.graph_path("w2r_pair") == artifact_dir / "graphs/w2r_pair.fp32.onnx"
    assert artifact.score_weights == {"w2r": 1.0, "o2w": 0.6}
    with pytest.raises(ArtifactError, match="no graph 'w2r_pair' at precision 'int8'"):
        artifact.graph_path("w2r_pair", "int8")


def test_changed_file_is_refused(artifact_dir):
    path = artifact_dir / "graphs/w2r_pair.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="w2r_pair.fp32.onnx: sha256 differs from manifest.json"):
        load_artifact(artifact_dir)


def test_truncated_and_missing_files(artifact_dir):
    path = artifact_dir / "graphs/w2r_pair.fp32.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"bytes, expected \d+ from manifest.json; the file is truncated"):
        load_artifact(artifact_dir)
    with pytest.raises(ArtifactError, match="truncated ONNX file"):
        check_onnx_structure(path)
    path.unlink()
    with pytest.raises(ArtifactError, match="listed in manifest.json but missing"):
        load_artifact(artifact_dir)


def test_not_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="not an ONNX file"):
        check_onnx_structure(path)
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty ONNX file"):
        check_onnx_structure(path)


def test_manifest_errors(artifact_dir):
    _edit_manifest(artifact_dir, version=ARTIFACT_VERSION + 1)
    with pytest.raises(ArtifactError, match=f"version {ARTIFACT_VERSION + 1} is newer than this engine reads"):
        read_manifest(artifact_dir)
    _edit_manifest(artifact_dir, version=ARTIFACT_VERSION, format="other")
    with pytest.raises(ArtifactError, match="expected format 'bssan-artifact', got 'other'"):
        read_manifest(artifact_dir)
    text = (artifact_dir / MANIFEST_NAME).read_text()
    (artifact_dir / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"manifest.json: not valid JSON .*corrupt or truncated"):
        load_artifact(artifact_dir)
    (artifact_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="manifest.json: manifest not found"):
        load_artifact(artifact_dir)


def test_unlisted_graph_file_is_refused(artifact_dir):
    _edit_manifest(artifact_dir, files={})
    with pytest.raises(ArtifactError, match=r'manifest.json: graphs.w2r_pair.fp32.file: expected a file listed in "files", got'):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("field, value, message", [
    ("dims", {**DIMS, "object_count": "ten"}, r"manifest.json: dims.object_count: expected a positive int, got 'ten'"),
    ("dims", {**DIMS, "objects": 3}, r"manifest.json: dims.objects: expected a name of \["),
    ("precisions", ["fp16"], r"manifest.json: precisions: expected a list of \['fp32', 'fp16', 'int8'\] with 'fp32'"),
    ("model", {"score_weights": {"w2r": "1"}}, r"manifest.json: model.score_weights.w2r: expected a finite number, got '1'"),
    ("fusion", {"first_stage_weight": -1, "bssan_weight": 1}, r"manifest.json: fusion.first_stage_weight: expected a finite number >= 0"),
    ("fusion", {"bssan_weight": 1}, r"manifest.json: fusion.first_stage_weight: expected a finite number >= 0 \(missing\)"),
    ("files", {"graphs/w2r_pair.fp32.onnx": {"sha256": "abc", "bytes": 1}},
     r"manifest.json: files.graphs/w2r_pair.fp32.onnx.sha256: expected a sha256 \(64 hex digits\), got 'abc'"),
])
def test_manifest_schema_names_the_field(artifact_dir, field, value, message):
    _edit_manifest(artifact_dir, **{field: value})
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact_dir)


def test_manifest_round_trips_through_the_dataclass(artifact_dir):
    from engine.manifest import ArtifactManifest
    from engine.ranking import Fusion

    artifact = load_artifact(artifact_dir)
    assert artifact.fusion == Fusion(0.0, 1.0)  # no fusion section: BSSAN alone
    again = ArtifactManifest.from_dict(artifact.info.to_dict())
    assert again == artifact.info
    with pytest.raises(ArtifactError, match=r"model.attention_biases: missing .*re-export it"):
        artifact.attention_biases
