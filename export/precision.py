"""fp16 and int8 variants of the exported graphs, and the measurements that choose them.

    from export.precision import quantize_pair_graph, compare_scores, pair_throughput
    quantize_pair_graph(Path("w2r_pair.fp32.onnx"), Path("w2r_pair.int8.onnx"), scope="recurrence")
    python -m export.precision --preset flickr8k --preset paper --out build/precision.json   # CPU figures

fp16: every graph is traced again from its torch module in float16 (export/graphs.py), with
the recurrence (W2R's LSTM recurrence, O2W's Bi-LSTM, the shortlist GRUs) either in float16
too or kept in float32 with casts at its edges. `choose_fp16` exports both, measures the
pipeline's max |score diff| against the fp32 model and keeps the recurrence in fp16 only
when that costs at most FP16_RECURRENCE_SLACK over the fp32-recurrence variant. TensorRT 11
has no FP16 builder flag (networks are strongly typed), so these graphs are what it builds from.
ONNX Runtime CPU runs fp16 graphs by inserting casts to fp32 around each node, so CPU figures
measure fp16 storage between nodes, not fp16 arithmetic; the GPU figures need a GPU.

int8: ONNX Runtime dynamic quantization (QInt8 weights, activations quantized per call) of the
pair scorers for the CPU. ARCHITECTURE.md measured that quantizing only the recurrence MatMul
keeps Kendall tau ~0.998 while quantizing every MatMul (the MLPs) drops it to ~0.95; `scope`
selects which weight MatMuls are quantized: "recurrence" (h W_hh^T inside the Loop),
"projection" (that plus W2R's W_ih_u^T projection in the paper preset's regions mode) or "all".
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from engine.cli import ArgumentParser, command, output_file, positive_int
from engine.errors import InputError
from engine.graphs import FLOAT_DTYPE, GRAPHS

INT8_SCOPES = ("recurrence", "projection", "all")
DEFAULT_INT8_SCOPE = "recurrence"  # see the module docstring; re-measured by `python -m export.precision`
# fp16 with the recurrence in fp16 is kept when its max |score diff| vs fp32 is at most this many
# times the fp32-recurrence variant's (the recurrence's 30 steps compound rounding; the GEMMs do not).
FP16_RECURRENCE_SLACK = 2.0
BENCH_CAPTIONS = 256  # captions per image in a pair call: ARCHITECTURE.md's speed protocol
BENCH_THREADS = 2
BENCH_REPEATS = 5
TOP_K = 10


# ---------------------------------------------------------------------------------------------
# int8


def _weight_matmuls(graph, initializers: set[str], inside_loop: bool) -> list[tuple[str, str, bool]]:
    """(node name, weight name, inside a Loop body) of every MatMul whose B input is an initializer,
    subgraphs included (Loop bodies: the recurrence; If branches: W2R's one-image/many-image paths)."""
    found = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            found.append((node.name, node.input[1], inside_loop))
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                found += _weight_matmuls(attribute.g, initializers | {i.name for i in attribute.g.initializer},
                                         inside_loop or node.op_type == "Loop")
    return found


def int8_nodes(model, scope: str) -> list[str]:
    """Names of the MatMul nodes that `scope` quantizes."""
    if scope not in INT8_SCOPES:
        raise InputError(f"int8 scope {scope!r}: expected one of {list(INT8_SCOPES)}")
    matmuls = _weight_matmuls(model.graph, {i.name for i in model.graph.initializer}, False)
    if scope == "all":
        return [name for name, _, _ in matmuls]
    chosen = [name for name, _, in_loop in matmuls if in_loop]
    if scope == "projection":
        chosen += [name for name, weight, _ in matmuls if weight == "input_weight_u_t"]
    return chosen


def quantize_pair_graph(source: Path, target: Path, scope: str = DEFAULT_INT8_SCOPE, per_channel: bool = False) -> list[str]:
    """Write the dynamic-int8 (QInt8) variant of a pair graph; returns the quantized node names
    (empty: nothing in scope, and no file is written)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = int8_nodes(onnx.load(str(source)), scope)
    if not nodes:
        return []
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                     nodes_to_quantize=nodes, extra_options={"EnableSubgraph": True})
    tmp.replace(target)
    return nodes


# ---------------------------------------------------------------------------------------------
# Measurements


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a of two score vectors (ties count 0): 1 when the orders agree."""
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])  # [n, n]
    n = len(a)
    return float((da * db).sum() / (n * (n - 1))) if n > 1 else 1.0


