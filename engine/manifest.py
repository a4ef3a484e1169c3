"""The artifact manifest as a dataclass: written by the exporter (export/pipeline.py), read by the engine.

    manifest = ArtifactManifest.from_dict(json.loads(text), where="artifacts/f8k/manifest.json")  # validated
    manifest.dims["object_count"]; manifest.fusion; manifest.model.attention_biases
    text = json.dumps(manifest.to_dict())

It carries every constant the engine needs (sizes, branch weights, attention biases, fusion weights,
the feature pipeline's record, the word set, file hashes), so the engine never opens a checkpoint
or walks an ONNX file to find one. Every field is checked against its schema at load; an error is
one line naming the field: `manifest.json: dims.object_count: expected a positive int, got 'ten'`.

Fields (format version 2; version 1 artifacts load too, without attention biases or fusion):

    format "bssan-artifact", version (int), created_utc (str)
    model        kind "bssan", config (ModelConfig dict), score_weights {"w2r": w, "o2w": w'} (MS = w Y + w' Y'),
                 attention_biases {"w2r": b, "o2w": b'} (the pair graphs' scalar biases, engine/attention.py),
                 attention_form "tanh" (softmax(tanh(x + b)), the paper) | "scaled" (softmax(x + b), temperature folded in),
                 checkpoint / shortlist_checkpoint {"weights_sha256", "name"} (by hash, never a path),
                 shortlist_config, metrics, provenance
    dims         {STATIC_DIMS name: positive int}
    w2r_values   "gates" | "regions" | null
    precisions   ["fp32", ...] (fp32 always)
    graphs       {graph: {precision: {"file": "graphs/<graph>.<precision>.onnx"}}}
    files        {relative path: {"sha256": 64 hex, "bytes": int}} for every file but manifest.json and tensorrt/
    fusion       {"first_stage_weight": a, "bssan_weight": b}: the product score of a pair is
                 a * dual-encoder cosine + b * MS when the artifact has shortlist graphs (engine.ranking.Fusion);
                 absent: (0, 1) = BSSAN alone
    preprocessing  the feature store's extractor record (or null); word_features  the word set's record (or null)
    assets       {name: {"graph": "assets/<name>.onnx", "manifest": "assets/<name>.json", "kind"}}
    parity_max_abs_diff, fp16_recurrence, int8_scope, exporter, tensorrt: export records (not read by the engine)
    manifest_sha256  sha256 of the manifest's own content (`manifest_digest`: every field but this one and
                 "tensorrt", which the TensorRT builder fills in later); checked at load, so a hand-edited
                 field (dims.max_words 30 -> 5 would silently change rankings) is refused. Absent in
                 artifacts exported before it existed: those load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from engine.errors import ArtifactError, InputError
from engine.graphs import GRAPHS, PRECISIONS, STATIC_DIMS
from engine.ranking import BSSAN_ALONE, Fusion

ARTIFACT_FORMAT = "bssan-artifact"
ARTIFACT_VERSION = 2  # 2: model.attention_biases, model.checkpoint by hash, fusion
MANIFEST_NAME = "manifest.json"
BRANCHES = ("w2r", "o2w")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
UNHASHED_FIELDS = ("manifest_sha256", "tensorrt")  # the digest itself; the TensorRT record, written after export


def manifest_digest(data: dict) -> str:
    """sha256 of a manifest's JSON content without UNHASHED_FIELDS (canonical: sorted keys, no spaces)."""
    content = {k: v for k, v in data.items() if k not in UNHASHED_FIELDS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The schema: one check per kind of value, each naming the field


class _Fields:
    """Typed reads of a JSON object at `path`, raising one-line ArtifactErrors that name the field."""

    def __init__(self, data, path: str, where: str):
        self.where, self.path = where, path
        if not isinstance(data, dict):
            self.fail("", "an object", data)
        self.data = data

    def fail(self, key: str, expected: str, got) -> None:
        name = f"{self.path}.{key}" if self.path and key else self.path or key
        raise ArtifactError(f"{self.where}: {name}: expected {expected}, got {got!r}")

    def sub(self, key: str, required: bool = True) -> "_Fields | None":
        if self.data.get(key) is None and not required:
            return None
        if key not in self.data:
            self.fail(key, "an object (missing)", None)
        if not isinstance(self.data[key], dict):
            self.fail(key, "an object", self.data[key])
        return _Fields(self.data[key], f"{self.path}.{key}" if self.path else key, self.where)

    def get(self, key: str, check, expected: str, default=None, required: bool = False):
        if key not in self.data or (self.data[key] is None and not required):
            if required:
                self.fail(key, f"{expected} (missing)", None)
            return default
        value = self.data[key]
        if not check(value):
            self.fail(key, expected, value)
        return value

    def items(self):
        return self.data.items()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _is_str(value) -> bool:
    return isinstance(value, str) and bool(value)


def _is_dict(value) -> bool:
    return isinstance(value, dict)


def _checkpoint(fields: _Fields, key: str) -> dict | None:
    record = fields.sub(key, required=False)
    if record is None:
        return None
    record.get("weights_sha256", lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "a sha256 (64 hex digits)", required=True)
    return dict(record.data)


# ---------------------------------------------------------------------------------------------
# The dataclasses


@dataclass(frozen=True)
class ModelRecord:
    score_weights: dict[str, float]
    attention_biases: dict[str, float] = field(default_factory=dict)  # empty in version 1 artifacts
    attention_form: str = "tanh"  # "tanh": softmax(tanh(x + b)), the paper; "scaled": softmax(x + b), tau folded into W
    config: dict = field(default_factory=dict)
    checkpoint: dict | None = None
    shortlist_checkpoint: dict | None = None
    shortlist_config: dict | None = None
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    kind: str = "bssan"
    extra: dict = field(default_factory=dict)  # fields of older versions (source paths), kept as read
    hub: dict | None = None  # the image hub correction (engine/hub.py): {"file", "k", "beta", "captions"}; None: none

    @classmethod
    def from_fields(cls, model: _Fields) -> "ModelRecord":
        kind = model.get("kind", lambda v: v == "bssan", "'bssan'", default="bssan")
        weights = model.sub("score_weights")
        score_weights = {b: float(weights.get(b, _is_number, "a finite number", required=True)) for b in BRANCHES
                         if b in weights.data}
        if not score_weights:
            weights.fail("", "weights of 'w2r' and/or 'o2w'", weights.data)
        biases = model.sub("attention_biases", required=False)
        attention_biases = {} if biases is None else {
            b: float(biases.get(b, _is_number, "a finite number", required=True)) for b in BRANCHES if b in biases.data}
        form = model.get("attention_form", lambda v: v in ("tanh", "scaled"), "'tanh' or 'scaled'", default="tanh")
        known = {"kind", "score_weights", "attention_biases", "attention_form", "config", "checkpoint", "shortlist_checkpoint",
                 "shortlist_config", "metrics", "provenance", "hub"}
        hub = model.sub("hub", required=False)
        if hub is not None:
            hub = {"file": hub.get("file", lambda v: isinstance(v, str) and v != "", "a file name", required=True),
                   "k": int(hub.get("k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1",
                                    required=True)),
                   "beta": float(hub.get("beta", lambda v: _is_number(v) and v >= 0, "a number >= 0", required=True)),
                   "captions": int(hub.get("captions", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                                           "an integer >= 1", required=True))}
        return cls(score_weights=score_weights, attention_biases=attention_biases, attention_form=form,
                   config=model.get("config", _is_dict, "an object", {}),
                   checkpoint=_checkpoint(model, "checkpoint"), shortlist_checkpoint=_checkpoint(model, "shortlist_checkpoint"),
                   shortlist_config=model.get("shortlist_config", _is_dict, "an object or null"),
                   metrics=model.get("metrics", _is_dict, "an object", {}),
                   provenance=model.get("provenance", _is_dict, "an object", {}), kind=kind,
                   extra={k: v for k, v in model.items() if k not in known}, hub=hub)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": self.config, "score_weights": self.score_weights,
                "attention_biases": self.attention_biases, "attention_form": self.attention_form, "checkpoint": self.checkpoint,
                "shortlist_checkpoint": self.shortlist_checkpoint, "shortlist_config": self.shortlist_config,
                "metrics": self.metrics, "provenance": self.provenance, **({"hub": self.hub} if self.hub else {}), **self.extra}


