"""`python -m engine.serve`: parse the command line, then run the app under uvicorn.

    python -m engine.serve --model ARTIFACT --gallery DIR [--index DIR] [--import-store STORE] [--captions FILE]
        [--host 127.0.0.1] [--port 8080] [--backend onnxruntime-cpu] [--precision fp32] [--threads 2]
        [--index-kind flat|hnsw|ivf] [--hnsw-m 32] [--ef-search 128] [--nprobe 32] [--ivf-lists N]
        [--batching on|off] [--max-batch 16] [--max-wait-ms 5] [--batch-workers 2]
        [--api-key-file FILE]   (or the environment variable BSSAN_API_KEY; without either: read-only)
        [--max-body-mb 10] [--max-image-mp 40] [--max-caption-chars 1000] [--max-top-k 100] [--max-rerank-k 1000]

The gallery folder's images are indexed on the first start (progress bar; resumable: kill it and
start it again), into --index (default DIR/.bssan-index); --import-store takes the images a feature
store holds from their stored features instead (engine/serve/state.py). SIGINT/SIGTERM: in-flight requests
finish, the gallery is checkpointed, then the process exits. Bad arguments print one line, exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from engine.cli import ArgumentParser, command, nonnegative_float, positive_float, positive_int
from engine.errors import InputError
from engine.graphs import PRECISIONS
from engine.runtime import PATHS
from engine.serve.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, DEFAULT_WORKERS
from engine.serve.index import DEFAULT_EF_SEARCH, DEFAULT_HNSW_M, DEFAULT_NPROBE, INDEX_KINDS
from engine.serve.service import Limits
from engine.serve.state import GALLERY_ROWS

API_KEY_ENV = "BSSAN_API_KEY"
GRACEFUL_SECONDS = 30  # longest wait for in-flight requests at shutdown (a K=1000 re-rank takes ~1 s)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="artifact directory (python -m export), with shortlist graphs")
    p.add_argument("--gallery", type=Path, help="folder of images, indexed on the first start")
    p.add_argument("--index", type=Path, help="gallery index folder (default: GALLERY/.bssan-index)")
    p.add_argument("--import-store", type=Path, help="feature store (python -m engine.features) of the model's pipeline: the gallery "
                   "folder's images it holds are encoded from its features on the first start (minutes for thousands)")
    p.add_argument("--captions", type=Path, help="caption collection for image -> captions: one caption a line")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, default=8080)
    p.add_argument("--backend", default="onnxruntime-cpu", help="engine backend (auto, onnxruntime-cpu, ...)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--threads", type=positive_int, default=2, help="intra-op threads of the engine and FAISS")
    p.add_argument("--path", default="auto", choices=PATHS, help="what scores BSSAN pairs: the grid/pair ONNX graphs or the "
                   "fused W2R kernel (python -m engine.kernels build); auto: the fastest python -m benchmarks.run recorded here")
    p.add_argument("--index-kind", default="flat", choices=INDEX_KINDS, help="flat: exact inner product; hnsw, ivf: approximate (engine/serve/index.py)")
    p.add_argument("--gallery-rows", default="fp32", choices=GALLERY_ROWS, help="fp16: the gallery keeps each image's W2R rows "
                   "(regions_attn, regions_values) at half the memory; needs --path kernel; scores move by ~1e-3 (README)")
    p.add_argument("--hnsw-m", type=positive_int, default=DEFAULT_HNSW_M)
    p.add_argument("--ef-search", type=positive_int, default=DEFAULT_EF_SEARCH, help="HNSW: candidates kept per query")
    p.add_argument("--nprobe", type=positive_int, default=DEFAULT_NPROBE, help="IVF: lists scanned per query")
    p.add_argument("--ivf-lists", type=positive_int, help="IVF: lists (default: ~4 sqrt(gallery size) when it is trained)")
    p.add_argument("--batching", default="on", choices=("on", "off"), help="micro-batching of concurrent queries")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, help="requests per scorer call at most")
    p.add_argument("--max-wait-ms", type=nonnegative_float, default=DEFAULT_MAX_WAIT_MS, help="longest wait of a batch's first request")
    p.add_argument("--batch-workers", type=positive_int, default=DEFAULT_WORKERS, help="batches scored at once")
    p.add_argument("--api-key-file", type=Path, help=f"file holding the key for writes (else ${API_KEY_ENV}; none: read-only)")
    limits = Limits()
    p.add_argument("--max-body-mb", type=positive_float, default=limits.max_body_bytes / 2**20)
    p.add_argument("--max-image-mp", type=positive_float, default=limits.max_image_pixels / 1e6)
    p.add_argument("--max-caption-chars", type=positive_int, default=limits.max_caption_chars)
    p.add_argument("--max-top-k", type=positive_int, default=limits.max_top_k)
    p.add_argument("--max-rerank-k", type=positive_int, default=limits.max_rerank_k)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar while indexing")
    return p.parse_args(argv)


def config_from_args(args):
    from engine.serve.app import ServeConfig

    key = os.environ.get(API_KEY_ENV) or None
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(f"--api-key-file {args.api_key_file}: cannot read ({exc.strerror})") from None
        if len(key) < 16:
            raise InputError(f"--api-key-file {args.api_key_file}: key of {len(key)} characters; expected at least 16")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=int(args.max_image_mp * 1e6),
                    max_caption_chars=args.max_caption_chars, max_top_k=args.max_top_k, max_rerank_k=args.max_rerank_k)
    return ServeConfig(model=args.model, gallery=args.gallery, index_dir=args.index, import_store=args.import_store, captions=args.captions,
                       backend=args.backend, precision=args.precision, threads=args.threads, path=args.path, index_kind=args.index_kind, gallery_rows=args.gallery_rows,
                       hnsw_m=args.hnsw_m, ef_search=args.ef_search, nprobe=args.nprobe, ivf_lists=args.ivf_lists, batching=args.batching == "on",
                       max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batch_workers=args.batch_workers,
                       api_key=key, limits=limits,
                       progress=not args.no_progress)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    import uvicorn

    from engine.serve.app import create_app
    from engine.serve.state import ServiceState

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServiceState.load(config)  # before binding the port: a bad artifact or gallery is a one-line error
    uvicorn.run(create_app(config, state=state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=GRACEFUL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
