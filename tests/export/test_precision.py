"""export/precision.py: which MatMuls int8 quantizes, the quantized graph's scores, the ranking
measures, and the fp16 decisions recorded in the demo artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch (pip install 'bssan-engine[export]')")
onnx = pytest.importorskip("onnx", reason="export needs onnx (the export extra)")

from engine.errors import InputError  # noqa: E402
from engine.artifact import load_artifact  # noqa: E402
from export.precision import (  # noqa: E402
    compare_scores, int8_nodes, kendall_tau, pair_feeds, pair_throughput, quantize_pair_graph,
)
from export.validate import open_session  # noqa: E402


def _ops(graph, inside=False):
    """(op_type, inside a subgraph) of every node, subgraphs included."""
    out = []
    for node in graph.node:
        out.append((node.op_type, inside))
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                out += _ops(attribute.g, True)
    return out


def test_scopes_select_the_recurrence_then_more(demo_artifact):
    artifact = load_artifact(demo_artifact)
    w2r = onnx.load(str(artifact.graph_path("w2r_pair")))
    o2w = onnx.load(str(artifact.graph_path("o2w_pair")))
    recurrence, projection, everything = (int8_nodes(w2r, s) for s in ("recurrence", "projection", "all"))
    assert len(recurrence) == 1  # h W_hh^T inside the Loop, nothing else
    assert set(recurrence) < set(projection) < set(everything)  # + W_ih_u^T (both If branches), + the MLP
    assert int8_nodes(o2w, "recurrence") == [] and len(int8_nodes(o2w, "all")) >= 2
    with pytest.raises(InputError, match=r"int8 scope 'mlp': expected one of \['recurrence', 'projection', 'all'\]"):
        int8_nodes(w2r, "mlp")


def test_quantized_recurrence_scores_close_to_fp32(demo_artifact, tmp_path):
    artifact = load_artifact(demo_artifact)
    target = tmp_path / "w2r_pair.int8.onnx"
    nodes = quantize_pair_graph(artifact.graph_path("w2r_pair"), target, "recurrence")
    assert len(nodes) == 1
    ops = _ops(onnx.load(str(target)).graph)
    assert ("MatMulInteger", True) in ops or ("DynamicQuantizeMatMul", True) in ops  # inside the Loop body
    assert ("MatMulInteger", False) not in ops and ("DynamicQuantizeMatMul", False) not in ops
    sessions = {n: open_session(artifact.graph_path(n)) for n in ("w2r_image", "w2r_text", "w2r_pair")}
    feeds = pair_feeds("w2r_pair", sessions, artifact.dims, captions=32, length=12)
    reference = sessions["w2r_pair"].run(None, feeds)[0]
    quantized = open_session(target).run(None, feeds)[0]
    figures = compare_scores(reference[None], quantized[None])
    assert 0 < figures["max_abs_diff"] < 0.05 and figures["kendall_tau"] > 0.9
    assert pair_throughput(open_session(target), feeds, repeats=1) > 0
    assert quantize_pair_graph(artifact.graph_path("o2w_pair"), tmp_path / "o2w.onnx", "recurrence") == []
    assert not (tmp_path / "o2w.onnx").exists()


def test_ranking_measures():
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert kendall_tau(a, a) == 1.0 and kendall_tau(a, -a) == -1.0
    assert kendall_tau(a, np.array([0.1, 0.3, 0.5, 0.9])) == pytest.approx(4 / 6)  # one discordant pair of 6
    scores = np.arange(20.0)
    figures = compare_scores(scores, scores[::-1].copy(), k=10)
    assert figures["top10_overlap"] == 0.0 and figures["kendall_tau"] == -1.0 and figures["max_abs_diff"] == 19.0


def test_fp16_decisions_recorded(demo_artifact):
    artifact = load_artifact(demo_artifact)
    report = json.loads((artifact.root / "validation.json").read_text())["fp16"]
    for name, decision in report["decisions"].items():
        assert decision["recurrence"] in ("fp16", "fp32")
        assert artifact.manifest["fp16_recurrence"][name] == decision["recurrence"]
        assert 0 < decision["max_abs_diff_recurrence_fp32"] < 1e-2 and 0 < decision["max_abs_diff_recurrence_fp16"] < 1e-2
    assert set(report["decisions"]) == {"w2r_pair", "o2w_text", "shortlist_text"}


def test_recall_per_precision_matches_torch(demo_artifact, tiny_store):
    """The artifact's fp32 ONNX pipeline ranks the store's test split exactly as the torch model's
    score_matrix does; fp16/int8 report their R@K and score error against fp32."""
    from engine.metrics import retrieval_metrics
    from engine.store import FeatureStore
    from export.precision import artifact_scores, measure_recall
    from export.validate import torch_threads
    from training.checkpoint import load_checkpoint

    report = measure_recall(demo_artifact, tiny_store, "glove50", images=6, precisions=("fp32", "fp16", "int8"))
    assert report["captions"] == 30 and {"fp32", "fp16", "int8"} <= set(report)
    assert report["int8"]["kendall_tau"] > 0.9 and report["fp16"]["kendall_tau"] > 0.9
    split = FeatureStore(tiny_store).split("test")
    model = load_checkpoint(demo_artifact.parent / "bssan").model
    words, lengths = np.asarray(split.words("glove50")[:30], np.float32), np.asarray(split.lengths[:30])
    regions, objects = np.asarray(split.regions[:6], np.float32), np.asarray(split.objects[:6], np.float32)
    with torch_threads():
        expected = model.score_matrix(regions, objects, words, lengths).numpy()
    got = artifact_scores(load_artifact(demo_artifact), "fp32", regions, objects, words, lengths, caption_block=7)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert report["fp32"]["metrics"] == retrieval_metrics(got, 5)
