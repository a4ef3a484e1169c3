"""Retrieval metrics of the image-text matching protocol, in numpy (the runtime needs them without torch).

    from engine.metrics import retrieval_metrics
    metrics = retrieval_metrics(scores, captions_per_image=5)          # scores: [N_img, N_cap]
    metrics = retrieval_metrics(scores, captions_per_image=5, folds=5) # COCO 5-fold 1K protocol

Row i of `scores` is image i; captions i*cpi .. i*cpi+cpi-1 belong to it (cpi = captions_per_image).
- image-to-text: each image ranks all captions; its rank is the best rank among its own captions.
- text-to-image: each caption ranks all images; its rank is that of its image.
Ranks are 1-based. R@K is the percent of queries with rank <= K. Ties count against the query
(a competitor scoring equal to the ground truth ranks above it), so a constant scorer gets
no credit. With folds > 1 the images are split into equal consecutive folds (each with its
captions), metrics are averaged over folds, and rsum is computed from the averaged recalls.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InputError

RECALL_AT = (1, 5, 10)


def _check_scores(scores: np.ndarray, captions_per_image: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError(f"scores: expected a 2-D matrix [N_images, N_captions], got shape {list(scores.shape)}")
    if not isinstance(captions_per_image, (int, np.integer)) or captions_per_image < 1:
        raise InputError(f"captions_per_image: expected a positive integer, got {captions_per_image!r}")
    n_img, n_cap = scores.shape
    if n_cap != n_img * captions_per_image:
        raise InputError(
            f"scores: expected {n_img} x {n_img * captions_per_image} ({captions_per_image} captions per image), got {n_img} x {n_cap}"
        )
    if not np.isfinite(scores).all():
        raise InputError(f"scores: non-finite value at index {np.argwhere(~np.isfinite(scores))[0].tolist()}; expected finite scores")
    return scores


def image_to_text_ranks(scores: np.ndarray, captions_per_image: int) -> np.ndarray:
    """1-based rank of each image's best-ranked own caption. [N_img]"""
    n_img = scores.shape[0]
    own = scores.reshape(n_img, n_img, captions_per_image)[np.arange(n_img), np.arange(n_img)]  # [N_img, cpi]
    best_own = own.max(axis=1)  # [N_img]
    return 1 + (scores > best_own[:, None]).sum(axis=1) + _own_ties(scores, best_own, captions_per_image)


def _own_ties(scores: np.ndarray, best_own: np.ndarray, captions_per_image: int) -> np.ndarray:
    """Competitors (other images' captions) that tie the best own caption rank above it."""
    n_img = scores.shape[0]
    ties = (scores == best_own[:, None]).reshape(n_img, n_img, captions_per_image).sum(axis=2)  # [N_img, N_img]
    ties[np.arange(n_img), np.arange(n_img)] = 0
    return ties.sum(axis=1)


def text_to_image_ranks(scores: np.ndarray, captions_per_image: int) -> np.ndarray:
    """1-based rank of each caption's own image. [N_cap]"""
    n_cap = scores.shape[1]
    owner = np.arange(n_cap) // captions_per_image  # [N_cap]
    truth = scores[owner, np.arange(n_cap)]  # [N_cap]
    return (scores >= truth[None, :]).sum(axis=0)  # counts the truth itself, so 1-based; ties rank above


def summarize_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent, median and mean rank of 1-based ranks."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    out["medr"] = float(np.floor(np.median(ranks)))  # floor, as VSE/SCAN evaluation code reports it
    out["meanr"] = float(np.mean(ranks))
    return out


def _rsum(i2t: dict, t2i: dict) -> float:
    return float(sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in RECALL_AT))


