"""Which feature graph is which: an asset graph is identified by its sha256 AND by a numeric fingerprint.

The bytes of an exported ONNX graph differ between machines even with the same torch and onnx
versions (measured: EfficientNet-Lite0 exported on two machines with torch 2.13.0+cpu and onnx
1.23.2 gave sha256 1e5d2cbf... and 9fc8551f..., while exporting twice on one machine gives the same
bytes). So a model records, for each graph its features came from, both the sha256 and the
graph's outputs on a fixed deterministic probe input (FINGERPRINT_VALUES of them, evenly spaced).
A graph whose bytes differ but whose fingerprint matches within FINGERPRINT_TOLERANCE (relative to
the largest recorded value) is accepted, saying so in one line on stderr; one whose fingerprint
differs is refused.

    fingerprint = graph_fingerprint(graph_path, asset_manifest)    # {"probe", "output", "values", "tolerance"}
    check_same_graph(record, graph_path, asset_manifest, "the backbone the model was trained with")
    extractor = add_fingerprints(extractor, [assets_dir])          # fill in records that predate fingerprints
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from engine.errors import AssetError
from engine.files import file_sha256
from engine.vision import BOXES_INPUT, FEATURE_MAP_INPUT, FEATURE_MAP_OUTPUT, IMAGE_INPUT, OBJECTS_OUTPUT, open_session

FINGERPRINT_PROBE = "probe-v1"  # the probe inputs below; change the name if they change
# Max |got - recorded| / max |recorded|. Two exports of the same weights differ by ~3e-6 here (both are
# within 3e-6 of torch: export/backbones.py parity); other weights differ by O(1).
FINGERPRINT_TOLERANCE = 1e-4
FINGERPRINT_VALUES = 256
ROI_PROBE_CHANNELS, ROI_PROBE_SIDE = 8, 7


def _probe(kind: str, manifest: dict) -> tuple[dict[str, np.ndarray], str]:
    """Deterministic inputs (closed-form patterns, no RNG: the same on every machine and numpy) and the output read."""
    if kind == "region-backbone":
        size = int(manifest["preprocessing"]["size"])
        c, y, x = np.meshgrid(np.arange(3), np.arange(size), np.arange(size), indexing="ij")
        image = np.sin(0.05 * x + 0.07 * y + 1.3 * c) + 0.5 * np.cos(0.011 * x * y / size + c)  # [3, S, S]
        return {IMAGE_INPUT: image[None].astype(np.float32)}, FEATURE_MAP_OUTPUT
    if kind == "roi-align":
        c, y, x = np.meshgrid(np.arange(ROI_PROBE_CHANNELS), np.arange(ROI_PROBE_SIDE), np.arange(ROI_PROBE_SIDE), indexing="ij")
        feature_map = np.sin(0.9 * x + 0.4 * y + 0.7 * c)[None].astype(np.float32)  # [1, C, h, w]
        boxes = np.array([[[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.6, 0.9], [0.5, 0.4, 0.8, 0.6]]], np.float32)  # [1, P, 4]
        return {FEATURE_MAP_INPUT: feature_map, BOXES_INPUT: boxes}, OBJECTS_OUTPUT
    raise AssetError(f"{manifest.get('graph')}: no fingerprint probe for an asset of kind {kind!r}; "
                     f"expected 'region-backbone' or 'roi-align'")


@functools.lru_cache(maxsize=8)
def _fingerprint(graph: str, sha256: str, kind: str, size: int | None) -> tuple[str, tuple[float, ...]]:
    feeds, output = _probe(kind, {"preprocessing": {"size": size}, "graph": graph})
    values = open_session(graph, threads=1).run([output], feeds)[0].reshape(-1).astype(np.float64)
    index = np.linspace(0, len(values) - 1, FINGERPRINT_VALUES).round().astype(np.int64)
    return output, tuple(float(f"{v:.7g}") for v in values[index])


def graph_fingerprint(graph: str | Path, manifest: dict) -> dict:
    """The fingerprint of an asset graph (its `<stem>.json` manifest gives the kind and input size)."""
    kind = manifest.get("kind")
    size = (manifest.get("preprocessing") or {}).get("size")
    output, values = _fingerprint(str(graph), file_sha256(graph), kind, size)
    return {"probe": FINGERPRINT_PROBE, "output": output, "values": list(values), "tolerance": FINGERPRINT_TOLERANCE}


def fingerprint_difference(recorded: dict, computed: dict) -> float:
    """max |computed - recorded| / max |recorded| (inf if the probes or lengths differ)."""
    if recorded.get("probe") != computed.get("probe") or len(recorded.get("values", ())) != len(computed["values"]):
        return float("inf")
    want, got = np.asarray(recorded["values"], np.float64), np.asarray(computed["values"], np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def check_same_graph(record: dict, graph: Path, manifest: dict, what: str) -> None:
    """Accept `graph` as the graph `record` names (a backbone / RoIAlign record of a store's extractor):
    the same sha256, or else a fingerprint within tolerance (one line on stderr); AssetError otherwise."""
    recorded_sha = str(record.get("graph_sha256"))
    if not Path(graph).is_file():
        raise AssetError(f"{graph}: not found; expected {what} (build it with python -m export.backbones)")
    if file_sha256(graph) == recorded_sha:
        return
    recorded = record.get("fingerprint")
    if not isinstance(recorded, dict):
        raise AssetError(f"{graph}: sha256 differs from {what} ({recorded_sha[:12]}), whose record has no fingerprint to "
                         f"compare outputs with; expected the same graph (re-export the model where its features were made)")
    difference = fingerprint_difference(recorded, graph_fingerprint(graph, manifest))
    tolerance = float(recorded.get("tolerance", FINGERPRINT_TOLERANCE))
    if not difference <= tolerance:
        raise AssetError(f"{graph}: sha256 and outputs differ from {what} ({recorded_sha[:12]}): max relative diff "
                         f"{difference:.3g} on the fingerprint probe, tolerance {tolerance:g}; expected the same weights")
    print(f"note: {graph}: bytes differ from {what} ({recorded_sha[:12]}) but its outputs on the fingerprint probe match "
          f"(max relative diff {difference:.2g} <= {tolerance:g}); using it", file=sys.stderr)


def add_fingerprints(extractor: dict | None, folders: list[Path]) -> dict | None:
    """A copy of a store's extractor record whose backbone and RoIAlign records carry a fingerprint:
    a record without one gets it from the graph of that name in `folders` whose sha256 is the recorded
    one (the very graph the features came from); records that cannot be matched are left as they are."""
    if not isinstance(extractor, dict):
        return extractor
    out = dict(extractor)
    for section in ("backbone", "objects"):
        record = out.get(section)
        if not isinstance(record, dict) or "fingerprint" in record or "graph" not in record:
            continue
        for folder in folders:
            graph = Path(folder) / record["graph"]
            manifest_path = graph.with_suffix(".json")
            if graph.is_file() and manifest_path.is_file() and file_sha256(graph) == record.get("graph_sha256"):
                import json

                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                out[section] = {**record, "fingerprint": graph_fingerprint(graph, {**record, **manifest})}
                break
    return out
