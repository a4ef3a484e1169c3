"""The one ranking protocol: first stage, BSSAN re-rank of its top K, fused score; and its metrics.

    from engine.ranking import Fusion, candidate_pairs, two_stage_metrics
    fusion = Fusion(first_stage_weight=1.0, bssan_weight=0.3)
    metrics = two_stage_metrics(first, rescore, k=20, captions_per_image=5, fusion=fusion)
    metrics = two_stage_metrics(None, rescore, k=None, captions_per_image=5)     # BSSAN alone, exhaustive

`first` is the first stage's score matrix [N_img, N_cap] (dual-encoder cosines), `rescore(image_index,
text_index) -> scores [N]` gives BSSAN's MS of listed pairs. Per direction (image-to-text: each image
ranks the captions; text-to-image: each caption ranks the images):
- the query's top-K items by the first stage are the candidates (ties broken by index, stably);
- candidates are ordered by the fused score `Fusion.apply(first, bssan)` and placed above every other
  item; the other items keep the first stage's order below them;
- K=None (or K >= the number of items) re-ranks everything: exhaustive scoring.
So with K=None and Fusion(0, 1) this is BSSAN alone; with Fusion(1, 0) (or any K) and bssan weight 0 it is
the first stage alone. The metrics are engine.metrics' (R@1/5/10, medr, meanr, rsum; ties count against
the query). Every figure the project reports (engine.score --evaluate, training.evaluate, model
selection in training.train, benchmarks) comes from this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import InputError
from engine.metrics import RECALL_AT, image_to_text_ranks, summarize_ranks, text_to_image_ranks

Rescore = Callable[[np.ndarray, np.ndarray], np.ndarray]
DIRECTIONS = ("i2t", "t2i")


@dataclass(frozen=True)
class Fusion:
    """The product's score of a pair: first_stage_weight * first-stage similarity + bssan_weight * MS.
    (0, 1) is BSSAN alone (the default for artifacts without a fusion record)."""

    first_stage_weight: float = 0.0
    bssan_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("first_stage_weight", "bssan_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise InputError(f"fusion.{name}: expected a finite number >= 0, got {value!r}")
        if self.first_stage_weight == 0 and self.bssan_weight == 0:
            raise InputError("fusion: expected first_stage_weight or bssan_weight > 0, got both 0")

    @property
    def uses_first_stage(self) -> bool:
        return self.first_stage_weight > 0

    @property
    def uses_bssan(self) -> bool:
        return self.bssan_weight > 0

    def apply(self, first: np.ndarray | float | None, bssan: np.ndarray | float | None) -> np.ndarray:
        """Fused scores (float32). A term whose weight is 0 may be None."""
        out = 0.0
        if self.uses_first_stage:
            out = out + self.first_stage_weight * np.asarray(first, dtype=np.float64)
        if self.uses_bssan:
            out = out + self.bssan_weight * np.asarray(bssan, dtype=np.float64)
        return np.asarray(out, dtype=np.float32)

    def to_dict(self) -> dict[str, float]:
        return {"first_stage_weight": float(self.first_stage_weight), "bssan_weight": float(self.bssan_weight)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "fusion") -> "Fusion":
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected an object with first_stage_weight and bssan_weight, got {data!r}")
        missing = sorted({"first_stage_weight", "bssan_weight"} - set(data))
        if missing:
            raise InputError(f"{where}: missing {missing}; expected first_stage_weight and bssan_weight")
        try:
            return cls(data["first_stage_weight"], data["bssan_weight"])
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None


BSSAN_ALONE = Fusion(0.0, 1.0)
FIRST_STAGE_ALONE = Fusion(1.0, 0.0)


def top_k_per_query(first: np.ndarray, k: int, direction: str) -> np.ndarray:
    """Indices of each query's top-k items by the first stage, best first, ties by index:
    i2t -> [N_img, k] caption indices; t2i -> [N_cap, k] image indices."""
    scores = first if direction == "i2t" else first.T  # [queries, items]
    k = min(k, scores.shape[1])
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [Q, k] unordered top-k (+ ties beyond it cut)
    # argpartition breaks ties arbitrarily: recover the stable top-k (by score, then index)
    threshold = np.take_along_axis(scores, part, axis=1).min(axis=1)  # [Q]
    keep = []
    for q in range(scores.shape[0]):
        above = np.flatnonzero(scores[q] > threshold[q])
        tied = np.flatnonzero(scores[q] == threshold[q])[: k - len(above)]
        chosen = np.concatenate([above, tied])
        keep.append(chosen[np.lexsort((chosen, -scores[q, chosen]))])
    return np.stack(keep).astype(np.int64)


def candidate_mask(first: np.ndarray | None, k: int | None, direction: str, shape: tuple[int, int]) -> np.ndarray:
    """[N_img, N_cap] bool: the pairs that `direction` re-ranks (all of them when exhaustive)."""
    n_img, n_cap = shape
    items = n_cap if direction == "i2t" else n_img
    if k is None or k >= items:
        return np.ones(shape, dtype=bool)
    if first is None:
        raise InputError(f"two-stage ranking with K={k}: expected a first-stage score matrix, got none")
    top = top_k_per_query(first, k, direction)
    mask = np.zeros(shape, dtype=bool)
    if direction == "i2t":
        np.put_along_axis(mask, top, True, axis=1)
    else:
        np.put_along_axis(mask.T, top, True, axis=1)
    return mask


def candidate_pairs(first: np.ndarray | None, k: int | None, shape: tuple[int, int] | None = None,
                    directions: tuple[str, ...] = DIRECTIONS) -> tuple[np.ndarray, np.ndarray]:
    """(image_index, text_index) of every pair some direction re-ranks: the union of the per-direction
    top-K candidate sets (every pair when exhaustive). Each pair is listed once, row-major."""
    shape = first.shape if shape is None else shape
    mask = np.zeros(shape, dtype=bool)
    for direction in directions:
        mask |= candidate_mask(first, k, direction, shape)
    image_index, text_index = np.nonzero(mask)
    return image_index.astype(np.int64), text_index.astype(np.int64)


def ordering_matrix(first: np.ndarray | None, fused: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 [N_img, N_cap] whose order (per row or column, as the direction reads it) is the
    protocol's: candidates by fused score above everything else, the rest by first stage."""
    if mask.all():
        return fused.astype(np.float64)
    base = first.astype(np.float64)
    lift = base.max() - np.min(fused[mask], initial=0.0) + 1.0  # every candidate above every other item
    return np.where(mask, fused.astype(np.float64) + lift, base)


