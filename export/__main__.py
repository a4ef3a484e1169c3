"""Export a trained BSSAN checkpoint as a deployable artifact directory (ONNX graphs + manifest.json).

    python -m export MODEL_DIR --out ARTIFACT_DIR [--precision fp32 fp16 int8] [--shortlist SHORTLIST_DIR]
                     [--tensorrt auto|off|on] [--assets build/assets] [--store STORE]

MODEL_DIR is a BSSAN checkpoint (training.checkpoint); SHORTLIST_DIR a dual-encoder checkpoint
whose encoders become the shortlist graphs. See export/pipeline.py for the steps and
engine/artifact.py for the layout. User errors print one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.cli import ArgumentParser, command
from engine.graphs import PRECISIONS
from engine.text import DEFAULT_ASSETS_DIR
from export.precision import DEFAULT_INT8_SCOPE, INT8_SCOPES


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="BSSAN checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory (replaced atomically if it is one)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="fp32 is always exported; fp16 and int8 are added variants")
    parser.add_argument("--shortlist", type=Path, default=None, metavar="SHORTLIST_DIR", help="dual-encoder checkpoint")
    parser.add_argument("--tensorrt", choices=("auto", "off", "on"), default="auto",
                        help="build TensorRT plans: on = required, auto = when TensorRT and a GPU are present")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS_DIR, help="feature backbones to copy into the artifact")
    parser.add_argument("--store", type=Path, default=None, help="feature store for the real-feature parity case "
                        "(default: the checkpoint's, when present)")
    parser.add_argument("--int8-scope", choices=INT8_SCOPES, default=DEFAULT_INT8_SCOPE, help="which weight MatMuls int8 quantizes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from export.pipeline import ExportOptions, export_artifact  # torch loads here, after argument errors

    precisions = tuple(dict.fromkeys(["fp32", *args.precision]))
    manifest = export_artifact(ExportOptions(
        model_dir=args.model_dir, out=args.out, precisions=precisions, shortlist_dir=args.shortlist,
        tensorrt=args.tensorrt, assets_dir=args.assets, store=args.store, int8_scope=args.int8_scope,
        progress=not args.no_progress))
    worst = manifest["parity_max_abs_diff"]["fp32"]
    print(f"{args.out}: {sum(len(v) for v in manifest['graphs'].values())} graphs ({', '.join(manifest['precisions'])}); "
          f"fp32 parity max |diff| {max(worst.values()):.3g}; TensorRT: {manifest['tensorrt']['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
