"""The HTTP service: a FastAPI app over one SearchService (OpenAPI docs at /docs and /openapi.json).

    app = create_app(ServeConfig(model=Path("build/artifacts/reference"), gallery=Path("photos")))
    uvicorn.run(app, host="127.0.0.1", port=8080)        # what `python -m engine.serve` does

Endpoints (JSON unless said):
    GET  /                      the search page (engine/serve/static/index.html)
    GET  /docs                  Swagger UI, its assets served by this process (/docs-static/): works offline
    GET  /healthz               200 while the process serves
    GET  /readyz                200 once the gallery folder is indexed; 503 with the progress before
    GET  /metrics               Prometheus text: request latency histogram, queue depth, pairs scored, gallery size
    GET  /v1/info               model, gallery size, captions, limits, first stage, batching
    POST /v1/search             {"text", "top_k", "rerank_k", "attention"} -> ranked gallery images
    POST /v1/captions           multipart: image file + top_k, rerank_k, attention -> ranked captions
    POST /v1/score              {"pairs": [{"image_id", "caption"}], "attention"} -> BSSAN scores
    GET  /v1/images             ids in the gallery (offset, limit)
    GET  /v1/images/{id}        the photo
    PUT  /v1/images/{id}        multipart image file: add or replace (API key)
    DELETE /v1/images/{id}      remove (API key)

Errors are {"error": "<field>: <what was expected, what was got>"} with a 4xx status; anything
unexpected is a 500 {"error": "internal error"} (the traceback goes to the server log only).
Writes need the API key (X-API-Key header, compared in constant time) when one is configured;
with none configured the service is read-only.
"""

from __future__ import annotations

import hmac
import io
import logging
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import BssanError, ImageError
from engine.serve.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, DEFAULT_WORKERS, MicroBatcher
from engine.serve.errors import Forbidden, NotFound, RequestError, TooLarge, Unauthorized, Unsupported
from engine.serve.gallery import check_image_id
from engine.serve.index import DEFAULT_NPROBE
from engine.serve.metrics import ServiceMetrics
from engine.serve.service import ImageQuery, Limits, TextQuery
from engine.text import tokenize

log = logging.getLogger("engine.serve")
STATIC = Path(__file__).resolve().parent / "static"
DOCS_STATIC = "/docs-static"  # Swagger UI's JavaScript, CSS and favicon (no CDN)
IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass
class ServeConfig:
    """What `python -m engine.serve` passes to create_app (engine/serve/__main__.py documents each)."""

    model: Path
    gallery: Path | None = None
    index_dir: Path | None = None  # default: <gallery>/.bssan-index
    import_store: Path | None = None  # a feature store whose features of the gallery's images are imported (engine/serve/state.py)
    captions: Path | None = None
    backend: str = "onnxruntime-cpu"
    precision: str = "fp32"
    threads: int | None = 2
    path: str = "auto"  # the Scorer's scoring path (engine.runtime.PATHS): auto takes what benchmarks.run recorded
    index_kind: str = "flat"
    gallery_rows: str = "fp32"  # fp16: the gallery stores regions_attn / regions_values at half the memory (W2R kernel path)
    hnsw_m: int = 32
    ef_search: int = 128
    nprobe: int = DEFAULT_NPROBE
    ivf_lists: int | None = None
    batching: bool = True
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    batch_workers: int = DEFAULT_WORKERS
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    progress: bool = True


# ---------------------------------------------------------------------------------------------- request bodies
class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    top_k: StrictInt = 10
    rerank_k: StrictInt = 100
    attention: StrictBool = False


class PairBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_id: StrictStr
    caption: StrictStr


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[PairBody]
    attention: StrictBool = False


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    return ".".join(parts) or "body"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


