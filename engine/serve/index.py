"""The service's first stage: inner-product search over the shortlist vectors, on FAISS.

    index = VectorIndex("flat", dim=512)            # exact inner product (faiss.IndexFlatIP), the default
    index = VectorIndex("hnsw", dim=512, hnsw_m=32, ef_search=128)   # approximate, for galleries of ~1M+
    index.add(vectors)                              # [N, dim] float32; labels are 0, 1, 2, ... in order
    index.remove(labels)                            # tombstones (HNSW cannot delete); search skips them
    labels, sims = index.search(queries, k)         # [Q, k] int64 (-1 where fewer live), [Q, k] float32

Labels are positions (the gallery's slots): a vector added n-th has label n. Removal marks the
label dead in a bitmap that FAISS consults during search (IDSelectorBitmap), so results are
exactly the live top-k for the flat index; the gallery compacts (rebuilds) the index when a
quarter of it is dead. The shortlist vectors are unit vectors, so inner product = cosine.

FAISS indexes are not safe to add to while searching: callers serialise (engine/serve/gallery.py
holds its lock around both). FAISS's own OpenMP threads are capped by `threads`.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InputError

INDEX_KINDS = ("flat", "hnsw")
DEFAULT_HNSW_M = 32  # links per node (FAISS's usual value); recall and speed at 1M: benchmarks/load_test.py
# Graph quality vs build time: at 1M x 512 synthetic vectors, 40 gave recall@100 0.78-0.90 (efSearch 64-512) after a
# 14 min build on 2 loaded cores; build time grows ~linearly with it (benchmarks/load_test.py, results/serve/).
DEFAULT_EF_CONSTRUCTION = 100
DEFAULT_EF_SEARCH = 128  # candidates kept per query; must be >= k (raised to k per search when smaller)


_FAISS = None


def _faiss():
    global _FAISS
    if _FAISS is None:
        try:
            import faiss
        except ImportError:  # pragma: no cover - the serve extra installs it
            raise InputError("the first-stage index needs FAISS; install the serve extra: pip install 'bssan-engine[serve]'") from None
        _FAISS = faiss
    return _FAISS


class VectorIndex:
    """Inner-product top-k over float32 vectors with positional labels and tombstones."""

    def __init__(self, kind: str = "flat", dim: int = 0, hnsw_m: int = DEFAULT_HNSW_M,
                 ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH, threads: int | None = None):
        if kind not in INDEX_KINDS:
            raise InputError(f"index kind {kind!r}: expected one of {list(INDEX_KINDS)}")
        if dim < 1:
            raise InputError(f"index dim {dim}: expected a positive vector size")
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.kind, self.dim, self.ef_search = kind, dim, ef_search
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
        self.live = np.zeros(0, dtype=np.uint8)  # one byte per label (1 = live); packed into bits per search
        self.dead = 0

    def __len__(self) -> int:
        """Labels handed out (live and dead)."""
        return int(self.index.ntotal)

    @property
    def live_count(self) -> int:
        return len(self) - self.dead

    def add(self, vectors: np.ndarray) -> np.ndarray:
        """Append [N, dim] vectors; returns their labels."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)  # [N, dim]
        start = len(self)
        self.index.add(vectors)
        self.live = np.concatenate([self.live, np.ones(len(vectors), np.uint8)])
        return np.arange(start, start + len(vectors), dtype=np.int64)

    def remove(self, labels) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        newly = labels[self.live[labels] == 1]
        self.live[newly] = 0
        self.dead += len(np.unique(newly))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, k] labels (best first; -1 past the live count) and [Q, k] inner products."""
        faiss = _faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # [Q, dim]
        k = max(1, int(k))
        params = faiss.SearchParametersHNSW() if self.kind == "hnsw" else faiss.SearchParameters()
        if self.kind == "hnsw":
            params.efSearch = max(self.ef_search, k)
        bitmap = None
        if self.dead:
            bitmap = np.packbits(self.live, bitorder="little")  # FAISS reads bit (label & 7) of byte label >> 3
            params.sel = faiss.IDSelectorBitmap(len(self.live), faiss.swig_ptr(bitmap))
        sims, labels = self.index.search(queries, k, params=params)
        del bitmap  # kept alive until FAISS is done with it
        return labels.astype(np.int64), sims.astype(np.float32)
