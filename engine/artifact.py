"""A BSSAN model artifact directory: its manifest, file hashes and graph paths (numpy only).

Written by `python -m export MODEL_DIR --out ARTIFACT_DIR`; read by the engine runtime:

    from engine.artifact import load_artifact
    artifact = load_artifact("artifacts/flickr8k")          # verifies every file's sha256
    path = artifact.graph_path("w2r_pair", "int8")          # Path of graphs/w2r_pair.int8.onnx
    spec = artifact.spec("w2r_pair"); dims = artifact.dims  # I/O declaration (engine/graphs.py)

Layout:

    ARTIFACT/manifest.json                 the fields below
    ARTIFACT/graphs/<graph>.<precision>.onnx   graphs of engine/graphs.py; precision fp32 | fp16 | int8
                                           (int8 exists only for a pair graph with weights in the int8
                                           scope, i.e. w2r_pair; every other graph runs its fp32 file)
    ARTIFACT/assets/<name>.onnx + .json    copies of the feature backbones (export.backbones,
                                           export.text) when they were found at export time
    ARTIFACT/tensorrt/                     TensorRT engine cache (never listed in "files": engines are
                                           rebuilt per GPU; see export/tensorrt.py)
    ARTIFACT/validation.json               parity and precision figures of the export

manifest.json: the fields of engine/manifest.py (ArtifactManifest), validated at load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ArtifactError
from engine.files import file_sha256
from engine.graphs import GRAPHS, GraphSpec
from engine.manifest import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST_NAME, ArtifactManifest, manifest_digest  # noqa: F401
from engine.ranking import Fusion

TENSORRT_DIR = "tensorrt"


def file_entry(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, as manifest["files"] holds it."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _varint(data: bytes, pos: int, path: Path) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ArtifactError(f"{path}: truncated ONNX file (ends inside a field header at byte {pos}); re-export it")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
        if shift > 63:
            raise ArtifactError(f"{path}: not an ONNX file (bad varint at byte {pos}); re-export it")


def _fields(data: bytes, path: Path):
    """(field number, wire type, value) of one protobuf message, an int for wire 0, bytes otherwise; a one-line
    ArtifactError where the bytes are not a message (truncated, a bad key)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos, path)
        number, wire = key >> 3, key & 7
        if number == 0 or wire not in (0, 1, 2, 5):
            raise ArtifactError(f"{path}: not an ONNX file (bad field key {key} at byte {pos}); re-export it")
        if wire == 0:
            value, pos = _varint(data, pos, path)
        else:
            size = 8 if wire == 1 else 4 if wire == 5 else None
            if size is None:
                size, pos = _varint(data, pos, path)
            if pos + size > len(data):
                raise ArtifactError(f"{path}: truncated ONNX file (field {number} needs {size} bytes at byte {pos}, "
                                    f"the message has {len(data)}); re-export it")
            value, pos = data[pos:pos + size], pos + size
        yield number, wire, value


def _model_fields(path: str | os.PathLike) -> list[tuple[int, int, int | bytes]]:
    """The top-level fields of an ONNX ModelProto file, read without onnx; a one-line ArtifactError if the file is
    missing, empty, truncated or not a model (no ir_version or graph)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: ONNX file not found; re-export the artifact")
    data = path.read_bytes()
    if not data:
        raise ArtifactError(f"{path}: empty ONNX file; re-export it")
    fields = list(_fields(data, path))
    if not {1, 7} <= {number for number, _, _ in fields}:  # ModelProto.ir_version = 1, ModelProto.graph = 7
        raise ArtifactError(f"{path}: not an ONNX model (no ir_version or graph field); re-export it")
    return fields


def check_onnx_structure(path: str | os.PathLike) -> None:
    """Walk the top-level protobuf fields of an ONNX ModelProto without onnx: raise a one-line
    ArtifactError if the file is missing, empty, truncated or not a model (no ir_version or graph)."""
    _model_fields(path)


_ONNX_FLOAT = 1  # TensorProto.DataType.FLOAT


def onnx_initializers(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The float32 initializers of an ONNX model's main graph, read without onnx (ModelProto.graph = 7,
    GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9).
    Other dtypes are skipped; a float initializer stored outside the file is an ArtifactError."""
    path = Path(path)
    graph = next((v for n, w, v in _model_fields(path) if n == 7 and w == 2), b"")
    out: dict[str, np.ndarray] = {}
    for number, wire, tensor in _fields(graph, path):
        if number != 5 or wire != 2:
            continue
        dims: list[int] = []
        dtype, name, raw, floats = 0, "", None, b""
        for n, w, v in _fields(tensor, path):
            if n == 1:
                if w == 0:
                    dims.append(v)
                else:  # packed
                    p = 0
                    while p < len(v):
                        d, p = _varint(v, p, path)
                        dims.append(d)
            elif n == 2:
                dtype = v
            elif n == 4:
                floats += v  # packed floats (wire 2), or one float (wire 5)
            elif n == 8:
                name = v.decode("utf-8", "replace")
            elif n == 9:
                raw = v
        if dtype != _ONNX_FLOAT:
            continue
        values = np.frombuffer(raw if raw is not None else floats, dtype="<f4")
        if values.size != int(np.prod(dims, dtype=np.int64)):
            raise ArtifactError(f"{path}: initializer {name!r} has {values.size} floats for shape {dims} "
                                f"(stored outside the file?); re-export it")
        out[name] = values.reshape(dims).astype(np.float32)
    return out


