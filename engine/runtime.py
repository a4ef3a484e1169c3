"""The scorer library: encode a gallery once, then score matrices, pair lists and top-k rankings.

    from engine.runtime import Scorer
    with Scorer.load("artifacts/flickr8k", backend="auto", precision="fp32", threads=2) as scorer:
        images = scorer.encode_images(["a.jpg", "b.jpg"])            # or (regions, objects) arrays, or a store split
        captions = scorer.encode_captions(["a dog runs on the grass", "two people ride bikes"])
        scores = scorer.score_matrix(images, captions)              # [N_img, N_cap] float32, MS = Y + lambda Y'
        ranking = scorer.top_k(images, captions, k=5, direction="i2t", shortlist_k=100, attention=True)
        for query, hits, values in zip(ranking.queries, ranking.indices, ranking.scores): ...

Scoring runs the artifact's pair graphs (engine/graphs.py) on cache rows and a pair index, or, for
one-image blocks, its grid graphs (no pair index, nothing gathered) when the artifact has them: the
scoring path (`path`, see Scorer.choose_path; the choice and its reason end `runner.reason`).
Grids (score_matrix, exhaustive top_k): ONE image row x a bucket of up to `batch_size` captions
per call, so the image's regions_values are shared by every pair instead of gathered per pair.
Pair lists (score_pairs, shortlist re-ranks): an image with many pairs gets calls of its own (on the
grid path cut by length where a cost model says: grid_chunks), the rest are pooled across images (each
pair gathers its image's rows; calls of at most POOLED_PAIRS_PER_CALL). engine.score's shortlist mode gives score_pairs both directions' candidate
pairs at once, grouped by image (engine/journal.py: score_shortlists). Captions are bucketed by
length (sorted, then cut into blocks, each padded only to its own longest caption: the W2R
recurrence runs that many steps); `buckets=False` keeps the given order and pads every block to
the longest caption of the whole set (same scores, more work: a test checks both agree).

Memory: `memory_budget_mb` bounds the process's planned memory during a scoring call: a fixed
PROCESS_BASE_MB for the interpreter and the sessions, the caches (every array, in memory or
mapped), the output, and the working set of one pair call (`working_bytes`: the call's rows and
the graphs' intermediates, x PAIR_OVERHEAD). Calls shrink until that fits; if even one pair does
not fit, InputError says how much is needed. The plan is a function of the inputs and options
only (never of the live RSS), so a resumed or repeated run makes the same calls and its scores are
bit-identical. `check_budget` refuses a budget too small for a gallery before anything is encoded.
Encoding holds the cache being filled plus one batch. The budget is per call: calls made from
several threads at once each plan with all of it.

Shortlist (`shortlist_k`): the artifact's shortlist graphs (a dual encoder) give unit vectors;
the first stage ranks by dot product, then BSSAN re-scores only the top shortlist_k per query.
Attention (`attention=True`): the graphs output scores only, so the attention weights of each
hit are recomputed in numpy from the caches, exactly as the pair graphs compute them
(engine/attention.py): W2R word-to-region [words, D] and O2W object-to-word [P, words].

Thread safety: a Scorer may be used from several threads at once. It holds no mutable state
after loading but two lazily loaded, lock-guarded helpers (each call allocates its own buffers),
and its runner is re-entrant (engine/backends/; the TensorRT runner serialises with a lock).
Encoding image FILES is serialised (the detector net is stateful); everything else runs
concurrently. Results do not depend on threading: tests/engine/test_runtime.py scores from
several threads and compares bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from engine.artifact import Artifact, load_artifact
from engine.attention import attention_of_pairs
from engine.backends import Runner, open_runner
from engine.backends.base import Backend
from engine.cache import CaptionCache, ImageCache
from engine.encode import Encoder, image_pipeline  # noqa: F401  (image_pipeline: part of this module's API)
from engine.errors import InputError
from engine.graphs import FLOAT_DTYPE, GRAPHS, pair_bytes
from engine.hub import HUB_OFFSET
from engine.ranking import BSSAN_ALONE, Fusion

DEFAULT_MEMORY_BUDGET_MB = 2048
# What the process holds besides caches and outputs (interpreter, numpy, onnxruntime, the artifact's
# sessions): RSS measured 101 MB after loading the reference artifact on ORT CPU (fp32), 122 MB int8.
# A constant, not the live RSS: the batch plan must not depend on the moment (resume is bit-identical).
PROCESS_BASE_MB = 128
DEFAULT_PAIRS_PER_CALL = 256  # grid path, reference model, 16 images x 5,000 Flickr8K test captions, 1 thread (load ~12):
# 16.7k pairs per CPU-second at 256 and 128 vs 15.2k at 512 (identical scores): length buckets of 256 sorted captions pad
# 6% (512: 15%) and a call's rows stay in L2
# score_pairs: an image with this many pairs gets calls of its own (one image row: no regions_values gather);
# fewer are pooled across images and sorted by caption length. Measured at the flickr8k preset (2 loaded
# cores): i2t re-rank of 100 candidates 1184 pairs/s pooled vs 344 in single-image calls of 100 pairs.
SINGLE_ROW_PAIRS = 256
# With grid graphs a one-image call gathers nothing and pays only the call's fixed cost, so smaller groups go
# to one-image calls too (benchmarks/README.md: "Scoring paths").
SINGLE_ROW_PAIRS_GRID = 32
PATHS = ("auto", "grid", "pair", "kernel")  # Scorer path: what scores a one-image block (see Scorer.choose_path)
# score_pairs on the grid path: an image's pairs, sorted by caption length, are cut into calls where the cost model
# of a grid call is lowest (grid_chunks), so a call's captions are padded to the longest of a narrow length range,
# not of all the image's candidates (100 random captions span ~5-25 words; the recurrence runs the longest's steps
# for every row), yet calls stay large enough to amortise their fixed cost. Cost of one call, in units of one
# pair x padded word of the recurrence: GRID_CALL_COST + pairs x (GRID_PAIR_COST + padded words). Fitted to
# w2r_grid + o2w_grid CPU time on 1 thread, the reference artifact, B = 8..256 captions of 8..24 words (~0.65 ms per
# call, ~21 us per pair, ~4.1 us per pair and word; results/benchmarks/issue14/shortlist-k100.md). On Flickr8K
# test's K = 100 re-rank pairs (~500 per image) the CPU per pair is flat for call costs 80-160, +5% at 400, and
# 6% lower than the near-equal chunks of <= 64 used before.
GRID_CALL_COST = 160.0
GRID_PAIR_COST = 5.0
FIRST_STAGE_RUN = 16  # pair_first_stage broadcasts each image's vector when its pairs average this many per image
FIRST_STAGE_CHUNK = 65536  # pairs per block of pair_first_stage's gathers (2 x 128 MB of vectors at K = 512)
# Pooled pair calls (pairs of several image rows, each gathering its image's rows) hold at most this many pairs, cut
# near-equal: each pair gathers its image's regions_values (49 x 512 floats), so a call of 256 moves 25 MB through the
# cache and is slower per pair than several of 64. Measured on a served batch of 16 Flickr8K queries (1,600 pairs over
# 1,331 gallery images, the reference artifact, 1 thread, 2 loaded cores): CPU per query 10.9 ms at 256, 9.9 at 128,
# 9.0-9.1 at 64, 9.3 at 48, 9.8 at 32 (benchmarks/README.md "Serving").
POOLED_PAIRS_PER_CALL = 64
MIN_SPLIT_PAIRS = 32  # score_pairs cuts calls in halves (down to this many pairs) until every concurrent worker has one
PAIR_OVERHEAD = 1.5  # allocator slack over a pair call's listed intermediates: at 512 pairs, flickr8k preset, 392 MB
# estimated vs 358 MB measured (peak RSS minus the RSS before the first call)
DIRECTIONS = ("i2t", "t2i")


@dataclass
class Ranking:
    """Top-k of each query. i2t: queries are image rows, indices caption rows; t2i the reverse."""

    direction: str
    queries: np.ndarray  # [Q] rows of the query side
    indices: np.ndarray  # [Q, k] rows of the ranked side, best first (ties: lower row first)
    scores: np.ndarray  # [Q, k] float32 product scores (BSSAN MS, fused with the first stage per Scorer.fusion)
    candidates: np.ndarray | None = None  # [Q, shortlist_k] shortlist rows (dot-product order), shortlist mode only
    attention: list[list[dict]] | None = None  # per query, per hit: engine.attention.attention_of_pairs entries
    bssan: np.ndarray | None = None  # [Q, k] float32 BSSAN MS of the hits (equal to scores when the scorer does not fuse)


def resident_bytes(images: ImageCache, captions: CaptionCache) -> int:
    """What a scoring call starts from, planned from the inputs only: PROCESS_BASE_MB plus every cache
    array (in memory or memory-mapped: scoring pages them in). Never the live RSS, which differs run to run."""
    arrays = [*images.arrays.values(), *captions.arrays.values()]
    return PROCESS_BASE_MB * 2**20 + sum(a.nbytes for a in arrays)


def check_rows(rows: np.ndarray, count: int, what: str) -> np.ndarray:
    """`rows` as int64, each in [0, count); InputError naming `what` otherwise (a negative row would wrap silently)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= count):
        raise InputError(f"{what}: expected rows in [0, {count}), got [{rows.min()}, {rows.max()}]")
    return rows