def compare_scores(reference: np.ndarray, other: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """Score error of `other` vs `reference`, rows = queries: max |diff|, mean Kendall tau, mean top-k overlap."""
    reference, other = np.atleast_2d(reference), np.atleast_2d(other)
    k = min(k, reference.shape[1])
    taus = [kendall_tau(r, o) for r, o in zip(reference, other)]
    overlap = [len(set(np.argsort(-r)[:k]) & set(np.argsort(-o)[:k])) / k for r, o in zip(reference, other)]
    return {"max_abs_diff": float(np.abs(reference.astype(np.float64) - other).max()),
            "kendall_tau": float(np.mean(taus)), f"top{k}_overlap": float(np.mean(overlap))}


def pair_feeds(name: str, sessions: dict, dims: dict[str, int], captions: int, length: int, seed: int = 0,
               dtype=np.float32) -> dict[str, np.ndarray]:
    """Inputs of one image x `captions` captions of `length` words for a pair graph, its caches made
    by the branch's image and text graphs from random features."""
    rng = np.random.default_rng(seed)
    branch = GRAPHS[name].branch
    words = rng.standard_normal((captions, length, dims["word_dim"])).astype(dtype)
    lengths = np.full(captions, length, dtype=np.int64)
    if branch == "w2r":
        image = {"regions": rng.standard_normal((1, dims["region_count"], dims["region_dim"])).astype(dtype)}
    else:
        image = {"objects": rng.standard_normal((1, dims["object_count"], dims["object_dim"])).astype(dtype)}
    cache = dict(zip(GRAPHS[f"{branch}_image"].output_names, sessions[f"{branch}_image"].run(None, image)))
    text_spec = GRAPHS[f"{branch}_text"]
    text_feeds = {k: v for k, v in {"words": words, "lengths": lengths}.items() if k in text_spec.input_names}
    cache.update(zip(text_spec.output_names, sessions[f"{branch}_text"].run(None, text_feeds)))
    pairs = np.stack([np.zeros(captions, np.int64), np.arange(captions, dtype=np.int64)], axis=1)  # [captions, 2]
    available = {**cache, "words": words, "lengths": lengths, "pairs": pairs}
    return {n: available[n] for n in GRAPHS[name].input_names}


def pair_throughput(session, feeds: dict, repeats: int = BENCH_REPEATS) -> float:
    """Median pairs/s of `session` on `feeds` after one warm-up call."""
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return len(feeds["pairs"]) / float(np.median(times))


def measure_int8(preset_name: str, lengths: tuple[int, ...], work: Path, scopes: tuple[str, ...] = INT8_SCOPES,
                 threads: int = BENCH_THREADS, captions: int = BENCH_CAPTIONS, seed: int = 0) -> dict:
    """fp32 vs int8 pairs/s and score error of a random-weight model of `preset_name`, 1 image x
    `captions` captions per call, every pair graph, every scope."""
    import torch

    from export.graphs import build_graph_modules, graph_dims
    from export.onnx_export import export_graph
    from export.validate import open_session, torch_threads
    from training.config import preset
    from training.model import BSSAN

    torch.manual_seed(seed)
    model = BSSAN(preset(preset_name)).eval()
    dims = graph_dims(model)
    with torch_threads():
        paths = {n: export_graph(m, n, dims, work / f"{preset_name}/{n}.fp32.onnx", "fp32")
                 for n, m in build_graph_modules(model).items()}
    sessions = {n: open_session(p, threads) for n, p in paths.items()}
    report = {"preset": preset_name, "threads": threads, "captions_per_call": captions, "dims": dims,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_before": list(os.getloadavg()), "graphs": {}}
    for name in (n for n in paths if GRAPHS[n].stage == "pair"):
        report["graphs"][name] = {}
        for length in lengths:
            feeds = pair_feeds(name, sessions, dims, captions, length, seed=length)
            reference = sessions[name].run(None, feeds)[0]
            row = {"fp32_pairs_per_s": pair_throughput(sessions[name], feeds)}
            for scope in scopes:
                target = work / f"{preset_name}/{name}.int8-{scope}.onnx"
                nodes = quantize_pair_graph(paths[name], target, scope)
                if not nodes:
                    row[scope] = None
                    continue
                session = open_session(target, threads)
                row[scope] = {"quantized": len(nodes), "pairs_per_s": pair_throughput(session, feeds),
                              **compare_scores(reference[None], session.run(None, feeds)[0][None])}
            report["graphs"][name][f"L{length}"] = row
    report["load_average_after"] = list(os.getloadavg())  # other processes on the cores make pairs/s noisy
    return report


def artifact_scores(artifact, precision: str, regions, objects, words, lengths, threads: int = BENCH_THREADS,
                    caption_block: int = BENCH_CAPTIONS) -> np.ndarray:
    """MS [N_img, N_cap] through an artifact's ONNX graphs at `precision` (int8: the int8 pair graphs
    where present, fp32 elsewhere): captions encoded once, then one image row x a length-sorted
    caption block per pair call."""
    from export.validate import open_session

    def path(name):
        use = precision if artifact.has_graph(name, precision) else "fp32"
        return artifact.graph_path(name, use), use

    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    scores = np.zeros((len(regions), len(lengths)), dtype=np.float64)
    weights = artifact.score_weights
    for branch, image_input in (("w2r", "regions"), ("o2w", "objects")):
        if f"{branch}_pair" not in artifact.graph_names or not weights[branch]:
            continue
        sessions, dtypes = {}, {}
        for stage in ("image", "text", "pair"):
            graph_path, use = path(f"{branch}_{stage}")
            sessions[stage], dtypes[stage] = open_session(graph_path, threads), np.dtype(FLOAT_DTYPE[use])
        images = sessions["image"].run(None, {image_input: np.asarray(regions if branch == "w2r" else objects, dtypes["image"])})
        image_cache = dict(zip(GRAPHS[f"{branch}_image"].output_names, images))
        text_spec, pair_spec = GRAPHS[f"{branch}_text"], GRAPHS[f"{branch}_pair"]
        for start in range(0, len(order), caption_block):
            block = order[start:start + caption_block]
            longest = int(lengths[block].max())
            block_words = np.asarray(words[block], dtypes["text"])[:, :longest]  # [B_txt, L, E]
            feeds = {"words": block_words, "lengths": lengths[block]}
            text_cache = dict(zip(text_spec.output_names, sessions["text"].run(None, {k: v for k, v in feeds.items() if k in text_spec.input_names})))
            pairs = np.stack([np.zeros(len(block), np.int64), np.arange(len(block), dtype=np.int64)], axis=1)  # [B_txt, 2]
            for i in range(len(regions)):
                available = {**{k: v[i:i + 1].astype(dtypes["pair"]) for k, v in image_cache.items()},
                             **{k: v.astype(dtypes["pair"]) for k, v in text_cache.items()},
                             "words": block_words.astype(dtypes["pair"]), "lengths": lengths[block], "pairs": pairs}
                y = sessions["pair"].run(None, {n: available[n] for n in pair_spec.input_names})[0]
                scores[i, block] += weights[branch] * y
    return scores


def measure_recall(artifact_dir: Path, store: Path, word_set: str, images: int, precisions: tuple[str, ...],
                   threads: int = BENCH_THREADS) -> dict:
    """R@K of the first `images` test images (with all their captions) of a feature store, per precision,
    and each precision's score error against fp32 (Kendall tau per image row, top-10 overlap)."""
    from engine.artifact import load_artifact
    from engine.metrics import format_metrics, retrieval_metrics
    from engine.store import FeatureStore

    artifact = load_artifact(artifact_dir)
    split = FeatureStore(store).split("test")
    per_image = split.captions_per_image()
    if per_image is None:
        raise InputError(f"{store}: the test split has no fixed captions per image; expected Flickr8K-style 5 per image")
    n_cap = images * per_image
    regions = np.asarray(split.regions[:images], np.float32)
    objects = np.asarray(split.objects[:images], np.float32)
    words = np.asarray(split.words(word_set)[:n_cap], np.float32)
    lengths = np.asarray(split.lengths[:n_cap])
    report = {"images": images, "captions": n_cap, "word_set": word_set}
    scores = {}
    for precision in precisions:
        start = time.perf_counter()
        scores[precision] = artifact_scores(artifact, precision, regions, objects, words, lengths, threads)
        metrics = retrieval_metrics(scores[precision], per_image)
        report[precision] = {"metrics": metrics, "summary": format_metrics(metrics),
                             "pairs_per_s": images * n_cap / (time.perf_counter() - start)}
        if precision != "fp32" and "fp32" in scores:
            report[precision].update(compare_scores(scores["fp32"], scores[precision]))
    return report


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", choices=("demo", "flickr8k", "paper"), default=[],
                        help="int8 speed/error of a random-weight model of this preset (repeatable)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[12, 30])
    parser.add_argument("--threads", type=positive_int, default=BENCH_THREADS)
    parser.add_argument("--work", type=Path, help="directory for the measured graphs (with --preset)")
    parser.add_argument("--artifact", type=Path, help="with --store: R@K of this artifact per precision")
    parser.add_argument("--store", type=Path, help="feature store whose test split is scored (with --artifact)")
    parser.add_argument("--word-set", default="glove50")
    parser.add_argument("--images", type=positive_int, default=100, help="test images scored (with all their captions)")
    parser.add_argument("--out", type=output_file, required=True, help="JSON report (a PNG plot beside it for --preset)")
    args = parser.parse_args(argv)
    if not args.preset and not (args.artifact and args.store):
        parser.error("expected --preset (int8 speed) and/or --artifact with --store (R@K per precision)")
    if args.preset and args.work is None:
        parser.error("--preset needs --work")
    report = {name: measure_int8(name, tuple(args.lengths), args.work, threads=args.threads) for name in args.preset}
    payload = {"int8": report}
    if args.artifact:
        from engine.artifact import load_artifact

        payload["recall"] = measure_recall(args.artifact, args.store, args.word_set, args.images,
                                           tuple(load_artifact(args.artifact).precisions), args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    for preset_name, per_preset in report.items():
        for graph, rows in per_preset["graphs"].items():
            for length, row in rows.items():
                cells = [f"fp32 {row['fp32_pairs_per_s']:.0f}"] + [
                    f"int8[{scope}] {row[scope]['pairs_per_s']:.0f} (tau {row[scope]['kendall_tau']:.4f}, "
                    f"top{TOP_K} {row[scope][f'top{TOP_K}_overlap']:.2f})" for scope in INT8_SCOPES if row.get(scope)]
                print(f"{preset_name} {graph} {length}: pairs/s " + ", ".join(cells))
    for precision, row in payload.get("recall", {}).items():
        if precision in FLOAT_DTYPE:
            print(f"{precision}: {row['summary']} ({row['pairs_per_s']:.0f} pairs/s)")
    if report:
        plot_int8(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if report else ""))
    return 0


def plot_int8(report: dict, path: Path) -> None:
    """Bar chart of pairs/s per preset, pair graph and caption length: fp32 and each int8 scope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{p}\n{g}\n{length}", row) for p, per in report.items() for g, rows in per["graphs"].items()
            for length, row in rows.items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    variants = ["fp32", *INT8_SCOPES]
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        values = [row["fp32_pairs_per_s"] if variant == "fp32" else (row[variant] or {}).get("pairs_per_s", 0) for _, row in rows]
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=variant if variant == "fp32" else f"int8 {variant}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [label for label, _ in rows], fontsize=7)
    ax.set_ylabel("pairs / s (ONNX Runtime CPU)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("pair scorers, 1 image x captions per call, random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
