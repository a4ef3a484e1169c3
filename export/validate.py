"""Parity of exported graphs: each graph against its torch module, and the composed ONNX pipeline
(image graph + text graph + pair graph) against the un-factored model (training.model.reference_scores).

    from export.validate import validate_bssan
    report = validate_bssan(model, paths, dims)   # ArtifactError listing every max |diff| on failure

Cases: random inputs at batch 1 and PARITY_BATCH and caption lengths PARITY_LENGTHS (capped at
max_words), plus real features when a feature store is given. A pair call scores every image x
caption of its case in a shuffled order, so the pair index, the gathers and the buckets are
all exercised. Every figure is a max |diff| per output; the report keeps them all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.backends.onnxruntime import open_session as engine_open_session
from engine.errors import ArtifactError
from engine.graphs import GRAPHS, SHORTLIST_GRAPHS
from export.onnx_export import example_inputs
from training.model import BSSAN, reference_scores

# fp32 scores of the ONNX pipeline vs the un-factored torch model: the factoring reorders sums
# (R W^T before the bilinear form, split LSTM input weights, folded BatchNorm), which moves fp32
# scores by ~1e-6; a wrong graph moves them by O(0.1).
PARITY_TOLERANCE = 1e-4
# Cache outputs (regions_attn, gates_words, states, ...) are compared relative to max(1, max |value|).
PARITY_LENGTHS = (1, 5, 30)
PARITY_BATCH = 4
PARITY_THREADS = 1


@contextlib.contextmanager
def torch_threads(threads: int = PARITY_THREADS):
    """torch's intra-op threads set for a block, then restored. The parity models are small:
    one thread is 10-100x faster than two on a loaded 2-core machine (OpenMP waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def open_session(path: Path, threads: int = PARITY_THREADS):
    """ONNX Runtime CPU session of one graph, as the engine opens it (engine.backends.onnxruntime.open_session)."""
    return engine_open_session(path, "onnxruntime-cpu", threads)


def _max_diff(got: np.ndarray, want: np.ndarray, relative: bool) -> float:
    if got.shape != want.shape:
        raise ArtifactError(f"parity: output shape {list(got.shape)}, expected {list(want.shape)}")
    if got.size == 0:
        return 0.0
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    return diff / max(1.0, float(np.abs(want).max())) if relative else diff


def cases(max_words: int, batch: int = PARITY_BATCH, lengths: tuple[int, ...] = PARITY_LENGTHS) -> list[tuple[int, int]]:
    """(batch, caption length) of every parity case; lengths above max_words are capped."""
    capped = sorted({min(n, max_words) for n in lengths})
    return [(b, n) for b in sorted({1, batch}) for n in capped]


def graph_parity(name: str, module: nn.Module, session, dims: dict[str, int], precision: str,
                 batch: int, length: int, seed: int = 0) -> dict[str, float]:
    """{output: max |onnx - torch|} of one graph on random inputs (relative for caches, absolute for scores)."""
    spec = GRAPHS[name]
    feeds = example_inputs(spec, dims, precision, {"images": batch, "captions": batch, "pairs": batch * batch,
                                                    "words": length}, seed=seed)
    got = session.run(spec.output_names, feeds)
    with torch.no_grad():
        want = module(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
    want = want if isinstance(want, tuple) else (want,)
    return {t.name: _max_diff(g, w.float().numpy(), relative=t.name not in ("scores",))
            for t, g, w in zip(spec.outputs, got, want)}


def random_features(model: BSSAN, images: int, captions: int, length: int, seed: int = 0):
    """regions, objects, words (zero past each length), lengths: random, with one caption of `length` words."""
    c, rng = model.config, np.random.default_rng(seed)
    regions = rng.standard_normal((images, c.region_count, c.region_dim)).astype(np.float32)
    objects = rng.standard_normal((images, c.object_count, c.object_dim)).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=captions)
    lengths[0] = length
    words = rng.standard_normal((captions, length, c.word_dim)).astype(np.float32)
    words[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
    return regions, objects, words, lengths.astype(np.int64)


def store_features(store_root: str | Path, word_set: str, images: int, captions_per_image: int = 2, split: str = "test"):
    """The first `images` images of a feature store's split and `captions_per_image` of each one's captions, fp32."""
    from engine.store import FeatureStore

    features = FeatureStore(store_root).split(split)
    caption_image = np.asarray(features.caption_image)
    chosen = np.concatenate([np.nonzero(caption_image == i)[0][:captions_per_image] for i in range(images)])
    lengths = np.asarray(features.lengths)[chosen].astype(np.int64)
    words = np.asarray(features.words(word_set)[chosen])[:, : int(lengths.max())].astype(np.float32)
    return (np.asarray(features.regions[:images], dtype=np.float32), np.asarray(features.objects[:images], dtype=np.float32),
            words, lengths)


def onnx_pipeline(sessions: dict, regions, objects, words, lengths, pairs, dtype=np.float32) -> dict[str, np.ndarray]:
    """{"w2r", "o2w"} scores [N] of `pairs` through the ONNX graphs: encode images and captions once, then pair."""
    out = {}
    for branch, image_input in (("w2r", {"regions": regions}), ("o2w", {"objects": objects})):
        if f"{branch}_pair" not in sessions:
            continue
        image_cache = dict(zip(GRAPHS[f"{branch}_image"].output_names,
                               sessions[f"{branch}_image"].run(None, {k: v.astype(dtype) for k, v in image_input.items()})))
        text_feeds = {"words": words.astype(dtype), "lengths": lengths}
        text_feeds = {k: v for k, v in text_feeds.items() if k in GRAPHS[f"{branch}_text"].input_names}
        text_cache = dict(zip(GRAPHS[f"{branch}_text"].output_names, sessions[f"{branch}_text"].run(None, text_feeds)))
        available = {**image_cache, **text_cache, "words": words.astype(dtype), "lengths": lengths, "pairs": pairs}
        spec = GRAPHS[f"{branch}_pair"]
        out[branch] = sessions[f"{branch}_pair"].run(None, {n: available[n] for n in spec.input_names})[0]
    return out


def shuffled_grid(images: int, captions: int, seed: int = 0) -> np.ndarray:
    """pairs [images * captions, 2]: every image row x caption row, in a random order."""
    grid = np.stack(np.meshgrid(np.arange(images), np.arange(captions), indexing="ij"), axis=-1).reshape(-1, 2)  # [B_img*B_txt, 2]
    return grid[np.random.default_rng(seed).permutation(len(grid))].astype(np.int64)


def pipeline_parity(model: BSSAN, sessions: dict, features, seed: int = 0, dtype=np.float32) -> dict[str, float]:
    """{"w2r", "o2w", "ms"}: max |ONNX pipeline - reference_scores| over a shuffled grid of the features."""
    regions, objects, words, lengths = features
    pairs = shuffled_grid(len(regions), len(lengths), seed)
    got = onnx_pipeline(sessions, regions, objects, words, lengths, pairs, dtype)
    t = torch.from_numpy
    with torch.no_grad():
        y, yp = reference_scores(model, t(regions[pairs[:, 0]]), t(objects[pairs[:, 0]]), t(words[pairs[:, 1]]),
                                 t(lengths[pairs[:, 1]]))
    want = {"w2r": y.numpy(), "o2w": yp.numpy()}
    report = {k: _max_diff(v, want[k], relative=False) for k, v in got.items()}
    w_y, w_yp = model.scoring_weights
    ms = w_y * got.get("w2r", 0.0) + w_yp * got.get("o2w", 0.0)
    report["ms"] = _max_diff(np.asarray(ms, dtype=np.float32), model.combine(y, yp).numpy(), relative=False)
    return report


def validate_bssan(model: BSSAN, modules: dict[str, nn.Module], paths: dict[str, Path], dims: dict[str, int],
                   precision: str = "fp32", tolerance: float | None = PARITY_TOLERANCE, store: dict | None = None,
                   shortlist: nn.Module | None = None) -> dict:
    """Parity report {"graphs": {name: {case: {output: diff}}}, "pipeline": {case: {...}}, "worst": {...}}.
    `store` = {"root", "word_set"} adds a "real" pipeline case. With a tolerance, any figure above it
    raises ArtifactError naming every output's max |diff|; tolerance None only measures."""
    with torch_threads():
        return _validate_bssan(model, modules, paths, dims, precision, tolerance, store, shortlist)


def _validate_bssan(model, modules, paths, dims, precision, tolerance, store, shortlist) -> dict:
    sessions = {name: open_session(path) for name, path in paths.items()}
    report: dict = {"precision": precision, "tolerance": tolerance, "graphs": {}, "pipeline": {}}
    dtype = np.float16 if precision == "fp16" else np.float32
    for name, module in modules.items():
        report["graphs"][name] = {f"batch{b}_len{n}": graph_parity(name, module, sessions[name], dims, precision, b, n, seed=n)
                                  for b, n in cases(dims["max_words"])}
    for b, n in cases(dims["max_words"]):
        report["pipeline"][f"batch{b}_len{n}"] = pipeline_parity(model, sessions, random_features(model, b, b, n, seed=n),
                                                                 seed=n, dtype=dtype)
    if store is not None:
        features = store_features(store["root"], store["word_set"], images=PARITY_BATCH)
        report["pipeline"]["store_test"] = pipeline_parity(model, sessions, features, dtype=dtype)
    if shortlist is not None:
        report["shortlist"] = shortlist_parity(shortlist, sessions, dims, dtype)
    worst: dict[str, float] = {}
    for name, per_case in report["graphs"].items():
        for output in next(iter(per_case.values())):
            worst[f"{name}.{output}"] = max(c[output] for c in per_case.values())
    for key in ("w2r", "o2w", "ms"):
        values = [c[key] for c in report["pipeline"].values() if key in c]
        if values:
            worst[f"pipeline.{key}"] = max(values)
    for key, value in report.get("shortlist", {}).items():
        worst[f"shortlist.{key}"] = value
    report["worst"] = worst
    if tolerance is not None and max(worst.values()) > tolerance:
        listing = ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
        raise ArtifactError(f"{precision} parity failed (tolerance {tolerance:g}): max |diff| {listing}")
    return report


def shortlist_parity(shortlist: nn.Module, sessions: dict, dims: dict[str, int], dtype=np.float32) -> dict[str, float]:
    """Max |ONNX - DualEncoder.shortlist_*| of the shortlist vectors (hubness-corrected when attached) on random inputs at several lengths."""
    out = {"image_vectors": 0.0, "text_vectors": 0.0}
    for b, n in cases(dims["max_words"]):
        feeds_img = example_inputs(GRAPHS[SHORTLIST_GRAPHS[0]], dims, "fp32", {"images": b}, seed=n)
        feeds_txt = example_inputs(GRAPHS[SHORTLIST_GRAPHS[1]], dims, "fp32", {"captions": b, "words": n}, seed=n)
        with torch.no_grad():
            want_img = shortlist.shortlist_images(torch.from_numpy(feeds_img["regions"]), torch.from_numpy(feeds_img["objects"]))
            want_txt = shortlist.shortlist_texts(torch.from_numpy(feeds_txt["words"]), torch.from_numpy(feeds_txt["lengths"]))
        got_img = sessions["shortlist_image"].run(None, {k: v.astype(dtype) for k, v in feeds_img.items()})[0]
        got_txt = sessions["shortlist_text"].run(None, {"words": feeds_txt["words"].astype(dtype), "lengths": feeds_txt["lengths"]})[0]
        out["image_vectors"] = max(out["image_vectors"], _max_diff(got_img, want_img.numpy(), relative=False))
        out["text_vectors"] = max(out["text_vectors"], _max_diff(got_txt, want_txt.numpy(), relative=False))
    return out