def progress_bar(progress: "bool | tqdm", total: int):
    """`progress` itself when it is a bar (the caller's, left open), else a new bar shown if progress is True."""
    if isinstance(progress, tqdm):
        return contextlib.nullcontext(progress)
    return tqdm(total=total, desc="scoring", unit="pair", unit_scale=True, disable=not progress)


def grid_chunks(lengths: np.ndarray, cap: int) -> list[slice]:
    """Calls (slices) of ONE image's pairs whose caption `lengths` are sorted ascending: contiguous chunks of at most
    `cap` pairs that minimise the modelled cost (GRID_CALL_COST per call, GRID_PAIR_COST + padded words per pair).
    A chunk ends where the length changes (moving an end inside a run of one length to the run's end pads nothing
    more); a stretch longer than `cap` is cut into full calls of `cap` from its start, the rest last (the longest
    captions in the smallest call). A function of the lengths and cap only (a resumed run makes the same calls)."""
    n = len(lengths)
    ends = np.append(np.flatnonzero(np.diff(lengths)) + 1, n).tolist()  # candidate chunk ends: length changes, n
    starts = [0] + ends[:-1]
    width = [float(w) for w in lengths]

    def cuts(a: int, b: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + cap, b)) for lo in range(a, b, cap)]

    best, back = [0.0] * (len(ends) + 1), [0] * (len(ends) + 1)  # best[j]: cost of the first ends[j - 1] pairs
    for j in range(1, len(ends) + 1):
        best[j] = np.inf
        for i in range(j):  # the pairs from starts[i] to ends[j - 1] in calls of their own
            cost = best[i] + sum(GRID_CALL_COST + (hi - lo) * (GRID_PAIR_COST + width[hi - 1]) for lo, hi in cuts(starts[i], ends[j - 1]))
            if cost < best[j]:
                best[j], back[j] = cost, i
    chunks, j = [], len(ends)
    while j > 0:
        chunks[:0] = [slice(lo, hi) for lo, hi in cuts(starts[back[j]], ends[j - 1])]
        j = back[j]
    return chunks


_BLAS_LIMIT: list = []  # the threadpoolctl limiter, kept for the life of the process
_BLAS_LIMITED = "; numpy BLAS limited to 1 thread"


def limit_blas_threads() -> str:
    """numpy's BLAS to one thread, once per process, when the Scorer runs its own calls side by side: OpenBLAS's
    worker threads spin after each product (the fusion's and the first stage's) and take the cores from the scoring
    calls (Flickr8K 1K x 5K exhaustive through engine.score, kernel path, 2 cores: 132 s -> 89 s). Returns the
    clause for runner.reason ("" when threadpoolctl is missing or no BLAS is loaded)."""
    if _BLAS_LIMIT:
        return _BLAS_LIMITED
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return ""
    limiter = threadpool_limits(limits=1, user_api="blas")
    if not limiter.get_original_num_threads().get("blas"):
        return ""
    _BLAS_LIMIT.append(limiter)
    return _BLAS_LIMITED