def fused_matrix(first: np.ndarray | None, image_index: np.ndarray, text_index: np.ndarray, bssan: np.ndarray,
                 fusion: Fusion, shape: tuple[int, int]) -> np.ndarray:
    """[N_img, N_cap] fused scores at the listed pairs (NaN elsewhere)."""
    out = np.full(shape, np.nan, dtype=np.float64)
    firsts = first[image_index, text_index] if fusion.uses_first_stage else None
    out[image_index, text_index] = fusion.apply(firsts, bssan)
    return out


def two_stage_ranks(first: np.ndarray | None, rescore: Rescore | None, k: int | None, captions_per_image: int,
                    fusion: Fusion = BSSAN_ALONE, shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """{"i2t": ranks [N_img], "t2i": ranks [N_cap]} (1-based) under the protocol (module docstring)."""
    if first is None and shape is None:
        raise InputError("two_stage_ranks: expected a first-stage matrix or a shape, got neither")
    shape = tuple(first.shape) if first is not None else tuple(shape)
    if fusion.uses_first_stage and first is None:
        raise InputError("two_stage_ranks: the fusion uses the first stage; expected its score matrix, got none")
    if k is not None and k < 1:
        raise InputError(f"two_stage_ranks: expected K >= 1 or None (exhaustive), got {k}")
    if fusion.uses_bssan:
        if rescore is None:
            raise InputError("two_stage_ranks: the fusion uses BSSAN; expected a rescore function, got none")
        masks = {direction: candidate_mask(first, k, direction, shape) for direction in DIRECTIONS}  # each once
        image_index, text_index = np.nonzero(masks["i2t"] | masks["t2i"])  # every re-ranked pair, once
        bssan = np.asarray(rescore(image_index, text_index), dtype=np.float64)
        if bssan.shape != image_index.shape or not np.isfinite(bssan).all():
            raise InputError(f"rescore: expected {len(image_index)} finite scores, got shape {list(bssan.shape)}"
                             f"{'' if bssan.shape != image_index.shape else ' with non-finite values'}")
    else:  # the first stage alone: nothing to re-score, every pair ordered by it
        everything = np.ones(shape, dtype=bool)
        masks = {direction: everything for direction in DIRECTIONS}
        image_index, text_index = np.nonzero(everything)
        bssan = None
    fused = fused_matrix(first, image_index, text_index, bssan, fusion, shape)
    ranks = {}
    for direction in DIRECTIONS:
        order = ordering_matrix(first, fused, masks[direction])
        ranks[direction] = (image_to_text_ranks(order, captions_per_image) if direction == "i2t"
                            else text_to_image_ranks(order, captions_per_image))
    return ranks


def metrics_of_ranks(ranks: dict[str, np.ndarray]) -> dict:
    i2t, t2i = summarize_ranks(ranks["i2t"]), summarize_ranks(ranks["t2i"])
    return {"i2t": i2t, "t2i": t2i, "rsum": float(sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in RECALL_AT))}