def retrieval_metrics(scores: np.ndarray, captions_per_image: int = 5, folds: int = 1) -> dict:
    """{"i2t": {r1,r5,r10,medr,meanr}, "t2i": {...}, "rsum": float} for a score matrix.

    With folds > 1 (COCO 5-fold 1K), each fold is images [f*n, (f+1)*n) with their captions;
    every metric is the mean over folds and rsum is computed from the averaged recalls.
    """
    scores = _check_scores(scores, captions_per_image)
    n_img = scores.shape[0]
    if not isinstance(folds, (int, np.integer)) or folds < 1 or n_img % folds:
        raise InputError(f"folds: expected a positive divisor of the {n_img} images, got {folds!r}")
    per_fold = n_img // folds
    results = []
    for f in range(folds):
        img = slice(f * per_fold, (f + 1) * per_fold)
        cap = slice(f * per_fold * captions_per_image, (f + 1) * per_fold * captions_per_image)
        block = scores[img, cap]  # [n, n*cpi]
        results.append(
            (summarize_ranks(image_to_text_ranks(block, captions_per_image)), summarize_ranks(text_to_image_ranks(block, captions_per_image)))
        )
    i2t = {key: float(np.mean([r[0][key] for r in results])) for key in results[0][0]}
    t2i = {key: float(np.mean([r[1][key] for r in results])) for key in results[0][1]}
    return {"i2t": i2t, "t2i": t2i, "rsum": _rsum(i2t, t2i)}


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], captions_per_image: int,
                     samples: int = 2000, seed: int = 0) -> dict:
    """How sure is "a ranks better than b"? rsum(a) - rsum(b) on the same queries, and its 95% interval over
    `samples` resamplings of the test images with replacement (paired: both models see the same resample; an
    image brings its image-to-text query and its captions' text-to-image queries, so the directions move
    together). a, b: {"i2t": 1-based ranks [N_img], "t2i": 1-based ranks [N_img * captions_per_image]}, captions
    image-major (image i's are i*cpi .. i*cpi + cpi - 1), as image_to_text_ranks / text_to_image_ranks give.
    -> {"difference", "low", "high" (2.5th / 97.5th percentiles), "share_a_better" (of the resamples), "images",
    "samples", "seed"}."""
    per_image = []
    for name, ranks in (("a", a), ("b", b)):
        i2t, t2i = np.asarray(ranks["i2t"]), np.asarray(ranks["t2i"])
        n = len(i2t)
        if t2i.shape != (n * captions_per_image,):
            raise InputError(f"ranks {name}: expected {n} x {captions_per_image} t2i ranks for {n} i2t ranks, got {t2i.shape}")
        hits_i2t = sum((i2t <= k).astype(np.float64) for k in RECALL_AT) / n  # [N_img] share of R@1+R@5+R@10
        hits_t2i = sum((t2i <= k).astype(np.float64) for k in RECALL_AT).reshape(n, captions_per_image).sum(1) / len(t2i)
        per_image.append(100.0 * (hits_i2t + hits_t2i))  # rsum = the sum over images of these
    if len(per_image[0]) != len(per_image[1]):
        raise InputError(f"ranks: expected the same images for both models, got {len(per_image[0])} and {len(per_image[1])}")
    delta = per_image[0] - per_image[1]  # [N_img]; its sum is rsum(a) - rsum(b)
    n = len(delta)
    rng = np.random.default_rng(seed)
    draws = np.array([delta[rng.integers(0, n, n)].sum() for _ in range(samples)])  # one resample at a time: O(N) memory
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": float(delta.sum()), "low": float(low), "high": float(high),
            "share_a_better": float(np.mean(draws > 0)), "images": n, "samples": samples, "seed": seed}


def format_metrics(metrics: dict) -> str:
    """One human line: 'i2t R@1 .. R@5 .. R@10 .. medr .. | t2i ... | rsum ...'."""
    def side(m: dict) -> str:
        return f"R@1 {m['r1']:.1f} R@5 {m['r5']:.1f} R@10 {m['r10']:.1f} medr {m['medr']:g} meanr {m['meanr']:.1f}"

    return f"i2t {side(metrics['i2t'])} | t2i {side(metrics['t2i'])} | rsum {metrics['rsum']:.1f}"
