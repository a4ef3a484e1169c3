"""Parity of a built artifact, through the engine runtime: every precision it has against the
checkpoint it was exported from (training.model.reference_scores, the paper as written, fp32).

    python -m benchmarks.parity ARTIFACT_DIR --model MODEL_DIR [--images 3] [--captions 24]
    (ctest --test-dir build runs it on the CMake-built artifact)

Random features (seed fixed): `images` images x `captions` captions of lengths 1..max_words,
scored by engine.runtime.Scorer (ONNX Runtime CPU) at each precision of the manifest, and by
the un-factored torch model. Checks, each printed with its figure:
- fp32: max |score diff| <= PARITY_TOLERANCE (export/validate.py);
- fp16 and int8: each image's ranking of the captions agrees with the torch model's:
  mean Kendall tau >= RANK_TAU (a wrong graph gives ~0) and the top-1 caption is kept for most images.
Exit 0 when every check passes, 1 when one fails, 2 on a user error (missing directory...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from engine.cli import ArgumentParser, command, positive_int

RANK_TAU = 0.9  # fp16 / int8 rank agreement with fp32 (random weights); measured ~0.97-0.999 here


def check_artifact(artifact_dir: Path, model_dir: Path, images: int = 3, captions: int = 24, threads: int = 1) -> list[dict]:
    """One row {precision, max_abs_diff, kendall_tau, top1_kept, ok, rule} per precision of the artifact."""
    import torch

    from benchmarks.precision import rank_agreement
    from engine.runtime import Scorer
    from export.validate import PARITY_TOLERANCE, random_features
    from training.checkpoint import load_checkpoint
    from training.model import reference_scores

    model = load_checkpoint(model_dir).model.float().eval()
    regions, objects, words, lengths = random_features(model, images, captions, model.config.max_words, seed=3)
    grid = np.stack(np.meshgrid(np.arange(images), np.arange(captions), indexing="ij"), -1).reshape(-1, 2)  # [I*C, 2]
    t = torch.from_numpy
    with torch.no_grad():
        y, yp = reference_scores(model, t(regions[grid[:, 0]]), t(objects[grid[:, 0]]), t(words[grid[:, 1]]), t(lengths[grid[:, 1]]))
        want = model.combine(y, yp).numpy().reshape(images, captions)
    rows = []
    with Scorer.load(artifact_dir, backend="onnxruntime-cpu", precision="fp32", threads=threads) as probe:
        precisions = list(probe.artifact.manifest["precisions"])
    for precision in precisions:
        with Scorer.load(artifact_dir, backend="onnxruntime-cpu", precision=precision, threads=threads) as scorer:
            got = scorer.score_matrix(scorer.encode_image_features(regions, objects), scorer.encode_word_features(words, lengths))
        agreement = rank_agreement(want, got, k=1)
        if precision == "fp32":
            ok, rule = agreement["max_abs_diff"] <= PARITY_TOLERANCE, f"max |diff| <= {PARITY_TOLERANCE:g}"
        else:
            ok, rule = agreement["kendall_tau"] >= RANK_TAU, f"Kendall tau >= {RANK_TAU}"
        rows.append({"precision": precision, "max_abs_diff": agreement["max_abs_diff"], "kendall_tau": agreement["kendall_tau"],
                     "top1_kept": agreement["topk_overlap"], "ok": bool(ok), "rule": rule})
    return rows


@command
def main(argv: list[str] | None = None) -> int:

    parser = ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR", help="the checkpoint it was exported from")
    parser.add_argument("--images", type=positive_int, default=3)
    parser.add_argument("--captions", type=positive_int, default=24)
    args = parser.parse_args(argv)
    if args.images < 1 or args.captions < 2:
        print("error: --images must be >= 1 and --captions >= 2", file=sys.stderr)
        return 2
    rows = check_artifact(args.artifact, args.model, args.images, args.captions)
    for row in rows:
        print(f"[{'PASS' if row['ok'] else 'FAIL'}] {args.artifact} {row['precision']}: max |diff| {row['max_abs_diff']:.3g}, "
              f"Kendall tau {row['kendall_tau']:.4f}, top-1 kept {row['top1_kept']:.2f} (rule: {row['rule']})")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