# ---------------------------------------------------------------------------------------------- checks
class Checks:
    def __init__(self, limits: Limits, max_words: int):
        self.limits, self.max_words = limits, max_words

    def caption(self, text: str, name: str) -> str:
        if len(text) > self.limits.max_caption_chars:
            raise RequestError(f"{name}: {len(text)} characters; expected at most {self.limits.max_caption_chars}")
        if not tokenize(text, self.max_words):
            raise RequestError(f"{name}: no word in {text[:40]!r}; expected at least one word")
        return text

    def ks(self, top_k: int, rerank_k: int) -> None:
        if not 1 <= top_k <= self.limits.max_top_k:
            raise RequestError(f"top_k: {top_k}; expected 1..{self.limits.max_top_k}")
        if not top_k <= rerank_k <= self.limits.max_rerank_k:
            raise RequestError(f"rerank_k: {rerank_k}; expected top_k ({top_k})..{self.limits.max_rerank_k}")

    def image(self, data: bytes, name: str = "image") -> str:
        """The file suffix of an uploaded image after checking its header (format, pixel count)."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise RequestError(f"{name}: empty file; expected an image (JPEG, PNG, ...)")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                fmt = image.format
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise Unsupported(f"{name}: not an image file; expected one of {', '.join(IMAGE_FORMATS)}") from None
        if fmt not in IMAGE_FORMATS:
            raise Unsupported(f"{name}: format {fmt}; expected one of {', '.join(IMAGE_FORMATS)}")
        if width * height > self.limits.max_image_pixels:
            raise TooLarge(f"{name}: {width}x{height} = {width * height / 1e6:.1f} MP; expected at most "
                           f"{self.limits.max_image_pixels / 1e6:g} MP")
        return IMAGE_FORMATS[fmt]


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        chunks, total, more = [], 0, True
        while more:  # read (bounded) before the app sees it: a chunked upload is cut off at the limit too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._refuse(send, total)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int):
        response = JSONResponse({"error": f"body: {size} bytes or more; expected at most {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


class RequestTiming:
    """ASGI middleware: each HTTP request's latency into `metrics`, labelled by its route's path template. Plain ASGI
    (as BodyLimit): starlette's @app.middleware("http") runs every request through an extra task and memory streams."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts (an unhandled error is answered outside)

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:  # the router put the matched route into this scope
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), scope["method"], status, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- the app
def create_app(config: ServeConfig, state=None) -> FastAPI:
    """The app; its lifespan loads the model and the gallery (or takes `state`, a ServiceState, for tests)."""
    from engine.serve.state import ServiceState

    holder: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = state if state is not None else await run_in_threadpool(ServiceState.load, config)
        holder["state"] = svc
        metrics.attach(svc)
        svc.text_batcher = MicroBatcher(svc.service.search_texts, config.max_batch, config.max_wait_ms, config.batching,
                                        on_batch=metrics.observe_batch, workers=config.batch_workers)
        svc.image_batcher = MicroBatcher(svc.service.rank_captions, config.max_batch, config.max_wait_ms, config.batching,
                                         on_batch=metrics.observe_batch, workers=config.batch_workers)
        await svc.text_batcher.start()
        await svc.image_batcher.start()
        svc.start_indexing()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish; stop the batchers, then checkpoint the gallery
            await svc.text_batcher.stop()
            await svc.image_batcher.stop()
            await run_in_threadpool(svc.close)

    # /docs is Swagger UI served from this process (fastapi-offline's bundled swagger-ui 5 assets under
    # DOCS_STATIC): the page works without internet (FastAPI's default loads them from a CDN).
    app = FastAPIOffline(title="BSSAN image-text search", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                         static_url=DOCS_STATIC, swagger_ui_parameters={"validatorUrl": None},
                         description="Text -> images and image -> captions with a FAISS first stage and BSSAN re-ranking.")
    metrics = ServiceMetrics()
    checks_holder: dict = {}

    def svc():
        return holder["state"]

    def checks() -> Checks:
        if "checks" not in checks_holder:
            checks_holder["checks"] = Checks(config.limits, svc().scorer.dims["max_words"])
        return checks_holder["checks"]

    def require_key(key: str | None) -> None:
        if config.api_key is None:
            raise Forbidden("X-API-Key: this server is read-only (no API key configured); start it with --api-key-file to allow writes")
        if key is None:
            raise Unauthorized("X-API-Key: missing; expected the header X-API-Key with the server's key")
        if not hmac.compare_digest(key.encode("utf-8"), config.api_key.encode("utf-8")):
            raise Unauthorized("X-API-Key: wrong key")

    # ---- errors: one JSON line, never a traceback
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": _one_line(str(exc))}, status_code=exc.status)

    @app.exception_handler(BssanError)
    async def _engine_error(request: Request, exc: BssanError):
        status = 415 if isinstance(exc, ImageError) else 400
        return JSONResponse({"error": _one_line(str(exc))}, status_code=status)

    @app.exception_handler(KeyError)
    async def _unknown(request: Request, exc: KeyError):
        return JSONResponse({"error": _one_line(exc.args[0] if exc.args else "not found")}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            message = f"body: malformed JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        elif first.get("type") == "missing":
            message = f"{_field(first['loc'])}: missing; expected this field"
        else:
            got = first.get("input")
            got = f"; got {got!r}"[:80] if not isinstance(got, (dict, list)) else f"; got {type(got).__name__}"
            message = f"{_field(first['loc'])}: {first.get('msg', 'invalid')}{got}"
        return JSONResponse({"error": _one_line(message)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": _one_line(f"{request.url.path}: {exc.detail}")}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500)

    app.add_middleware(RequestTiming, metrics=metrics)
    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)

    # ---- page, health, metrics
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness: 200 while the process serves")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once the gallery folder is indexed")
    def readyz():
        state_ = holder.get("state")
        if state_ is None or not state_.ready:
            progress = state_.progress if state_ is not None else {"indexed": 0, "total": None}
            return JSONResponse({"ready": False, **progress}, status_code=503)
        return {"ready": True, "gallery": len(state_.gallery)}

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/info", summary="Model, gallery, caption collection, limits, first stage and batching")
    def info():
        s = svc()
        return {"model": str(config.model), "fingerprint": s.scorer.fingerprint[:12], "backend": s.scorer.runner.reason,
                "gallery": len(s.gallery), "gallery_rows": config.gallery_rows, "captions": len(s.service.captions) if s.service.captions is not None else 0,
                "first_stage": {"kind": config.index_kind, "hnsw_m": config.hnsw_m, "ef_search": config.ef_search,
                                "nprobe": config.nprobe, "ivf_lists": s.gallery.index.nlist if s.gallery.index is not None else None},
                "batching": {"enabled": config.batching, "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                             "workers": config.batch_workers},
                "limits": vars(config.limits), "writes": config.api_key is not None, "ready": s.ready}

    # ---- reading
    @app.post("/v1/search", summary="Text -> the gallery's top_k images (FAISS top rerank_k, re-ranked by BSSAN)")
    async def search(body: SearchBody):
        c = checks()
        c.caption(body.text, "text")
        c.ks(body.top_k, body.rerank_k)
        return await svc().text_batcher.submit(TextQuery(body.text, body.top_k, body.rerank_k, body.attention))

    @app.post("/v1/captions", summary="Uploaded image -> the caption collection's top_k captions")
    async def captions(image: UploadFile = File(..., description="an image file (JPEG, PNG, ...)"),
                       top_k: int = Form(10), rerank_k: int = Form(100), attention: bool = Form(False)):
        c = checks()
        c.ks(top_k, rerank_k)
        data = await image.read()
        suffix = c.image(data)
        with tempfile.TemporaryDirectory(prefix="bssan-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            result = await svc().image_batcher.submit(ImageQuery(path, top_k, rerank_k, attention))
        return result

    @app.post("/v1/score", summary="BSSAN scores of explicit (gallery image id, caption) pairs, attention on request")
    def score(body: ScoreBody):
        c = checks()
        if not 1 <= len(body.pairs) <= config.limits.max_pairs:
            raise RequestError(f"pairs: {len(body.pairs)} pairs; expected 1..{config.limits.max_pairs}")
        for i, pair in enumerate(body.pairs):
            c.caption(pair.caption, f"pairs[{i}].caption")
        return {"results": svc().service.score_pairs([(p.image_id, p.caption) for p in body.pairs], body.attention)}

    @app.get("/v1/images", summary="Ids in the gallery")
    def list_images(offset: int = 0, limit: int = 100):
        if offset < 0 or not 1 <= limit <= 10_000:
            raise RequestError(f"offset {offset}, limit {limit}: expected offset >= 0 and limit 1..10000")
        ids = svc().gallery.ids()
        return {"count": len(ids), "ids": ids[offset:offset + limit]}

    @app.get("/v1/images/{image_id}", summary="The photo of a gallery image")
    def photo(image_id: str):
        path = svc().gallery.photo_path(image_id, svc().folder)
        if path is None:
            raise NotFound(f"image_id: {image_id!r} is not in the gallery (or its photo file is gone)")
        return FileResponse(path)

    # ---- writing (API key)
    @app.put("/v1/images/{image_id}", summary="Add or replace an image (needs the API key)", status_code=200)
    async def put_image(image_id: str, image: UploadFile = File(...), x_api_key: str | None = Header(None)):
        require_key(x_api_key)
        try:
            check_image_id(image_id)
        except BssanError as exc:
            raise RequestError(f"image_id: {exc}") from None
        data = await image.read()
        suffix = checks().image(data)
        replaced = await run_in_threadpool(svc().put_photo, image_id, data, suffix)
        return JSONResponse({"id": image_id, "replaced": replaced, "gallery": len(svc().gallery)},
                            status_code=200 if replaced else 201)

    @app.delete("/v1/images/{image_id}", summary="Remove an image (needs the API key)")
    async def delete_image(image_id: str, x_api_key: str | None = Header(None)):
        require_key(x_api_key)
        if not await run_in_threadpool(svc().gallery.remove, image_id):
            raise NotFound(f"image_id: {image_id!r} is not in the gallery")
        return {"id": image_id, "removed": True, "gallery": len(svc().gallery)}

    app.state.holder = holder
    return app
