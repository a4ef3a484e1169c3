"""The service's first stage: inner-product search over the shortlist vectors, on FAISS.

    index = VectorIndex("flat", dim=512)            # exact inner product (faiss.IndexFlatIP), the default
    index = VectorIndex("hnsw", dim=512, hnsw_m=32, ef_search=128)   # approximate (graph), slow to build at 1M
    index = VectorIndex("ivf", dim=512, nprobe=64)    # approximate (inverted lists), for galleries of ~1M+
    index.add(vectors)                              # [N, dim] float32; labels are 0, 1, 2, ... in order
    index.remove(labels)                            # tombstones (HNSW cannot delete); search skips them
    labels, sims = index.search(queries, k)         # [Q, k] int64 (-1 where fewer live), [Q, k] float32

Labels are positions (the gallery's slots): a vector added n-th has label n. Removal marks the
label dead in a bitmap that FAISS consults during search (IDSelectorBitmap), so results are
exactly the live top-k for the flat index; the gallery compacts (rebuilds) the index when a
quarter of it is dead. The shortlist vectors are unit vectors, so inner product = cosine.

IVF (faiss.IndexIVFFlat, inner product): exact (a flat index) until IVF_TRAIN_AT vectors are there; then
k-means on a sample of them (at most IVF_TRAIN_PER_LIST per list) cuts the space into `nlist` lists
(default: ivf_lists(n), ~sqrt(n)), every vector goes to its list, and a query scans the `nprobe`
lists nearest to it. When it has grown IVF_RETRAIN_GROWTH-fold since, it is trained again for its
new size, so lists stay ~sqrt(n) long (20k -> 80k -> 320k -> 1.28M for a gallery indexed one photo
at a time). Build time is bounded by the sample (minutes at 1M on 2 cores; HNSW took 14+ min at
efConstruction 40). A standalone index trains inside the add that makes it due; the gallery adds
with train=False (its writes hold its lock) and, when `training_due`, builds a fresh index over the
same labels in a thread while this one keeps answering (engine/serve/gallery.py, _Compaction).

FAISS indexes are not safe to add to while searching: callers serialise (engine/serve/gallery.py
holds its lock around both). Threads: adding (HNSW links, IVF k-means) uses `threads` OpenMP threads; a
search uses `search_threads` (default 1: a service runs concurrent requests on its cores, and an
OpenMP team on shared, busy cores waits at every barrier for a thread someone else preempted: a
single 30k-vector flat query took 344 ms with 2 threads at load 15). omp_set_num_threads is per
calling thread (an OpenMP ICV), so it is set before each add and each search.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InputError

INDEX_KINDS = ("flat", "hnsw", "ivf")
DEFAULT_HNSW_M = 32  # links per node (FAISS's usual value); recall and speed at 1M: benchmarks/load_test.py
# Graph quality vs build time: at 1M x 512 synthetic vectors, 40 gave recall@100 0.78-0.90 (efSearch 64-512) after a
# 14 min build on 2 loaded cores; build time grows ~linearly with it (benchmarks/load_test.py, results/serve/).
DEFAULT_EF_CONSTRUCTION = 100
DEFAULT_EF_SEARCH = 128  # candidates kept per query; must be >= k (raised to k per search when smaller)
DEFAULT_NPROBE = 32  # IVF lists scanned per query (recall vs ms at 1M: benchmarks/load_test.py, results/serve/)
IVF_TRAIN_AT = 20_000  # below this many vectors an IVF index searches exactly (flat); at it, it is trained
IVF_RETRAIN_GROWTH = 4  # a trained IVF index is trained again (lists for the new size) when it has grown 4x
IVF_TRAIN_PER_LIST = 64  # k-means sample: at most this many vectors per list (FAISS warns below 39)


IVF_TRAIN_ITERATIONS = 10  # k-means iterations (FAISS's default 25: 2.5x the training time for no recall measured)


def ivf_lists(n: int) -> int:
    """Lists of an IVF index trained on n vectors: the power of two nearest sqrt(n), in [64, 65536]. At 1M: 1,024
    lists of ~1,000 vectors; nprobe 64 scans ~6% of the vectors (benchmarks/load_test.py measures recall and ms)."""
    return int(min(65536, max(64, 2 ** round(np.log2(np.sqrt(max(n, 1)))))))


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
                 ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH, threads: int | None = None,
                 nprobe: int = DEFAULT_NPROBE, nlist: int | None = None, train_at: int = IVF_TRAIN_AT, search_threads: int = 1):
        if kind not in INDEX_KINDS:
            raise InputError(f"index kind {kind!r}: expected one of {list(INDEX_KINDS)}")
        if dim < 1:
            raise InputError(f"index dim {dim}: expected a positive vector size")
        faiss = _faiss()
        self.threads, self.search_threads = int(threads) if threads else None, max(1, int(search_threads))
        self.kind, self.dim, self.ef_search = kind, dim, ef_search
        self.hnsw_m, self.ef_construction = int(hnsw_m), int(ef_construction)
        self.nprobe, self.nlist, self.fixed_nlist, self.train_at, self.trained_at = nprobe, nlist, nlist, max(1, train_at), 0
        self.trained = kind != "ivf"  # an IVF index is a flat one until train_at vectors are there
        if kind in ("flat", "ivf"):
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

    @property
    def training_due(self) -> bool:
        """An IVF index that reached train_at untrained, or has grown IVF_RETRAIN_GROWTH-fold since its training."""
        return self.kind == "ivf" and len(self) >= (IVF_RETRAIN_GROWTH * self.trained_at if self.trained else self.train_at)

    def add(self, vectors: np.ndarray, train: bool = True) -> np.ndarray:
        """Append [N, dim] vectors; returns their labels. train=False: never (re)train here, even when due
        (the caller rebuilds off its lock: training takes minutes at 1M)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)  # [N, dim]
        start = len(self)
        if self.threads:
            _faiss().omp_set_num_threads(self.threads)
        self.index.add(vectors)
        self.live = np.concatenate([self.live, np.ones(len(vectors), np.uint8)])
        if train and self.training_due:
            self._train_ivf()
        return np.arange(start, start + len(vectors), dtype=np.int64)

    def _train_ivf(self) -> None:
        """Replace the index by an IVF one trained on (a sample of) its vectors; labels stay positions. With a fixed
        --ivf-lists (self.fixed_nlist) the list count stays; else it is ivf_lists(n) of the size now."""
        faiss = _faiss()
        vectors = self.index.reconstruct_n(0, len(self))  # [N, dim] (an IVF index keeps a direct map for this)
        nlist = self.fixed_nlist or ivf_lists(len(vectors))
        sample = min(len(vectors), IVF_TRAIN_PER_LIST * nlist)
        chosen = np.sort(np.random.default_rng(0).choice(len(vectors), sample, replace=False))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.train(vectors[chosen])
        index.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct_n for the next retraining
        index.add(vectors)
        self.index, self.nlist, self.trained, self.trained_at = index, nlist, True, len(vectors)

    def build_record(self) -> dict:
        """What this index was built as: kind, dim, build options, size and (IVF) its training; saved beside it."""
        record = {"kind": self.kind, "dim": self.dim, "count": len(self), "trained": self.trained, "trained_at": self.trained_at,
                  "nlist": self.nlist, "fixed_nlist": self.fixed_nlist, "faiss": getattr(_faiss(), "__version__", "?")}
        if self.kind == "hnsw":
            record.update(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction)
        return record

    def copy(self) -> "VectorIndex":
        """An independent copy (faiss.clone_index: the vectors and links again in memory), to save while this one
        keeps taking adds."""
        import copy

        out = copy.copy(self)
        out.index = _faiss().clone_index(self.index)
        out.live = self.live.copy()
        return out

    def save(self, path) -> None:
        """The FAISS index to `path` (faiss.write_index into a temp file, fsynced, renamed: a reader sees the old file or
        the new one). With build_record(), what load() needs. Every label, removed ones too: removals are a mask
        (`live`), not part of the file; the caller says them again after load() (engine.serve.gallery: the snapshot's
        dead slots)."""
        from engine.files import atomic_path

        with atomic_path(path) as tmp:
            _faiss().write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path, record: dict, **options) -> "VectorIndex":
        """The index save() wrote, built as `record` (its build_record()) says; search-time options (ef_search, nprobe,
        threads) from `options`. InputError if the file is not that index (callers check its sha256 first: FAISS may
        not survive reading a damaged file)."""
        faiss = _faiss()
        out = cls(record["kind"], int(record["dim"]), **options)
        try:
            index = faiss.read_index(str(path))  # the concrete class (IndexHNSWFlat, IndexIVFFlat), owned by the proxy
        except RuntimeError as exc:
            raise InputError(f"{path}: FAISS cannot read it ({str(exc).splitlines()[0][:200]})") from None
        if index.ntotal != record["count"] or index.d != out.dim:
            raise InputError(f"{path}: {index.ntotal} vectors of dim {index.d}; expected {record['count']} of dim {out.dim}")
        out.index = index
        out.trained, out.trained_at, out.nlist = bool(record["trained"]), int(record["trained_at"]), record["nlist"]
        out.live = np.ones(index.ntotal, dtype=np.uint8)
        return out

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
        faiss.omp_set_num_threads(self.search_threads)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
        elif self.kind == "ivf" and self.trained:
            params = faiss.SearchParametersIVF()
            params.nprobe = min(self.nprobe, self.nlist)
        elif not self.dead:  # flat, nothing removed: no parameters to pass
            sims, labels = self.index.search(queries, k)
            return labels.astype(np.int64, copy=False), sims.astype(np.float32, copy=False)
        else:
            params = faiss.SearchParameters()
        bitmap = None
        if self.dead:
            bitmap = np.packbits(self.live, bitorder="little")  # FAISS reads bit (label & 7) of byte label >> 3
            params.sel = faiss.IDSelectorBitmap(len(self.live), faiss.swig_ptr(bitmap))
        sims, labels = self.index.search(queries, k, params=params)
        del bitmap  # kept alive until FAISS is done with it
        return labels.astype(np.int64), sims.astype(np.float32)
