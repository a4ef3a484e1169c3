"""Precision: fp16 and int8 (and bf16 where native) scores against fp32 — max |diff|, top-10 overlap,
Kendall tau of the rankings, and R@K change on real data.

    python -m benchmarks.precision --preset flickr8k --images 4 --captions 256 --json OUT.json
    python -m benchmarks.precision --gallery-rows --artifact ART --store STORE --json OUT.json   # engine.serve --gallery-rows fp16
    from benchmarks.precision import kendall_tau, rank_agreement, random_weight_precision, artifact_precision
    rank_agreement(fp32_scores, int8_scores)    # rows = queries: {"max_abs_diff", "topk_overlap", "top_k", "kendall_tau", ...}

Two settings:
- random weights (always): the preset's model with random weights, `images` random images x
  `captions` random captions of Flickr8K test lengths; every image ranks the captions (i2t).
  R@K needs matching pairs, so it is not reported here.
- an artifact + a feature store (when both exist): the engine runtime (engine.runtime.Scorer) at
  fp32, fp16 and int8 on the first N test images and their captions; the metrics above per image
  row (i2t) and per caption column (t2i), and the R@K change of engine.metrics.retrieval_metrics.

Kendall tau is tau-a (ties count 0) in numpy, computed in blocks of rows so a 5,000-caption
ranking needs no 5,000 x 5,000 matrix; scipy is not a dependency.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_THREADS, machine_info, set_threads, time_calls, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

TOP_K = 10
TAU_BLOCK = 512  # rows of the sign matrix per step: 512 x N int8
TAU_QUERIES = 50  # at most this many query rows get a Kendall tau (each is O(N^2)); overlap uses every row


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a of two score vectors: (concordant - discordant) / (n (n - 1) / 2); 1 = same order."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    if n < 2:
        return 1.0
    total = 0
    for start in range(0, n, TAU_BLOCK):
        block = slice(start, min(start + TAU_BLOCK, n))
        sa = np.sign(a[block, None] - a[None, :]).astype(np.int8)  # [block, n]
        sb = np.sign(b[block, None] - b[None, :]).astype(np.int8)
        total += int((sa.astype(np.int32) * sb).sum())
    return float(total / (n * (n - 1)))  # every unordered pair was counted twice


def rank_agreement(reference: np.ndarray, other: np.ndarray, k: int = TOP_K, tau_queries: int = TAU_QUERIES) -> dict:
    """Rows are queries, columns the ranked items. Max |diff|, mean top-k overlap (fraction of the
    reference's top k that stay in the other's top k), mean and min Kendall tau over the first
    `tau_queries` rows."""
    reference, other = np.atleast_2d(reference), np.atleast_2d(other)
    k = min(k, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    top_other = np.argsort(-other, axis=1, kind="stable")[:, :k]
    overlap = [len(np.intersect1d(r, o)) / k for r, o in zip(top_ref, top_other)]
    taus = [kendall_tau(r, o) for r, o in zip(reference[:tau_queries], other[:tau_queries])]
    return {"max_abs_diff": float(np.abs(reference.astype(np.float64) - other).max()),
            "topk_overlap": float(np.mean(overlap)), "top_k": k,
            "kendall_tau": float(np.mean(taus)), "kendall_tau_min": float(np.min(taus)), "tau_queries": len(taus)}


def random_weight_precision(preset_name: str, lengths: np.ndarray, images: int, peaks_report: dict, work: Path,
                            threads: int = DEFAULT_THREADS, seed: int = 0) -> dict:
    """fp16 / int8 (/ bf16 where native) vs ORT fp32 of a random-weight model: `images` images x
    len(lengths) captions, each image a query ranking every caption. Also pairs/s of each (bucketed)."""
    from benchmarks.pair_scoring import usable_scorers
    from benchmarks.scorers import export_graphs, make_scorer, random_inputs, random_model

    set_threads(threads)
    model = random_model(preset_name, seed)
    route = "gates" if model.w2r.pair_gathers_gates else "regions"
    names, skipped = usable_scorers(("ort-fp32", "ort-fp16", "ort-int8-recurrence", "ort-int8-projection", "torch-bf16"),
                                    peaks_report, route)
    graphs = export_graphs(model, work / f"precision-{preset_name}", tuple(n[4:] for n in names if n.startswith("ort-")))
    order = np.argsort(lengths, kind="stable")
    blocks = [order[i:i + 256] for i in range(0, len(order), 256)]  # length buckets, as the engine scores
    scores, rates = {}, {}
    for name in names:
        scorer = make_scorer(name, model, graphs, threads)
        matrix = np.empty((images, len(lengths)), np.float32)
        seconds = 0.0
        for image in range(images):
            scorer.prepare(random_inputs(model.config, lengths, seed=seed + 7 * image))  # same captions, image `image`
            row = matrix[image]

            def run_pass() -> None:
                for rows in blocks:
                    row[rows] = scorer.score(rows)

            seconds += time_calls(run_pass, repeats=1, warmup=0, min_calls=1)["median_s"]
        scores[name], rates[name] = matrix, images * len(lengths) / seconds
    reference = scores["ort-fp32"]
    return {"preset": preset_name, "weights": f"random (seed {seed})", "images": images, "captions": int(len(lengths)),
            "skipped": skipped, "reference": "ort-fp32",
            "variants": {name: {"pairs_per_s": rates[name], **rank_agreement(reference, scores[name])}
                         for name in names if name != "ort-fp32"},
            "fp32_pairs_per_s": rates["ort-fp32"]}


def artifact_precision(artifact_dir: Path, store_root: Path, images: int, threads: int = DEFAULT_THREADS,
                       progress: bool = True, split_name: str = "test") -> dict:
    """fp16 and int8 vs fp32 through the engine runtime on the first `images` test images of a store
    and their captions: agreement per image row (i2t) and per caption column (t2i), R@K change."""
    from engine.metrics import retrieval_metrics
    from engine.runtime import Scorer
    from engine.store import FeatureStore
    from training.evaluate import captions_per_image_of

    split = FeatureStore(store_root).split(split_name)
    cpi = captions_per_image_of(split)
    n_img = min(images, split.num_images)
    out = {"artifact": str(artifact_dir), "store": str(store_root), "split": split_name, "images": n_img,
           "captions": n_img * cpi, "precisions": {}}
    matrices, metrics = {}, {}
    for precision in ("fp32", "fp16", "int8"):
        with Scorer.load(artifact_dir, backend="onnxruntime-cpu", precision=precision, threads=threads) as scorer:
            out["model_config"] = scorer.artifact.manifest["model"]["config"]
            out["int8_scope"] = scorer.artifact.manifest.get("int8_scope")
            if precision not in scorer.artifact.manifest.get("precisions", []):
                out["precisions"][precision] = {"skipped": f"the artifact has no {precision} graphs"}
                continue
            image_cache = scorer.encode_image_features(split.regions[:n_img], split.objects[:n_img])
            word_set = scorer.artifact.manifest.get("word_features", {}).get("name", "glove50")
            caption_cache = scorer.encode_word_features(split.words(word_set)[:n_img * cpi], split.lengths[:n_img * cpi])
            start = time.perf_counter()
            matrices[precision] = scorer.score_matrix(image_cache, caption_cache, progress=progress)
            seconds = time.perf_counter() - start
        metrics[precision] = retrieval_metrics(matrices[precision], cpi)
        out["precisions"][precision] = {"score_seconds": seconds, "metrics": metrics[precision]}
    for precision in ("fp16", "int8"):
        if precision not in matrices or "fp32" not in matrices:
            continue
        change = {side: {k: metrics[precision][side][k] - metrics["fp32"][side][k] for k in ("r1", "r5", "r10")}
                  for side in ("i2t", "t2i")}
        change["rsum"] = metrics[precision]["rsum"] - metrics["fp32"]["rsum"]
        out["precisions"][precision].update({
            "i2t": rank_agreement(matrices["fp32"], matrices[precision]),
            "t2i": rank_agreement(matrices["fp32"].T, matrices[precision].T),
            "recall_change": change})
    return out


def gallery_rows_precision(artifact_dir: Path, store_root: Path, split_name: str = "test", shortlist_k: int = 100,
                           threads: int = DEFAULT_THREADS) -> dict:
    """engine.serve --gallery-rows fp16 against fp32 rows, through THE ranking protocol (engine.ranking.two_stage_metrics,
    as engine.score --evaluate: the dual encoder's top shortlist_k per query, re-ranked by the product score), with the
    image rows the W2R kernel reads (engine.serve.state.HALF_ROWS) as encoded and rounded to fp16. The metrics of
    each, and the largest change of a re-ranked pair's BSSAN score (both runs re-rank the same pairs)."""
    from engine.cache import ImageCache
    from engine.errors import InputError
    from engine.ranking import two_stage_metrics
    from engine.runtime import Scorer
    from engine.score import evaluation_order
    from engine.serve.state import HALF_ROWS, gallery_row_dtypes
    from engine.store import FeatureStore

    split = FeatureStore(store_root).split(split_name)
    with Scorer.load(artifact_dir, backend="onnxruntime-cpu", threads=threads, spinning=False, path="kernel") as scorer:
        try:
            gallery_row_dtypes("fp16", scorer)  # what engine.serve checks: the W2R kernel, over regions_values
        except InputError as exc:
            return {"skipped": str(exc)}
        images, captions = scorer.encode_images(split), scorer.encode_captions(split)
        order, _, per = evaluation_order(images.ids, captions.image_ids, captions.ids)
        first = scorer.first_stage(images, captions, np.arange(len(images)), order)  # [N_img, N_cap] in evaluation order
        half = ImageCache(images.ids, {k: v.astype(np.float16) if k in HALF_ROWS else v for k, v in images.arrays.items()},
                          images.fingerprint, images.precision)
        out = {"artifact": str(artifact_dir), "split": split_name, "images": len(images), "captions": len(captions),
               "shortlist_k": shortlist_k, "rows": list(HALF_ROWS)}
        rescored: dict[str, list[np.ndarray]] = {}
        for name, cache in (("fp32", images), ("fp16", half)):
            calls = rescored.setdefault(name, [])

            def rescore(image_index: np.ndarray, text_index: np.ndarray, cache=cache, calls=calls) -> np.ndarray:
                pairs = np.stack([image_index, order[text_index]], axis=1)
                calls.append(scorer.score_pairs(cache, captions, pairs, fuse=False))
                return calls[-1].astype(np.float64)

            start = time.perf_counter()
            metrics = two_stage_metrics(first, rescore, shortlist_k, per, scorer.fusion)
            out[name] = {"metrics": metrics, "seconds": round(time.perf_counter() - start, 1),
                         "row_bytes": int(sum(v.nbytes for k, v in cache.arrays.items() if k in HALF_ROWS))}
    out["max_abs_bssan_diff"] = float(max(np.abs(a - b).max() for a, b in zip(rescored["fp32"], rescored["fp16"])))
    out["rsum_change"] = out["fp16"]["metrics"]["rsum"] - out["fp32"]["metrics"]["rsum"]
    return out


@command
def main(argv: list[str] | None = None) -> int:
    from benchmarks.end_to_end import flickr8k_test_lengths
    from benchmarks.peak import measure_peaks
    from training.config import PRESETS, preset

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the legacy exporter's C++ shape-inference warnings
    parser = ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flickr8k")
    parser.add_argument("--images", type=positive_int, default=4)
    parser.add_argument("--captions", type=positive_int, default=256)
    parser.add_argument("--artifact", type=Path, default=None, help="also compare an artifact's precisions on --store")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--split", default="test", help="store split of the artifact comparison")
    parser.add_argument("--artifact-images", type=positive_int, default=100, help="images (and their captions) of the artifact comparison")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS)
    parser.add_argument("--gallery-rows", action="store_true", help="only engine.serve --gallery-rows fp16 vs fp32 rows on "
                        "--artifact / --store, through the ranking protocol at K=--shortlist-k")
    parser.add_argument("--shortlist-k", type=positive_int, default=100)
    parser.add_argument("--json", type=output_file, required=True)
    args = parser.parse_args(argv)
    if args.gallery_rows:
        if args.artifact is None or args.store is None:
            print("error: --gallery-rows needs --artifact and --store", file=sys.stderr)
            return 2
        report = {"machine": machine_info(args.threads),
                  "gallery_rows": gallery_rows_precision(args.artifact, args.store, args.split, args.shortlist_k, args.threads)}
        rows = report["gallery_rows"]
        if "skipped" in rows:
            print(f"gallery rows: skipped ({rows['skipped']})")
        else:
            for name in ("fp32", "fp16"):
                m = rows[name]["metrics"]
                print(f"gallery rows {name} on {args.split} at K={args.shortlist_k}: i2t {m['i2t']}, t2i {m['t2i']}, rsum {m['rsum']:.2f}")
            print(f"rsum change {rows['rsum_change']:+.2f}, largest BSSAN score change {rows['max_abs_bssan_diff']:.2e}")
        write_json_atomic(args.json, report)
        return 0
    if args.images < 1 or args.captions < 2:
        print("error: --images must be >= 1 and --captions >= 2", file=sys.stderr)
        return 2
    lengths, source = flickr8k_test_lengths(args.captions, preset(args.preset).max_words)
    peaks = measure_peaks((preset(args.preset).w2r_hidden,), 256, args.threads, square=False)
    with tempfile.TemporaryDirectory(prefix="bssan-precision-") as work:
        report = {"machine": machine_info(args.threads), "lengths_source": source,
                  "random_weights": random_weight_precision(args.preset, lengths, args.images, peaks, Path(work), args.threads)}
    if args.artifact is not None and args.store is not None:
        report["artifact"] = artifact_precision(args.artifact, args.store, args.artifact_images, args.threads,
                                                split_name=args.split)
        for name, row in report["artifact"]["precisions"].items():
            if "recall_change" in row:
                change = row["recall_change"]
                print(f"{name} vs fp32 on {args.split} ({report['artifact']['images']} images): R@1 change i2t "
                      f"{change['i2t']['r1']:+.2f} t2i {change['t2i']['r1']:+.2f}, rsum {change['rsum']:+.2f}; i2t Kendall tau "
                      f"{row['i2t']['kendall_tau']:.4f}, top-10 overlap {row['i2t']['topk_overlap']:.3f}")
    for name, row in report["random_weights"]["variants"].items():
        print(f"{name:<22} max|diff| {row['max_abs_diff']:.3g}  top-{row['top_k']} overlap {row['topk_overlap']:.3f}  "
              f"Kendall tau {row['kendall_tau']:.4f}  {row['pairs_per_s']:.0f} pairs/s")
    write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
