"""engine/assets.py: a feature graph is the one a model was trained with if its sha256 matches, or else
if its outputs on the fingerprint probe match (bytes differ across machines; measured)."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.assets import (
    FINGERPRINT_PROBE, FINGERPRINT_TOLERANCE, add_fingerprints, check_same_graph, fingerprint_difference, graph_fingerprint,
)
from engine.errors import AssetError
from engine.files import file_sha256

onnx = pytest.importorskip("onnx")


def _manifest(folder, stem):
    return json.loads((folder / f"{stem}.json").read_text())


def _rewrite(graph, target, change):
    model = onnx.load(str(graph))
    change(model)
    onnx.save(model, str(target))


def test_exported_assets_carry_their_fingerprint(backbone_assets):
    for stem in ("efficientnet-lite0-7x7", "roi_align"):
        manifest = _manifest(backbone_assets, stem)
        recorded = manifest["fingerprint"]
        assert recorded["probe"] == FINGERPRINT_PROBE and recorded["tolerance"] == FINGERPRINT_TOLERANCE
        assert fingerprint_difference(recorded, graph_fingerprint(backbone_assets / manifest["graph"], manifest)) == 0.0


def test_other_bytes_same_outputs_are_accepted_with_a_note(backbone_assets, tmp_path, capsys):
    manifest = _manifest(backbone_assets, "efficientnet-lite0-7x7")
    record = {k: manifest[k] for k in ("graph", "graph_sha256", "fingerprint")}
    other = tmp_path / manifest["graph"]
    _rewrite(backbone_assets / manifest["graph"], other, lambda m: setattr(m, "doc_string", "exported on another machine"))
    assert file_sha256(other) != record["graph_sha256"]
    check_same_graph(record, other, manifest, "the backbone the model was trained with")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bytes differ from the backbone the model was trained with" in err and "using it" in err
    check_same_graph(record, backbone_assets / manifest["graph"], manifest, "the backbone")  # same bytes: silent
    assert capsys.readouterr().err == ""
    with pytest.raises(AssetError, match=r"whose record has no fingerprint"):
        check_same_graph({k: v for k, v in record.items() if k != "fingerprint"}, other, manifest, "the backbone")


def test_other_outputs_are_refused(backbone_assets, tmp_path):
    manifest = _manifest(backbone_assets, "roi_align")
    record = {k: manifest[k] for k in ("graph", "graph_sha256", "fingerprint")}

    def other_mode(model):
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "mode":
                    attribute.s = b"max"

    _rewrite(backbone_assets / "roi_align.onnx", tmp_path / "roi_align.onnx", other_mode)
    with pytest.raises(AssetError, match=r"roi_align.onnx: sha256 and outputs differ from the RoIAlign graph \([0-9a-f]{12}\): "
                                         r"max relative diff .* tolerance 0.0001; expected the same weights"):
        check_same_graph(record, tmp_path / "roi_align.onnx", manifest, "the RoIAlign graph")


def test_records_that_predate_fingerprints_are_filled_from_the_same_graph(backbone_assets, tmp_path):
    manifest = _manifest(backbone_assets, "efficientnet-lite0-7x7")
    old = {"name": "engine.features", "backbone": {k: v for k, v in manifest.items() if k != "fingerprint"}}
    filled = add_fingerprints(old, [tmp_path, backbone_assets])
    assert filled["backbone"]["fingerprint"] == manifest["fingerprint"] and "fingerprint" not in old["backbone"]
    shutil.copy(backbone_assets / manifest["graph"], tmp_path / "x.onnx")
    wrong_sha = {"backbone": {**old["backbone"], "graph_sha256": "0" * 64}}
    assert "fingerprint" not in add_fingerprints(wrong_sha, [backbone_assets])["backbone"]  # not the graph it names


def test_artifact_records_the_fingerprint_of_its_features(image_artifact):
    from engine.artifact import load_artifact

    backbone = load_artifact(image_artifact).manifest["preprocessing"]["backbone"]
    assert backbone["fingerprint"]["probe"] == FINGERPRINT_PROBE and len(backbone["fingerprint"]["values"]) == 256
