"""What the service computes, without HTTP: text -> images, image -> captions, explicit pairs.

    service = SearchService(scorer, gallery, captions=caption_cache, limits=Limits())
    [result] = service.search_texts([TextQuery("a dog runs on the beach", top_k=10, rerank_k=100)])
    [result] = service.rank_captions([ImageQuery(Path("upload.jpg"), top_k=5, rerank_k=50)])
    scores = service.score_pairs([("dog.jpg", "a dog runs")], attention=True)

Every query goes through the same two stages: the artifact's shortlist vectors (dual encoder)
ranked by inner product in FAISS (engine/serve/index.py) give the top `rerank_k` candidates;
BSSAN re-scores them (Scorer.score_pairs: the product score, i.e. BSSAN's MS fused with the
first stage when the artifact carries fusion weights, MS alone otherwise) and the best `top_k`
are returned by that score (ties: the better first-stage rank first), each with its "score" and
its "first_stage" inner product.

Batches: search_texts and rank_captions take a list of queries and make ONE encoder call, one
FAISS search per distinct rerank_k and ONE score_pairs call for all of them: the micro-batcher
(engine/serve/batching.py) hands them the requests that arrived together. A query gets the same
ranking and first-stage scores alone or in a batch; its BSSAN scores agree to float32 rounding (a
pair block of another shape runs other GEMM kernels: tests/engine/serve/test_serve_batching.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cache import CaptionCache, ImageCache
from engine.errors import InputError
from engine.runtime import Ranking, Scorer
from engine.serve.gallery import Gallery
from engine.serve.index import VectorIndex


@dataclass
class Limits:
    """Bounds on what one request may ask; each is checked before any work and named in the error."""

    max_body_bytes: int = 10 * 2**20  # a phone photo (JPEG) is 2-6 MB
    max_image_pixels: int = 40_000_000  # decoding a 40 MP RGB image takes 120 MB; bigger is refused before decoding
    max_caption_chars: int = 1000  # the model reads at most max_words (30) words anyway
    max_top_k: int = 100
    max_rerank_k: int = 1000  # BSSAN pairs per query: ~1 s of pair scoring at the reference sizes on 2 cores
    max_pairs: int = 100  # explicit pairs per /v1/score request


@dataclass
class TextQuery:
    text: str
    top_k: int = 10
    rerank_k: int = 100
    attention: bool = False


@dataclass
class ImageQuery:
    path: Path  # a decoded-size-checked image file (the app writes uploads to a temp file)
    top_k: int = 10
    rerank_k: int = 100
    attention: bool = False


def attention_json(hit: dict) -> dict:
    """One hit's attention (engine.attention) as JSON: W2R word -> region weights [words][regions]
    (regions: the backbone's square grid, row-major), O2W object -> word weights [objects][words],
    and per word its mean O2W weight over the objects (what the page shows beside the words)."""
    out = {"words": hit.get("words")}
    if "word_to_region" in hit:
        w2r = np.asarray(hit["word_to_region"], np.float32)  # [L, D]
        side = int(round(np.sqrt(w2r.shape[1])))
        out["grid"] = [side, side] if side * side == w2r.shape[1] else None
        out["word_to_region"] = np.round(w2r, 4).tolist()
    if "object_to_word" in hit:
        o2w = np.asarray(hit["object_to_word"], np.float32)  # [P, L]
        out["object_to_word"] = np.round(o2w, 4).tolist()
        out["word_weights"] = np.round(o2w.mean(axis=0), 4).tolist()  # [L]
    return out


def rerank(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Order (indices into the candidates) of the top_k by BSSAN score; ties keep the first-stage order."""
    order = np.lexsort((np.arange(len(scores)), -scores))  # by -score, then first-stage rank
    return order[:top_k]


def reranked_per_query(scores: np.ndarray, candidates: list, queries: list):
    """Yield (i, query, its candidates' scores, their top_k order) for the queries whose candidate lists
    were scored one after the other in `scores` (one shared pair call for the whole batch)."""
    start = 0
    for i, query in enumerate(queries):
        own = scores[start:start + len(candidates[i])]
        start += len(candidates[i])
        yield i, query, own, rerank(own, query.top_k)


class SearchService:
    """One Scorer, one Gallery, an optional caption collection with its own flat FAISS index."""

    def __init__(self, scorer: Scorer, gallery: Gallery, captions: CaptionCache | None = None, limits: Limits | None = None):
        scorer.require_shortlist()
        self.scorer, self.gallery, self.captions, self.limits = scorer, gallery, captions, limits or Limits()
        self.caption_index = None
        if captions is not None and len(captions):
            self.caption_index = VectorIndex("flat", captions.arrays["text_vectors"].shape[1])
            self.caption_index.add(np.asarray(captions.arrays["text_vectors"], np.float32))
        self.pairs_scored = 0  # read by the metrics
        self.scoring_seconds = 0.0
        self._stats_lock = threading.Lock()

    def _score(self, images: ImageCache, captions: CaptionCache, pairs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        scores = self.scorer.score_pairs(images, captions, pairs)
        with self._stats_lock:
            self.pairs_scored += len(pairs)
            self.scoring_seconds += time.perf_counter() - start
        return scores

    # ------------------------------------------------------------------------------ text -> images
    def search_texts(self, queries: list[TextQuery]) -> list[dict]:
        captions = self.scorer.encode_captions([q.text for q in queries], ids=[f"query{i}" for i in range(len(queries))])
        vectors = np.asarray(captions.arrays["text_vectors"], np.float32)  # [Q, K]
        candidates: list = [None] * len(queries)
        firsts: list = [None] * len(queries)
        view = None
        for rerank_k in sorted({q.rerank_k for q in queries}):  # one search per K: a query's candidates never depend on its batch
            members = [i for i, q in enumerate(queries) if q.rerank_k == rerank_k]
            view_k, slots, sims = self.gallery.search(vectors[members], rerank_k)
            view = view_k if view is None or len(view_k) > len(view) else view
            for i, s, d in zip(members, slots, sims):
                candidates[i], firsts[i] = s, d
        if view is None or not len(view):
            return [{"query": q.text, "results": []} for q in queries]
        pairs = np.concatenate([np.stack([c, np.full(len(c), i)], axis=1) for i, c in enumerate(candidates)]).astype(np.int64)  # [N, 2] (slot, query)
        scores = self._score(view, captions, pairs) if len(pairs) else np.zeros(0, np.float32)
        out = []
        for i, q, own, order in reranked_per_query(scores, candidates, queries):
            slots = candidates[i][order]
            hits = [{"id": view.ids[s], "score": float(own[o]), "first_stage": float(firsts[i][o])} for s, o in zip(slots, order)]
            if q.attention and len(slots):
                ranking = Ranking("t2i", np.array([i]), slots[None, :], own[order][None, :])
                for hit, weights in zip(hits, self.scorer.attention(view, captions, ranking)[0]):
                    hit["attention"] = attention_json(weights)
            out.append({"query": q.text, "results": hits})
        return out

    # ------------------------------------------------------------------------------ image -> captions
    def rank_captions(self, queries: list[ImageQuery]) -> list[dict]:
        if self.caption_index is None:
            raise InputError("captions: this server has no caption collection; start it with --captions FILE (one caption a line)")
        images = self.scorer.encode_images([q.path for q in queries], ids=[f"upload{i}" for i in range(len(queries))])
        vectors = np.asarray(images.arrays["image_vectors"], np.float32)  # [Q, K]
        candidates: list = [None] * len(queries)
        firsts: list = [None] * len(queries)
        for rerank_k in sorted({q.rerank_k for q in queries}):
            members = [i for i, q in enumerate(queries) if q.rerank_k == rerank_k]
            labels, sims = self.caption_index.search(vectors[members], min(rerank_k, len(self.captions)))
            for i, row, d in zip(members, labels, sims):
                candidates[i], firsts[i] = row[row >= 0], d[row >= 0]
        pairs = np.concatenate([np.stack([np.full(len(c), i), c], axis=1) for i, c in enumerate(candidates)]).astype(np.int64)  # (image, caption row)
        scores = self._score(images, self.captions, pairs)
        out = []
        for i, q, own, order in reranked_per_query(scores, candidates, queries):
            rows = candidates[i][order]
            hits = [{"caption": self.captions.texts[r], "id": self.captions.ids[r], "score": float(own[o]),
                     "first_stage": float(firsts[i][o])} for r, o in zip(rows, order)]
            if q.attention and len(rows):
                ranking = Ranking("i2t", np.array([i]), rows[None, :], own[order][None, :])
                for hit, weights in zip(hits, self.scorer.attention(images, self.captions, ranking)[0]):
                    hit["attention"] = attention_json(weights)
            out.append({"results": hits})
        return out

    # ------------------------------------------------------------------------------ explicit pairs
    def score_pairs(self, pairs: list[tuple[str, str]], attention: bool = False) -> list[dict]:
        """BSSAN score of each (gallery image id, caption text); an unknown id is a KeyError naming its index."""
        view = self.gallery.view()
        slot_of = {image_id: slot for slot, image_id in enumerate(view.ids) if image_id}
        for index, (image_id, _) in enumerate(pairs):
            if image_id not in slot_of:
                raise KeyError(f"pairs[{index}].image_id: {image_id!r} is not in the gallery")
        texts = sorted({text for _, text in pairs})
        captions = self.scorer.encode_captions(texts, ids=[f"caption{i}" for i in range(len(texts))])
        row_of = {text: i for i, text in enumerate(texts)}
        index = np.array([[slot_of[i], row_of[t]] for i, t in pairs], dtype=np.int64)  # [N, 2]
        scores = self._score(view, captions, index)
        out = [{"image_id": i, "caption": t, "score": float(s)} for (i, t), s in zip(pairs, scores)]
        if attention:
            ranking = Ranking("t2i", index[:, 1], index[:, :1], scores[:, None])
            for hit, weights in zip(out, self.scorer.attention(view, captions, ranking)):
                hit["attention"] = attention_json(weights[0])
        return out