@dataclass(frozen=True)
class ArtifactManifest:
    model: ModelRecord
    dims: dict[str, int]
    precisions: tuple[str, ...]
    graphs: dict[str, dict[str, dict]]
    files: dict[str, dict]
    version: int = ARTIFACT_VERSION
    created_utc: str | None = None
    w2r_values: str | None = None
    fusion: Fusion = BSSAN_ALONE
    preprocessing: dict | None = None
    word_features: dict | None = None
    assets: dict = field(default_factory=dict)
    parity_max_abs_diff: dict = field(default_factory=dict)
    fp16_recurrence: dict = field(default_factory=dict)
    int8_scope: str | None = None
    exporter: dict = field(default_factory=dict)
    tensorrt: dict = field(default_factory=dict)
    format: str = ARTIFACT_FORMAT
    manifest_sha256: str | None = None  # None: an artifact exported before the digest existed

    @property
    def word_set(self) -> str:
        return (self.word_features or {}).get("name", "glove50")

    @classmethod
    def from_dict(cls, data, where: str = MANIFEST_NAME) -> "ArtifactManifest":
        """Validate a manifest's JSON value against the schema; ArtifactError names the first bad field."""
        top = _Fields(data, "", where)
        top.get("format", lambda v: v == ARTIFACT_FORMAT, repr(ARTIFACT_FORMAT), required=True)
        version = top.get("version", _positive_int, "a positive int", required=True)
        if version > ARTIFACT_VERSION:
            raise ArtifactError(f"{where}: artifact format version {version} is newer than this engine reads "
                                f"({ARTIFACT_VERSION}); upgrade bssan-engine")
        recorded = top.get("manifest_sha256", lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "a sha256 (64 hex digits)")
        model = ModelRecord.from_fields(top.sub("model"))
        dims_fields = top.sub("dims")
        dims = {}
        for name, value in dims_fields.items():
            if name not in STATIC_DIMS:
                dims_fields.fail(name, f"a name of {list(STATIC_DIMS)}", name)
            dims[name] = dims_fields.get(name, _positive_int, "a positive int", required=True)
        precisions = top.get("precisions", lambda v: isinstance(v, list) and "fp32" in v and set(v) <= set(PRECISIONS),
                             f"a list of {list(PRECISIONS)} with 'fp32'", required=True)
        files_fields = top.sub("files")
        files = {}
        for rel in files_fields.data:
            entry = files_fields.sub(rel)
            entry.get("sha256", lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "a sha256 (64 hex digits)", required=True)
            entry.get("bytes", lambda v: _is_int(v) and v >= 0, "a byte count (int >= 0)", required=True)
            files[rel] = dict(entry.data)
        graphs_fields = top.sub("graphs")
        graphs = {}
        for name in graphs_fields.data:
            if name not in GRAPHS:
                graphs_fields.fail(name, f"a graph of {list(GRAPHS)}", name)
            variants = graphs_fields.sub(name)
            graphs[name] = {}
            for precision in variants.data:
                if precision not in PRECISIONS:
                    variants.fail(precision, f"a precision of {list(PRECISIONS)}", precision)
                entry = variants.sub(precision)
                entry.get("file", lambda v: v in files, 'a file listed in "files"', required=True)
                graphs[name][precision] = dict(entry.data)
        fusion_fields = top.sub("fusion", required=False)
        fusion = BSSAN_ALONE
        if fusion_fields is not None:
            for key in ("first_stage_weight", "bssan_weight"):
                fusion_fields.get(key, lambda v: _is_number(v) and v >= 0, "a finite number >= 0", required=True)
            try:
                fusion = Fusion.from_dict(fusion_fields.data)
            except InputError as exc:
                raise ArtifactError(f"{where}: {exc}") from None
        assets = top.get("assets", _is_dict, "an object", {})
        for name in assets:
            entry = top.sub("assets").sub(name)
            for key in ("graph", "manifest"):
                entry.get(key, _is_str, "a path inside the artifact", required=True)
        return cls(
            model=model, dims=dims, precisions=tuple(precisions), graphs=graphs, files=files, version=version,
            created_utc=top.get("created_utc", _is_str, "a date string"),
            w2r_values=top.get("w2r_values", lambda v: v in ("gates", "regions"), "'gates', 'regions' or null"),
            fusion=fusion,
            preprocessing=top.get("preprocessing", _is_dict, "an object or null"),
            word_features=top.get("word_features", _is_dict, "an object or null"),
            assets=assets,
            parity_max_abs_diff=top.get("parity_max_abs_diff", _is_dict, "an object", {}),
            fp16_recurrence=top.get("fp16_recurrence", _is_dict, "an object", {}),
            int8_scope=top.get("int8_scope", _is_str, "a string or null"),
            exporter=top.get("exporter", _is_dict, "an object", {}),
            tensorrt=top.get("tensorrt", _is_dict, "an object", {}),
            manifest_sha256=recorded,
        )

    def to_dict(self) -> dict:
        return {
            "format": self.format, "version": self.version, "created_utc": self.created_utc,
            "model": self.model.to_dict(), "dims": self.dims, "w2r_values": self.w2r_values,
            "precisions": list(self.precisions), "graphs": self.graphs,
            "parity_max_abs_diff": self.parity_max_abs_diff, "fp16_recurrence": self.fp16_recurrence,
            "int8_scope": self.int8_scope, "files": self.files, "fusion": self.fusion.to_dict(),
            "preprocessing": self.preprocessing, "word_features": self.word_features, "assets": self.assets,
            "exporter": self.exporter, "tensorrt": self.tensorrt,
            **({"manifest_sha256": self.manifest_sha256} if self.manifest_sha256 else {}),
        }

    def sealed(self) -> dict:
        """to_dict() with manifest_sha256 set to the digest of its content: what the exporter writes."""
        data = {k: v for k, v in self.to_dict().items() if k != "manifest_sha256"}
        return {**data, "manifest_sha256": manifest_digest(data)}