def read_manifest(root: str | os.PathLike) -> dict:
    """manifest.json of an artifact directory, with its format and version checked."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found; expected an artifact directory written by python -m export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); the file is corrupt or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: expected format {ARTIFACT_FORMAT!r}, got {got!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: version {version!r}: expected a positive integer")
    if version > ARTIFACT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this engine reads "
                            f"({ARTIFACT_VERSION}); upgrade bssan-engine")
    info = ArtifactManifest.from_dict(manifest, where=str(path))  # the schema: one line naming a bad field
    if info.manifest_sha256 is not None and manifest_digest(manifest) != info.manifest_sha256:
        raise ArtifactError(f"{path}: content differs from its manifest_sha256; the manifest was edited after export "
                            f"(a changed dim or weight would silently change every score); re-export the artifact")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every file listed in manifest["files"] exists with its size and sha256; every graph file is listed."""
    files = manifest["files"]
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {MANIFEST_NAME} but missing; the artifact is incomplete")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ArtifactError(f"{path}: {size} bytes, expected {entry.get('bytes')} from {MANIFEST_NAME}; the file is truncated or changed")
        if file_sha256(path) != entry.get("sha256"):
            raise ArtifactError(f"{path}: sha256 differs from {MANIFEST_NAME}; the file was changed after export")


@dataclass
class Artifact:
    root: Path
    manifest: dict  # manifest.json as read (validated); `info` is the same as a dataclass

    def __post_init__(self) -> None:
        self.info = ArtifactManifest.from_dict(self.manifest, where=str(self.root / MANIFEST_NAME))

    @property
    def dims(self) -> dict[str, int]:
        return self.info.dims

    @property
    def precisions(self) -> list[str]:
        return list(self.info.precisions)

    @property
    def graph_names(self) -> list[str]:
        return list(self.info.graphs)

    @property
    def score_weights(self) -> dict[str, float]:
        """{"w2r": weight of Y, "o2w": weight of Y'} for MS = w * Y + w' * Y'."""
        return self.info.model.score_weights

    @property
    def attention_biases(self) -> dict[str, float]:
        """{"w2r": b, "o2w": b'}: the pair graphs' attention biases, as the exporter recorded them."""
        if not self.info.model.attention_biases:
            raise ArtifactError(f"{self.root / MANIFEST_NAME}: model.attention_biases: missing (an artifact of format version "
                                f"{self.info.version}); expected version {ARTIFACT_VERSION}: re-export it to get attention weights")
        return self.info.model.attention_biases

    @property
    def hub(self):
        """The image hub correction (engine/hub.py HubBank) the model was exported with, or None. Read once."""
        record = self.info.model.hub
        if record is None:
            return None
        if getattr(self, "_hub", None) is None:
            from engine.hub import HubBank

            path = self.root / record["file"]
            if record["file"] not in self.info.files:
                raise ArtifactError(f"{self.root / MANIFEST_NAME}: model.hub.file {record['file']!r} is not among the "
                                    f"manifest's files; expected the exporter's hub bank")
            bank = HubBank.load(path)
            if (bank.k, len(bank)) != (record["k"], record["captions"]) or abs(bank.beta - record["beta"]) > 1e-12:
                raise ArtifactError(f"{path}: k={bank.k}, beta={bank.beta}, {len(bank)} captions; {MANIFEST_NAME} records "
                                    f"k={record['k']}, beta={record['beta']}, {record['captions']} captions")
            self._hub = bank
        return self._hub

    @property
    def fusion(self) -> Fusion:
        """How the product score combines the first stage and BSSAN (manifest "fusion"; default BSSAN alone)."""
        return self.info.fusion

    def spec(self, name: str) -> GraphSpec:
        if name not in GRAPHS:
            raise ArtifactError(f"graph {name!r}: expected one of {list(GRAPHS)}")
        return GRAPHS[name]

    def has_graph(self, name: str, precision: str = "fp32") -> bool:
        return precision in self.info.graphs.get(name, {})

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        if not self.has_graph(name, precision):
            have = {g: sorted(v) for g, v in self.info.graphs.items()}
            raise ArtifactError(f"{self.root}: no graph {name!r} at precision {precision!r}; the artifact has {have}")
        return self.root / self.info.graphs[name][precision]["file"]

    def asset(self, name: str) -> tuple[Path, Path]:
        """(graph, json manifest) paths of a feature backbone copied into the artifact."""
        assets = self.info.assets
        if name not in assets:
            raise ArtifactError(f"{self.root}: no asset {name!r}; the artifact has {sorted(assets)}")
        return self.root / assets[name]["graph"], self.root / assets[name]["manifest"]


def load_artifact(root: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read and (by default) verify an artifact directory: manifest format and version, every
    file's size and sha256, and the ONNX structure of every graph. Raises one-line ArtifactError."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory not found")
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
        for variants in manifest["graphs"].values():
            for entry in variants.values():
                check_onnx_structure(root / entry["file"])
    return Artifact(root, manifest)