def first_stage_recall(first: np.ndarray, k: int, captions_per_image: int) -> dict[str, float]:
    """Percent of queries whose ground truth is among the first stage's top-K (the ceiling of R@K' for K' > K)."""
    n_img, n_cap = first.shape
    owner = np.arange(n_cap) // captions_per_image
    top_captions = top_k_per_query(first, k, "i2t")  # [N_img, k]
    top_images = top_k_per_query(first, k, "t2i")  # [N_cap, k]
    i2t = (owner[top_captions] == np.arange(n_img)[:, None]).any(axis=1)
    t2i = (top_images == owner[:, None]).any(axis=1)
    return {"i2t": float(100.0 * i2t.mean()), "t2i": float(100.0 * t2i.mean())}


def two_stage_metrics(first: np.ndarray | None, rescore: Rescore | None, k: int | None, captions_per_image: int,
                      fusion: Fusion = BSSAN_ALONE, shape: tuple[int, int] | None = None) -> dict:
    """engine.metrics-style metrics of the protocol, plus "protocol": {k, fusion, first_stage_recall}."""
    ranks = two_stage_ranks(first, rescore, k, captions_per_image, fusion, shape)
    out = metrics_of_ranks(ranks)
    shape = tuple(first.shape) if first is not None else tuple(shape)
    exhaustive = k is None or k >= max(shape)
    protocol = {"k": None if exhaustive else int(k), "fusion": fusion.to_dict()}
    if first is not None and not exhaustive:
        protocol["first_stage_recall"] = first_stage_recall(first, k, captions_per_image)
    out["protocol"] = protocol
    return out


def tune_fusion(first: np.ndarray, bssan_of_pairs: tuple[np.ndarray, np.ndarray, np.ndarray], k: int | None,
                captions_per_image: int, weights: tuple[float, ...]) -> tuple[Fusion, list[dict]]:
    """The bssan_weight (first_stage_weight 1) of `weights` with the best rsum under the protocol at K,
    given BSSAN scores already computed for (at least) the candidate pairs: (image_index, text_index,
    scores). Weight 0 (the first stage alone) is always among the choices, so on the tuning split
    the fused ranking is never worse than the first stage. Returns (best, [{weight, rsum, ...}])."""
    image_index, text_index, scores = bssan_of_pairs
    table = np.full(first.shape, np.nan, dtype=np.float64)
    table[image_index, text_index] = scores

    def rescore(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        values = table[images, texts]
        if np.isnan(values).any():
            raise InputError("tune_fusion: a candidate pair has no BSSAN score; expected scores of every candidate")
        return values

    rows = []
    best, best_rsum = FIRST_STAGE_ALONE, -np.inf
    for weight in sorted({0.0, *weights}):
        fusion = FIRST_STAGE_ALONE if weight == 0 else Fusion(1.0, float(weight))
        metrics = two_stage_metrics(first, rescore, k, captions_per_image, fusion)
        rows.append({"bssan_weight": float(weight), "rsum": metrics["rsum"], "i2t_r1": metrics["i2t"]["r1"],
                     "t2i_r1": metrics["t2i"]["r1"]})
        if metrics["rsum"] > best_rsum + 1e-9:
            best, best_rsum = fusion, metrics["rsum"]
    return best, rows