def shortlist_pairs(direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[Q * S, 2] (image row, caption row) of each query's candidates [Q, S], query by query."""
    query_column = np.repeat(np.asarray(queries, np.int64), candidates.shape[1])
    return np.stack([query_column, candidates.reshape(-1)] if direction == "i2t" else [candidates.reshape(-1), query_column], axis=1)


def pair_keys(pairs: np.ndarray, n_captions: int) -> np.ndarray:
    """[N] int64 key of each (image row, caption row) of pairs [N, 2]: image x n_captions + caption, so sorted keys
    are the pairs sorted by image, then caption (pairs_of_keys inverts it)."""
    pairs = np.asarray(pairs, np.int64)
    return pairs[:, 0] * n_captions + pairs[:, 1]


def pairs_of_keys(keys: np.ndarray, n_captions: int) -> np.ndarray:
    """[N, 2] (image row, caption row) of pair_keys' keys."""
    keys = np.asarray(keys, np.int64)
    return np.stack([keys // n_captions, keys % n_captions], axis=1)


def rank_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k best entries of each row, best first; ties keep the lower index first.
    For k well below the row length, a partition picks each row's k best and only they are sorted (1,024 x 1,024,
    k = 100: 14 ms instead of 54); a row whose k-th best value is tied with an entry left
    out is sorted whole, so the result is exactly the full stable sort's."""
    scores = np.asarray(scores)
    n = scores.shape[1] if scores.ndim == 2 else 0
    if not 0 < k < n // 4 or scores.dtype.kind != "f" or np.isnan(scores).any():
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k]
        return order, np.take_along_axis(scores, order, axis=1)
    negated = -scores
    picked = np.argpartition(negated, k - 1, axis=1)[:, :k]  # each row's k best, in no order
    values = np.take_along_axis(negated, picked, axis=1)
    kth = values.max(axis=1, keepdims=True)
    order = np.take_along_axis(picked, np.lexsort((picked, values), axis=1), axis=1)  # by value, then index
    tied = (negated <= kth).sum(axis=1) > k  # the k-th best ties with an entry the partition may have left out
    if tied.any():
        order[tied] = np.argsort(negated[tied], axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


# The first stage's dot products are computed in matmuls of at most FIRST_STAGE_TILE rows of each side, cut at multiples
# of it from each side's first row. A BLAS result depends on the call's shape (a matrix's edge columns go through other
# kernels: measured with numpy's OpenBLAS, a 4,099-image gallery cut in 256-row pieces changes some dot products by up to
# 4e-5), so with a fixed tiling every dot product comes out of a call of the same shape and has the same bits however the
# gallery is held: whole, memory-mapped, or in shards of a multiple of the tile (engine/distributed/gallery.py). The bits
# still depend on the BLAS library, the CPU's kernels and the BLAS thread count (OpenBLAS sums differently on 1 and 2
# threads), which is why Ray workers ranking shards run their BLAS with the driver's thread count.
FIRST_STAGE_TILE = 1024


def _tile(vectors: np.ndarray, rows) -> np.ndarray:
    """Rows of a [N, K] array as a C-contiguous float32 [n, K] block: every tile reaches BLAS in one layout."""
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def first_stage_dots(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right.T [len(left), len(right)] float32 (first-stage vectors [N, K]), tile by tile (FIRST_STAGE_TILE)."""
    out = np.empty((len(left), len(right)), dtype=np.float32)
    for i in range(0, len(left), FIRST_STAGE_TILE):
        block = _tile(left, slice(i, i + FIRST_STAGE_TILE))
        for j in range(0, len(right), FIRST_STAGE_TILE):
            out[i:i + FIRST_STAGE_TILE, j:j + FIRST_STAGE_TILE] = block @ _tile(right, slice(j, j + FIRST_STAGE_TILE)).T
    return out


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the union of candidate lists (indices [Q, k_i], scores [Q, k_i]; indices distinct across parts), in
    rank_rows' order: score descending, lower index first. Exact: the k best of a union lie in the union of each part's
    k best."""
    indices = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((indices, -scores), axis=1)[:, :k]  # the last key sorts first: -score, then the index
    return np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1)


def first_stage_top_k(queries: np.ndarray, others: np.ndarray, k: int, rows: np.ndarray | None = None,
                      start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k'], dot products [Q, k']), k' = min(k, len(others)): the rows of `others` (numbered from `start`)
    with the highest dot product with each query (queries[rows], default all), best first, ties to the lower row:
    rank_rows(first_stage_dots(...), k) without holding the [Q, N] matrix (one tile's similarities at a time)."""
    rows = np.arange(len(queries)) if rows is None else np.asarray(rows, dtype=np.int64)
    k = min(k, len(others))
    indices, values = np.empty((len(rows), k), dtype=np.int64), np.empty((len(rows), k), dtype=np.float32)
    for i in range(0, len(rows), FIRST_STAGE_TILE):
        block = _tile(queries, rows[i:i + FIRST_STAGE_TILE])
        best = None
        for j in range(0, len(others), FIRST_STAGE_TILE):
            found, scores = rank_rows(block @ _tile(others, slice(j, j + FIRST_STAGE_TILE)).T, k)
            best = (found + (start + j), scores) if best is None else merge_top_k([best, (found + (start + j), scores)], k)
        indices[i:i + FIRST_STAGE_TILE], values[i:i + FIRST_STAGE_TILE] = best
    return indices, values


class Scorer(Encoder):
    """An artifact, a runner, and the scoring plan (pairs per call, buckets, memory budget)."""

    def __init__(self, artifact: Artifact, runner: Runner, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                 pairs_per_call: int = DEFAULT_PAIRS_PER_CALL, buckets: bool = True, fusion: bool | Fusion = True,
                 path: str = "auto"):
        if isinstance(pairs_per_call, bool) or not isinstance(pairs_per_call, (int, np.integer)) or pairs_per_call < 1:
            raise InputError(f"pairs per call (batch size) {pairs_per_call!r}: expected an integer >= 1")
        if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float, np.number)) \
                or not np.isfinite(memory_budget_mb) or memory_budget_mb <= 0:
            raise InputError(f"memory budget {memory_budget_mb!r} MB: expected a finite number > 0")
        super().__init__(artifact, runner)
        self.memory_budget_mb, self.pairs_per_call, self.buckets = memory_budget_mb, pairs_per_call, buckets
        weights = artifact.score_weights
        self.branches = [(b, float(weights.get(b, 0.0))) for b in ("w2r", "o2w") if runner.has_graph(f"{b}_pair")]
        if not self.branches:
            raise InputError(f"{artifact.root}: no pair graph (w2r_pair / o2w_pair); expected a BSSAN artifact")
        # The product score (manifest "fusion"): first_stage_weight x dual-encoder cosine + bssan_weight x MS,
        # in every mode; fusion=False scores BSSAN alone (to measure it), a Fusion overrides the artifact's.
        self.fusion = artifact.fusion if fusion is True else BSSAN_ALONE if fusion is False else fusion
        if not isinstance(self.fusion, Fusion):
            raise InputError(f"fusion={fusion!r}: expected True (the artifact's), False (BSSAN alone) or an engine.ranking.Fusion")
        if self.fusion.uses_first_stage and not self.has_shortlist:
            raise InputError(f"{artifact.root}: fusion {self.fusion.to_dict()} uses the first stage, but the runner has no "
                             f"shortlist graphs; expected an artifact exported with --shortlist (or fusion=False)")
        self.w2r_kernel = None  # the fused W2R kernel (engine/kernels) on path "kernel"
        self.o2w_kernel = None  # and its O2W kernel, where the artifact's o2w_grid names its weights (else o2w_grid)
        self.o2w_kernel_missing = ""
        self.path, self.path_reason = self.choose_path(path)
        if self.path == "kernel" and any(b == "o2w" for b, _ in self.branches):
            self.path_reason += ("; O2W through its kernel too" if self.o2w_kernel is not None
                                 else f"; O2W through the o2w_grid graph ({self.o2w_kernel_missing})")
        runner.reason = f"{runner.reason}; scoring path: {self.path_reason}"
        # pair/grid calls in flight at once (engine/backends/onnxruntime.py: one intra-op thread per call on the CPU)
        self.concurrent_calls = max(1, int(getattr(runner, "concurrent_calls", 1)))
        if self.concurrent_calls > 1:
            runner.reason += f"; {self.concurrent_calls} pair calls at once, 1 intra-op thread each"
            runner.reason += limit_blas_threads()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.hub = artifact.hub  # the image hub correction (engine/hub.py) or None
        self._hub_captions: CaptionCache | None = None  # its bank, encoded on first use
        self._hub_images: ImageCache | None = None  # its caption side's bank images, likewise
        self._hub_lock = threading.Lock()

    def grid_available(self) -> tuple[bool, str]:
        """(True, "") when every branch's grid graph runs here at the precision of its pair graph, else (False, why not)."""
        missing = [f"{b}_grid" for b, _ in self.branches if not self.runner.has_graph(f"{b}_grid")]
        if missing:
            return False, f"the artifact has no {', '.join(missing)} at precision {self.runner.precision} for this backend"
        other = [f"{b}_grid" for b, _ in self.branches
                 if self.runner.precisions[f"{b}_grid"] != self.runner.precisions[f"{b}_pair"]]
        if other:
            return False, f"{', '.join(other)} run at another precision than the pair graphs"
        return True, ""

    def kernel_available(self) -> tuple[bool, str]:
        """(True, "") when the fused W2R kernel (engine/kernels: built for this machine, fp32, CPU) can score this
        artifact's one-image blocks and pooled pairs, O2W on its kernel too (on its graphs for an artifact exported before the
        O2W kernel); else (False, why not). Loads the kernels."""
        from engine.kernels import KernelError, O2WKernel, W2RKernel

        if self.w2r_kernel is not None:
            return True, ""
        if not any(b == "w2r" for b, _ in self.branches):
            return False, "the model has no w2r branch"
        has_grid, why_not = self.grid_available()
        if not has_grid:
            return False, why_not
        if self.runner.precision != "fp32" or self.runner.precisions.get("w2r_grid") != "fp32":
            return False, f"the kernel is fp32 and this run is {self.runner.precision}"
        if self.runner.backend is not Backend.ORT_CPU:
            return False, f"the kernel runs beside ONNX Runtime's CPU backend, not {self.runner.backend.value}"
        try:
            self.w2r_kernel = W2RKernel.from_artifact(self.artifact)
        except KernelError as exc:
            return False, str(exc)
        if any(b == "o2w" for b, _ in self.branches):
            try:
                self.o2w_kernel = O2WKernel.from_artifact(self.artifact, library=self.w2r_kernel.lib)
            except KernelError as exc:  # an artifact exported before the O2W kernel: O2W stays on its grid graph
                self.o2w_kernel, self.o2w_kernel_missing = None, str(exc)
        return True, ""

    @property
    def grid_like(self) -> bool:
        """One-image blocks go through a grid call (the grid graphs, or the kernel + o2w_grid), not the pair graphs."""
        return self.path in ("grid", "kernel")

    def choose_path(self, path: str = "auto") -> tuple[str, str]:
        """(path, reason): "grid" scores one-image blocks with the grid graphs (engine/graphs.py: no gathers, no If,
        attention inside the recurrence step), "pair" with the pair graphs, "kernel" with the fused W2R kernel
        (engine/kernels, built per machine) and the o2w grid graph. auto: what `python -m benchmarks.run` measured
        fastest for this artifact on this machine (engine.paths), else grid when the artifact has it."""
        if path not in PATHS:
            raise InputError(f"path {path!r}: expected one of {list(PATHS)}")
        has_grid, why_not = self.grid_available()
        if path == "grid" and not has_grid:
            raise InputError(f"path 'grid': {why_not}; re-export the artifact (python -m export) or use path='pair'")
        if path == "kernel":
            ok, why_not = self.kernel_available()
            if not ok:
                raise InputError(f"path 'kernel': {why_not}")
        if path != "auto":
            return path, f"{path} (requested)"
        if not has_grid:
            return "pair", f"pair graphs ({why_not})"
        from engine.paths import recorded_choice

        recorded = recorded_choice(self.fingerprint, self.runner)
        if recorded is not None:
            if recorded["path"] != "kernel":
                return recorded["path"], f"{recorded['path']} graphs ({recorded['reason']})"
            ok, why_not = self.kernel_available()
            if ok:
                return "kernel", f"fused W2R kernel ({recorded['reason']})"
            return "grid", f"grid graphs (the kernel was measured fastest here, but {why_not})"
        return "grid", ("grid graphs (they do a subset of the pair graphs' work: no gathers, no If; "
                        "python -m benchmarks.run measures the paths on this machine and records the fastest)")

    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
             memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, batch_size: int = DEFAULT_PAIRS_PER_CALL,
             buckets: bool = True, fusion: bool | Fusion = True, path: str = "auto", **runner_options) -> "Scorer":
        """Load and verify an artifact directory and open its graphs on `backend` (see engine/backends/).
        fusion: True applies the artifact's fusion weights (manifest "fusion") in every mode; False scores BSSAN alone.
        path: "auto" (see choose_path; `runner.reason` ends with the choice and why), "grid" or "pair"."""
        artifact = load_artifact(artifact_dir)
        runner = open_runner(artifact, backend, precision, threads, **runner_options)
        try:
            return cls(artifact, runner, memory_budget_mb, batch_size, buckets, fusion, path)
        except BaseException:
            runner.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        """Release the sessions and the call workers; any later scoring call raises ClosedError (engine.errors)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.runner.close()

    def _run_calls(self, calls: list, run, workers: int) -> None:
        """run(call) for every call, up to `workers` at once (in order and inline when one worker or one call).
        Each call writes its own output rows; an exception in any call is raised here."""
        if min(workers, len(calls)) <= 1 or self.runner.closed:  # closed: the first call raises ClosedError
            for call in calls:
                run(call)
            return
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrent_calls, thread_name_prefix="bssan-pairs")
            executor = self._executor
        for _ in executor.map(run, calls):
            pass

    @property
    def has_shortlist(self) -> bool:
        return self.runner.has_graph("shortlist_image") and self.runner.has_graph("shortlist_text")

    # ----------------------------------------------------------------------------- scoring
    def working_bytes(self, image_rows: int, pairs: int, words: int) -> int:
        """Bytes held during one pair call: the image rows, the padded caption block (at most one per
        pair) and the graphs' intermediates (export/graphs.py: with one image row nothing per pair is
        gathered; with several, each pair gathers its image's regions_values: engine.graphs.pair_bytes)."""
        d = self.dims
        get = lambda k: d.get(k, 0)  # noqa: E731  (single-branch artifacts lack the other branch's dims)
        item = np.dtype(FLOAT_DTYPE[self.cache_precision]).itemsize
        image_row, caption_row = self.cache_row_bytes(words)
        w2r = (get("region_count") * get("word_dim") + words * get("word_dim") + 2 * words * get("region_count")
               + words * get("w2r_values") + 2 * words * get("w2r_gates")) if "w2r_gates" in d else 0
        gathered = pair_bytes(d, pairs, 0, self.cache_precision) if "w2r_gates" in d and image_rows > 1 else 0
        o2w = (2 * get("object_count") * get("o2w_hidden") + words * get("o2w_hidden") + 2 * get("object_count") * words
               + 3 * get("object_count") * get("o2w_first")) if "o2w_hidden" in d else 0
        graph = PAIR_OVERHEAD * (pairs * (w2r + o2w) * item + gathered)
        return int(image_rows * image_row + pairs * caption_row + graph)

    def cache_row_bytes(self, words: int) -> tuple[int, int]:
        """(bytes of one image's cache row, of one caption's at `words` words): what the caches hold per item."""
        d = self.dims
        get = lambda k: d.get(k, 0)  # noqa: E731
        item = np.dtype(FLOAT_DTYPE[self.cache_precision]).itemsize
        image_row = get("region_count") * (get("word_dim") + get("w2r_values")) + get("object_count") * (get("o2w_hidden") + get("o2w_first"))
        caption_row = words * (get("word_dim") + get("w2r_gates") + get("o2w_hidden"))
        return image_row * item, caption_row * item

    def check_budget(self, n_images: int, n_captions: int, output_bytes: int = 0, words: int = 1,
                     total_words: int | None = None) -> None:
        """Before encoding anything: InputError when the budget cannot hold the caches of `n_images` images and
        `n_captions` captions holding `total_words` words in all (caption caches are ragged: one row per word;
        default one word each), `output_bytes`, and one pair call on captions of `words` words (the longest)."""
        image_row, word_row = self.cache_row_bytes(1)
        caption_bytes = (n_captions if total_words is None else max(total_words, n_captions)) * word_row
        self._fit(1, 1, words, PROCESS_BASE_MB * 2**20 + n_images * image_row + caption_bytes + output_bytes)

    def _plan_workers(self, words: int, resident: int) -> int:
        """Concurrent calls the budget holds: concurrent_calls, fewer when their smallest working sets do not fit."""
        budget = self.memory_budget_mb * 2**20 - resident
        one = max(1, self.working_bytes(1, 1, words))
        return int(max(1, min(self.concurrent_calls, budget // one)))

    def _fit(self, pairs: int, image_rows: int, words: int, resident: int, workers: int = 1) -> int:
        """The largest number of pairs per call <= `pairs` whose working set, times `workers` calls at once,
        fits the memory budget."""
        budget = (self.memory_budget_mb * 2**20 - resident) / workers
        while pairs > 1 and self.working_bytes(min(image_rows, pairs), pairs, words) > budget:
            pairs //= 2
        if self.working_bytes(1, 1, words) > budget:
            need = (resident + self.working_bytes(1, 1, words)) / 2**20
            raise InputError(f"memory budget {self.memory_budget_mb:g} MB: the process ({PROCESS_BASE_MB} MB planned), its caches "
                             f"and the output take {resident / 2**20:.0f} MB; expected a budget of at least {need:.0f} MB")
        return pairs

    @property
    def fuses(self) -> bool:
        """True when scores are fused with the first stage (anything but BSSAN alone)."""
        return self.fusion != BSSAN_ALONE

    def first_stage(self, images: ImageCache, captions: CaptionCache, image_rows: np.ndarray,
                    caption_rows: np.ndarray) -> np.ndarray:
        """Dual-encoder cosines [len(image_rows), len(caption_rows)] (unit vectors: dot products), float32."""
        self.require_shortlist()
        image_vectors = np.asarray(images.arrays["image_vectors"][image_rows], np.float32)  # [B_img, K]
        text_vectors = np.asarray(captions.arrays["text_vectors"][caption_rows], np.float32)  # [B_txt, K]
        return first_stage_dots(image_vectors, text_vectors)

    def _pair_scores(self, image_feeds: dict, caption_feeds: dict, pairs: np.ndarray) -> np.ndarray:
        """MS [N] = sum over branches of weight x branch score, minus the image's hub offset when the cache has one
        (engine/hub.py), for pairs (image row, caption row) of the feeds."""
        total = None
        available = {**image_feeds, **caption_feeds, "pairs": pairs}
        for branch, weight in self.branches:
            spec = GRAPHS[f"{branch}_pair"]
            if branch == "w2r" and self.path == "kernel":  # image and caption rows read in place, nothing gathered
                y = self.w2r_kernel.pairs(image_feeds, caption_feeds, pairs)
            elif branch == "o2w" and self.path == "kernel" and self.o2w_kernel is not None:  # likewise
                y = self.o2w_kernel.pairs(image_feeds, caption_feeds, pairs)
            else:
                y = self.runner.infer(spec.name, {n: available[n] for n in spec.input_names})["scores"]
            total = weight * y if total is None else total + weight * y
        if HUB_OFFSET in image_feeds:
            total = total - image_feeds[HUB_OFFSET][pairs[:, 0]]
        if HUB_OFFSET in caption_feeds:
            total = total - caption_feeds[HUB_OFFSET][pairs[:, 1]]
        return total.astype(np.float32, copy=False)

    def _caption_block(self, captions: CaptionCache, rows: np.ndarray, width: int | None = None) -> dict[str, np.ndarray]:
        """The caption feeds of a call: padded blocks, except on the kernel path, whose W2R (and O2W, with its kernel)
        reads the cache's word rows in place (a padded copy of 500 captions took longer than the W2R kernel scoring
        them; the O2W states' copy was 1.7 of the 37 CPU-s of Flickr8K test at K=100)."""
        if self.path == "kernel":
            from engine.kernels import FLAT_STATES, FLAT_WORDS

            flat = FLAT_WORDS + (FLAT_STATES if self.o2w_kernel is not None else ())
            return captions.block(rows, width, flat=flat)
        return captions.block(rows, width)

    def _grid_scores(self, image_feeds: dict, caption_feeds: dict) -> np.ndarray:
        """MS [B_txt] of ONE image row (image_feeds) with every caption row of caption_feeds, through the grid graphs
        (minus the image's hub offset when the cache has one)."""
        total = None
        available = {**image_feeds, **caption_feeds}
        for branch, weight in self.branches:
            spec = GRAPHS[f"{branch}_grid"]
            if branch == "w2r" and self.path == "kernel":  # reads the caption cache's word rows in place (word_offsets)
                y = self.w2r_kernel(available)
            elif branch == "o2w" and self.path == "kernel" and self.o2w_kernel is not None:  # likewise
                y = self.o2w_kernel(available)
            else:
                y = self.runner.infer(spec.name, {n: available[n] for n in spec.input_names})["scores"]
            total = weight * y if total is None else total + weight * y
        if HUB_OFFSET in image_feeds:
            total = total - image_feeds[HUB_OFFSET][0]
        if HUB_OFFSET in caption_feeds:
            total = total - caption_feeds[HUB_OFFSET]
        return total.astype(np.float32, copy=False)

    def _add_hub_offsets(self, cache: ImageCache) -> ImageCache:
        """With the artifact's hub bank (engine/hub.py): the cache gains HUB_OFFSET [N] = beta * r(i), r(i) the mean
        of image i's k highest MS over the bank's captions (its images scored once against them, BSSAN alone)."""
        if self.hub is None or HUB_OFFSET in cache.arrays or not len(cache):
            return cache
        with self._hub_lock:  # encoded once per Scorer, without offsets of their own
            if self._hub_captions is None:
                self._hub_captions = self.encode_word_features(self.hub.padded(), self.hub.lengths,
                                                               [f"hub#{i}" for i in range(len(self.hub))], hub=False)
        bank = self.score_grid(cache, self._hub_captions, fuse=False)  # no offset in the cache yet: plain MS
        cache.arrays[HUB_OFFSET] = self.hub.offsets(bank)
        return cache

    def _add_text_hub_offsets(self, cache: CaptionCache) -> CaptionCache:
        """With a hub bank that has a caption side: the cache gains HUB_OFFSET [N] = gamma * s(c), s(c) the mean of
        caption c's text_k highest MS over the bank's images (engine/hub.py)."""
        if self.hub is None or not self.hub.has_images or HUB_OFFSET in cache.arrays or not len(cache):
            return cache
        with self._hub_lock:
            if self._hub_images is None:
                self._hub_images = self.encode_image_features(self.hub.regions, self.hub.objects,
                                                              [f"hub#{i}" for i in range(len(self.hub.regions))], hub=False)
        bank = self.score_grid(self._hub_images, cache, fuse=False)  # [N_b, N_cap], plain MS
        cache.arrays[HUB_OFFSET] = self.hub.text_offsets(bank)
        return cache

    def _caption_groups(self, captions: CaptionCache, rows: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
        """(caption rows, padded words) of each block: length-sorted buckets, or the given order padded to the longest."""
        if self.buckets:
            rows = rows[np.argsort(captions.lengths[rows], kind="stable")]
            return [(rows[s:s + size], int(captions.lengths[rows[s:s + size]].max())) for s in range(0, len(rows), size)]
        width = int(captions.lengths[rows].max())
        return [(rows[s:s + size], width) for s in range(0, len(rows), size)]

    def score_grid(self, images: ImageCache, captions: CaptionCache, image_rows: np.ndarray | None = None,
                   caption_rows: np.ndarray | None = None, progress: bool = False, fuse: bool = True) -> np.ndarray:
        """Scores [len(image_rows), len(caption_rows)] float32 of every listed image x listed caption: MS,
        fused with the first stage when the scorer fuses (self.fusion) and `fuse` (False: MS alone).
        One image row per call (its regions_values shared by every pair: no gather) x a bucket of
        up to pairs_per_call captions; several image rows x fewer captions than a one-image call is worth
        (SINGLE_ROW_PAIRS_GRID, SINGLE_ROW_PAIRS on the pair path) go through score_pairs, pooled."""
        self._check_caches(images, captions)
        image_rows = np.arange(len(images)) if image_rows is None else check_rows(image_rows, len(images), "image_rows")
        caption_rows = np.arange(len(captions)) if caption_rows is None else check_rows(caption_rows, len(captions), "caption_rows")
        out = np.empty((len(image_rows), len(caption_rows)), dtype=np.float32)
        if not out.size:
            return out
        if len(image_rows) > 1 and len(caption_rows) < (SINGLE_ROW_PAIRS_GRID if self.grid_like else SINGLE_ROW_PAIRS):
            # many images x a few captions (a query's caption-side hub offsets: 32 bank images x 1 caption): one call per
            # image row would be 32 calls of one pair each; score_pairs pools them into pair-graph calls (1 caption:
            # 15.4 -> 3.0 ms, 4: 22.6 -> 14.2 ms, 16: 31 vs 32 ms; benchmarks/README.md "Scoring paths")
            pairs = np.stack(np.meshgrid(image_rows, caption_rows, indexing="ij"), axis=-1).reshape(-1, 2)
            return self.score_pairs(images, captions, pairs, progress=progress, fuse=fuse).reshape(out.shape)
        resident = resident_bytes(images, captions) + out.nbytes
        workers = self._plan_workers(captions.max_length, resident)
        block = self._fit(min(len(caption_rows), self.pairs_per_call), 1, captions.max_length, resident, workers)
        column = np.empty(len(captions), dtype=np.int64)
        column[caption_rows] = np.arange(len(caption_rows))  # caption row -> output column
        groups = self._caption_groups(captions, caption_rows, block)
        grid = self.grid_like
        with progress_bar(progress, out.size) as bar:
            def score_block(rows: np.ndarray, caption_feeds: dict, images_of_block: range) -> None:
                pairs = np.stack([np.zeros(len(rows), np.int64), np.arange(len(rows))], axis=1)  # [B_txt, 2]
                for i in images_of_block:
                    image_feeds = images.rows(image_rows[i:i + 1])
                    out[i, column[rows]] = (self._grid_scores(image_feeds, caption_feeds) if grid
                                            else self._pair_scores(image_feeds, caption_feeds, pairs))
                    bar.update(len(rows))

            if len(image_rows) >= workers:  # each caption block once; its image rows spread over the workers
                for rows, width in groups:
                    caption_feeds = self._caption_block(captions, rows, width)
                    self._run_calls([range(i, i + 1) for i in range(len(image_rows))],
                                    lambda one: score_block(rows, caption_feeds, one), workers)
            else:  # few image rows (a query): the caption blocks spread over the workers
                self._run_calls(groups, lambda group: score_block(group[0], self._caption_block(captions, *group), range(len(image_rows))),
                                workers)
        if fuse and self.fuses:
            out = self.fusion.apply(self.first_stage(images, captions, image_rows, caption_rows), out)
        return out

    def score_matrix(self, images: ImageCache, captions: CaptionCache, progress: bool = False, fuse: bool = True) -> np.ndarray:
        """Scores [N_img, N_cap] float32 of every image x every caption (MS, fused as in score_grid)."""
        return self.score_grid(images, captions, progress=progress, fuse=fuse)

    def pair_first_stage(self, images: ImageCache, captions: CaptionCache, pairs: np.ndarray) -> np.ndarray:
        """Dual-encoder cosines [N] of pairs [N, 2] (image row, caption row), float32."""
        self.require_shortlist()
        out = np.empty(len(pairs), np.float32)
        order = np.argsort(pairs[:, 0], kind="stable")
        runs = np.flatnonzero(np.diff(pairs[order, 0], prepend=-1))  # first pair of each image, in image order
        if len(pairs) >= FIRST_STAGE_RUN * len(runs):  # long runs per image (a re-rank: ~500 per image at K=100)
            # each image's vector broadcast against its captions' rows: the same row-by-row dot products (the same
            # bits: tests/engine/test_runtime.py), without gathering [N, K] image rows (1.55 of 37 CPU-s at K=100)
            ends = np.append(runs[1:], len(pairs))
            image_vectors = images.arrays["image_vectors"]
            for start in range(0, len(pairs), FIRST_STAGE_CHUNK):
                chunk = order[start:start + FIRST_STAGE_CHUNK]
                text_vectors = np.asarray(captions.arrays["text_vectors"][pairs[chunk, 1]], np.float32)  # [n, K]
                first, last = np.searchsorted(runs, start, "right") - 1, np.searchsorted(runs, start + len(chunk), "left")
                for a, b in zip(runs[first:last], ends[first:last]):
                    a, b = max(int(a), start) - start, min(int(b), start + len(chunk)) - start
                    vector = np.asarray(image_vectors[pairs[chunk[a], 0]], np.float32)
                    out[chunk[a:b]] = np.einsum("nk,nk->n", np.broadcast_to(vector, (b - a, len(vector))), text_vectors[a:b])
            return out
        for start in range(0, len(pairs), FIRST_STAGE_CHUNK):  # chunks: no [N, K] copies of both sides at once
            chunk = pairs[start:start + FIRST_STAGE_CHUNK]
            image_vectors = np.asarray(images.arrays["image_vectors"][chunk[:, 0]], np.float32)  # [n, K]
            text_vectors = np.asarray(captions.arrays["text_vectors"][chunk[:, 1]], np.float32)  # [n, K]
            out[start:start + len(chunk)] = np.einsum("nk,nk->n", image_vectors, text_vectors)  # row by row: chunking changes nothing
        return out

    def score_pairs(self, images: ImageCache, captions: CaptionCache, pairs: np.ndarray, progress: bool = False,
                    fuse: bool = True) -> np.ndarray:
        """Scores [N] (MS, fused as in score_grid) of pairs [N, 2] = (image row, caption row). Pairs are grouped by image: an image with
        at least SINGLE_ROW_PAIRS pairs (SINGLE_ROW_PAIRS_GRID on the grid path) is scored one image row per call
        (no gather; its grid graphs on the grid path); the rest are pooled, sorted by caption length (buckets),
        several image rows per call, near-equal calls of at most POOLED_PAIRS_PER_CALL pairs."""
        self._check_caches(images, captions)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        for column, n, what in ((0, len(images), "image"), (1, len(captions), "caption")):
            if pairs.size and (pairs[:, column].min() < 0 or pairs[:, column].max() >= n):
                raise InputError(f"pairs[:, {column}]: expected {what} rows in [0, {n}), got [{pairs[:, column].min()}, {pairs[:, column].max()}]")
        out = np.empty(len(pairs), dtype=np.float32)
        if not len(pairs):
            return out
        resident = resident_bytes(images, captions) + out.nbytes + pairs.nbytes
        width = None if self.buckets else captions.max_length
        workers = self._plan_workers(captions.max_length, resident)
        calls = self._pair_calls(images, captions, pairs, resident, workers)
        with progress_bar(progress, len(pairs)) as bar:
            # ONNX Runtime on the CPU reads a C-contiguous in-memory array where it lies: with several image rows a call
            # passes the whole image arrays and the graph gathers each pair's rows itself (no copy of the call's rows:
            # ~4 ms per 100-image re-rank at the reference sizes; the same rows are read, so the scores are bit-identical)
            whole = self.runner.backend is Backend.ORT_CPU and all(
                type(a) is np.ndarray and a.flags.c_contiguous for a in images.arrays.values())

            def run(chosen: np.ndarray) -> None:
                image_rows, image_pos = np.unique(pairs[chosen, 0], return_inverse=True)
                caption_rows, caption_pos = np.unique(pairs[chosen, 1], return_inverse=True)
                if self.grid_like and len(image_rows) == 1:  # one image row: its grid graph, nothing gathered
                    out[chosen] = self._grid_scores(images.rows(image_rows), self._caption_block(captions, caption_rows, width))[caption_pos.reshape(-1)]
                elif self.path == "kernel" or (whole and len(image_rows) > 1):  # the kernel reads the image rows in place
                    local = np.stack([pairs[chosen, 0], caption_pos.reshape(-1)], axis=1)  # [n, 2] (image row, caption position)
                    out[chosen] = self._pair_scores(images.arrays, self._caption_block(captions, caption_rows, width), local)
                else:
                    local = np.stack([image_pos.reshape(-1), caption_pos.reshape(-1)], axis=1)  # [n, 2]
                    out[chosen] = self._pair_scores(images.rows(image_rows), captions.block(caption_rows, width), local)
                bar.update(len(chosen))

            self._run_calls(calls, run, workers)
        if fuse and self.fuses:
            out = self.fusion.apply(self.pair_first_stage(images, captions, pairs), out)
        return out

    def _pair_calls(self, images: ImageCache, captions: CaptionCache, pairs: np.ndarray, resident: int,
                    workers: int = 1) -> list[np.ndarray]:
        """Indices into `pairs` of each call (see score_pairs); with several workers, calls are cut in halves
        (down to MIN_SPLIT_PAIRS pairs) until each worker has one."""
        lengths = captions.lengths[pairs[:, 1]] if self.buckets else np.zeros(len(pairs), np.int64)
        order = np.lexsort((lengths, pairs[:, 0]))  # by image, then caption length
        starts = np.flatnonzero(np.diff(pairs[order, 0], prepend=-1))
        single = self._fit(self.pairs_per_call, 1, captions.max_length, resident, workers)
        calls, pooled = [], []
        threshold = SINGLE_ROW_PAIRS_GRID if self.grid_like else SINGLE_ROW_PAIRS
        for group in np.split(order, starts[1:]):
            if len(group) >= threshold:
                if self.grid_like:  # length-sorted group cut where the modelled grid-call cost is lowest
                    calls += [group[chunk] for chunk in grid_chunks(lengths[group], single)]
                else:
                    calls += [group[s:s + single] for s in range(0, len(group), single)]
            else:
                pooled.append(group)
        if pooled:
            rest = np.concatenate(pooled)
            rest = rest[np.argsort(lengths[rest], kind="stable")]
            several = self._fit(min(self.pairs_per_call, POOLED_PAIRS_PER_CALL), self.pairs_per_call, captions.max_length,
                                resident, workers)
            calls += np.array_split(rest, -(-len(rest) // several))  # near-equal calls of at most `several`, length order kept
        while 0 < len(calls) < workers:  # fewer calls than workers: halve the largest while it is big enough
            largest = max(range(len(calls)), key=lambda c: len(calls[c]))
            if len(calls[largest]) < 2 * MIN_SPLIT_PAIRS:
                break
            half = len(calls[largest]) // 2
            calls[largest:largest + 1] = [calls[largest][:half], calls[largest][half:]]
        return calls

    def _check_caches(self, images: ImageCache, captions: CaptionCache) -> None:
        for cache in (images, captions):
            if cache.fingerprint != self.fingerprint or cache.precision != self.cache_precision:
                raise InputError(f"{type(cache).__name__}: encoded by artifact {cache.fingerprint[:12]} at {cache.precision}, "
                                 f"expected {self.fingerprint[:12]} at {self.cache_precision}; re-encode it with this scorer")

    # ----------------------------------------------------------------------------- ranking
    def require_shortlist(self) -> None:
        if not self.has_shortlist:
            raise InputError(f"{self.artifact.root}: no shortlist graphs (shortlist_image / shortlist_text); "
                             f"export the artifact with --shortlist DUAL_ENCODER_DIR to use a shortlist")

    def shortlist(self, images: ImageCache, captions: CaptionCache, k: int, direction: str = "i2t",
                  queries: np.ndarray | None = None) -> np.ndarray:
        """[Q, k] rows of the other side with the highest dot product of the shortlist vectors, best first."""
        self.require_shortlist()
        query_vectors, other = ((images.arrays["image_vectors"], captions.arrays["text_vectors"]) if direction == "i2t"
                                else (captions.arrays["text_vectors"], images.arrays["image_vectors"]))
        queries = (np.arange(len(query_vectors)) if queries is None
                   else check_rows(queries, len(query_vectors), f"queries ({'image' if direction == 'i2t' else 'caption'} rows)"))
        return first_stage_top_k(query_vectors, other, k, queries)[0]  # tile by tile: a [1024, 1024] block at a time

    def top_k(self, images: ImageCache, captions: CaptionCache, k: int, direction: str = "i2t",
              queries: np.ndarray | None = None, shortlist_k: int | None = None, attention: bool = False,
              progress: bool = False) -> Ranking:
        """The k best of the other side for each query (image rows for i2t, caption rows for t2i).
        Exhaustive by default; with shortlist_k, BSSAN re-scores the dot-product top shortlist_k only.
        Ranked by the product score (self.fusion: the first stage's cosine and MS fused; MS alone when not fusing)."""
        if direction not in DIRECTIONS:
            raise InputError(f"direction {direction!r}: expected one of {list(DIRECTIONS)}")
        n_query, n_other = (len(images), len(captions)) if direction == "i2t" else (len(captions), len(images))
        queries = (np.arange(n_query) if queries is None
                   else check_rows(queries, n_query, f"queries ({'image' if direction == 'i2t' else 'caption'} rows)"))
        if not 1 <= k <= n_other:
            raise InputError(f"k={k}: expected 1..{n_other} (the {'captions' if direction == 'i2t' else 'images'} to rank)")
        if shortlist_k is not None and not k <= shortlist_k <= n_other:
            raise InputError(f"shortlist_k={shortlist_k}: expected {k}..{n_other} (at least k, at most the items to rank)")
        if shortlist_k is None:
            if direction == "i2t":
                bssan = self.score_grid(images, captions, image_rows=queries, progress=progress, fuse=False)  # [Q, N_cap]
                first = self.first_stage(images, captions, queries, np.arange(len(captions))) if self.fuses else None
            else:
                bssan = self.score_grid(images, captions, caption_rows=queries, progress=progress, fuse=False).T  # [Q, N_img]
                first = self.first_stage(images, captions, np.arange(len(images)), queries).T if self.fuses else None
            scores = self.fusion.apply(first, bssan) if self.fuses else bssan
            indices, values = rank_rows(scores, k)
            ranking = Ranking(direction, queries, indices, values, bssan=np.take_along_axis(bssan, indices, 1))
        else:
            candidates = self.shortlist(images, captions, shortlist_k, direction, queries)  # [Q, S]
            pairs = shortlist_pairs(direction, queries, candidates)  # [Q * S, 2]
            bssan = self.score_pairs(images, captions, pairs, progress=progress, fuse=False)  # [Q * S]
            ranking = self.rank_candidates(images, captions, direction, queries, candidates, bssan, k)
        if attention:
            ranking.attention = self.attention(images, captions, ranking)
        return ranking

    def rank_candidates(self, images: ImageCache, captions: CaptionCache, direction: str, queries: np.ndarray,
                        candidates: np.ndarray, bssan: np.ndarray, k: int) -> Ranking:
        """The k best of each query's candidates [Q, S] (rows of the other side) by the product score, given the BSSAN
        MS of every candidate (bssan: [Q * S] or [Q, S], pairs in shortlist_pairs order): fused with the first stage
        per self.fusion; ties in the product score keep the lower row first, as in the exhaustive ranking."""
        shape = candidates.shape
        bssan = np.asarray(bssan, np.float32).reshape(-1)
        rescored = (self.fusion.apply(self.pair_first_stage(images, captions, shortlist_pairs(direction, queries, candidates)), bssan)
                    if self.fuses else bssan)
        rescored, bssan = rescored.reshape(shape), bssan.reshape(shape)
        order = np.lexsort((candidates, -rescored), axis=1)[:, :k]
        indices, values = np.take_along_axis(candidates, order, 1), np.take_along_axis(rescored, order, 1)
        return Ranking(direction, queries, indices, values, candidates, bssan=np.take_along_axis(bssan, order, 1))

    def attention(self, images: ImageCache, captions: CaptionCache, ranking: Ranking) -> list[list[dict]]:
        """Attention weights of every hit of a ranking (engine/attention.py), per query."""
        query_column = np.repeat(ranking.queries, ranking.indices.shape[1])
        hits = ranking.indices.reshape(-1)
        pairs = np.stack([query_column, hits] if ranking.direction == "i2t" else [hits, query_column], axis=1)
        flat = attention_of_pairs(self.artifact, images, captions, pairs)
        k = ranking.indices.shape[1]
        return [flat[q * k:(q + 1) * k] for q in range(len(ranking.queries))]
