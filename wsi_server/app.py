"""The ASGI application, built by ``create_app(settings)``: no module-level state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wsi_server import codecs
from wsi_server.cache import MemoryCache, NullCache, TileCache
from wsi_server.errors import (
    BadRequest,
    NotFound,
    SlideNotFound,
    UnreadableSlide,
    UnsupportedSlide,
    WsiServerError,
    error_body,
)
from wsi_server.geometry import GeometryParams, dzi_xml
from wsi_server.library import Library, SlideEntry
from wsi_server.metrics import Metrics, ServerTimingMiddleware, server_timing
from wsi_server.pool import ReaderPool
from wsi_server.readers import ReaderRegistry, default_registry
from wsi_server.settings import Settings
from wsi_server.tiles import GeometryKind, TileService, etag_for
from wsi_server.warm import DEFAULT_WARM_LEVELS, warm

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TILE = re.compile(r"^(\d{1,9})_(\d{1,9})\.([a-z]{1,8})$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, no-cache"
PRIVATE = "private, max-age=300"


def build_cache(settings: Settings) -> TileCache:
    """The tile cache the settings ask for (Redis tiers plug in here)."""
    if settings.redis_url:
        from wsi_server.cache.redis import build_tiered_cache  # issue: Redis tier

        return build_tiered_cache(settings)
    if settings.cache_size > 0:
        return MemoryCache(settings.cache_size * 2**20)
    return NullCache()


def _error_response(exc: WsiServerError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status)


def slide_summary(entry: SlideEntry) -> dict[str, Any]:
    meta = entry.metadata
    out: dict[str, Any] = {
        "id": entry.id,
        "name": entry.name,
        "status": entry.status,
        "size_bytes": entry.size_bytes,
        "version": entry.fingerprint,
    }
    if meta is None:
        err = entry.error
        out.update(
            format=None, vendor=None, width=None, height=None, level_count=0, mpp=None,
            objective_power=None,
            error={"error": err.code, "detail": err.detail} if err else None,
        )
        return out
    out.update(
        format=meta.format,
        vendor=meta.vendor,
        width=meta.width,
        height=meta.height,
        level_count=len(meta.levels),
        mpp=list(meta.mpp) if meta.mpp else None,
        objective_power=meta.objective_power,
    )
    return out


def create_app(
    settings: Settings,
    registry: ReaderRegistry | None = None,
    cache: TileCache | None = None,
) -> Starlette:
    registry = registry or default_registry()
    pool = ReaderPool(registry, settings.pool_size)
    isolation = _IsolatedProbe(settings.ingest_validate_timeout) if settings.isolate_open else None
    library = Library(settings.paths, pool, convert_dir=settings.convert_dir, probe=isolation)
    metrics = Metrics()
    threads = settings.render_threads or os.cpu_count() or 2
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-render")
    tile_cache = cache or build_cache(settings)
    service = TileService(
        library,
        tile_cache,
        executor,
        GeometryParams(settings.tile_size, settings.overlap, settings.limit_bounds),
        settings.jpeg_quality,
        metrics,
    )
    hidden = {"label", "macro"} if settings.hide_associated else set()

    def visible_associated(entry: SlideEntry) -> list[str]:
        assert entry.metadata is not None
        return [n for n in entry.metadata.associated if n not in hidden]

    def slide_id_of(request: Request) -> str:
        sid = str(request.path_params["slide_id"])
        if not _ID.match(sid):
            raise SlideNotFound("no slide with this id")
        return sid

    # -- handlers ----------------------------------------------------------------
    async def list_slides(request: Request) -> Response:
        return JSONResponse({"slides": [slide_summary(e) for e in library.entries()]})

    async def slide_detail(request: Request) -> Response:
        entry = library.entry(slide_id_of(request))
        if library.is_stale(entry):
            entry = await service.run(library.refresh, entry)
        body = slide_summary(entry)
        meta = entry.metadata
        if meta is not None:
            body.update(
                levels=[
                    {"width": lv.width, "height": lv.height, "downsample": lv.downsample,
                     "tile_size": list(lv.tile_size) if lv.tile_size else None}
                    for lv in meta.levels
                ],
                tile_size=list(meta.tile_size) if meta.tile_size else None,
                native_tile_size=service.params_for(entry, "native").tile_size,
                bounds=list(meta.bounds) if meta.bounds else None,
                background="%02x%02x%02x" % meta.background,
                associated=visible_associated(entry),
                properties=_visible_properties(meta.properties, hidden),
                dzi=f"/slides/{entry.id}.dzi?v={entry.fingerprint}",
                native_dzi=f"/slides/{entry.id}/native.dzi?v={entry.fingerprint}",
            )
        return JSONResponse(body)

    def dzi_handler(kind: GeometryKind) -> Any:
        async def handler(request: Request) -> Response:
            entry = await service.entry(slide_id_of(request))
            geom = service.geometry(entry, kind)
            return Response(
                dzi_xml(geom, "jpeg"),
                media_type="application/xml",
                headers={"Cache-Control": REVALIDATE, "ETag": f'"{entry.fingerprint}"'},
            )

        return handler

    def tile_handler(kind: GeometryKind) -> Any:
        async def handler(request: Request) -> Response:
            sid = slide_id_of(request)
            level_s = str(request.path_params["level"])
            m = _TILE.match(str(request.path_params["tile"]))
            if not level_s.isdigit() or len(level_s) > 4 or m is None:
                raise BadRequest("tile address must be {level}/{col}_{row}.{jpeg|png}")
            ref = await service.locate(
                sid, kind, int(level_s), int(m.group(1)), int(m.group(2)), m.group(3)
            )
            versioned = request.query_params.get("v") == ref.entry.fingerprint
            headers = {"ETag": ref.etag, "Cache-Control": IMMUTABLE if versioned else REVALIDATE}
            if ref.etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
            started = time.perf_counter()
            tile = await service.fetch(ref)
            headers["X-Tile-Source"] = tile.source
            headers["Server-Timing"] = server_timing(tile.source, time.perf_counter() - started)
            return Response(tile.data, media_type=tile.media_type, headers=headers)

        return handler

    async def thumbnail(request: Request) -> Response:
        raw = request.query_params.get("max_size", "512")
        if not raw.isdigit():
            raise BadRequest("max_size must be a positive integer")
        data, etag = await service.thumbnail(slide_id_of(request), int(raw))
        return _image(request, data, etag, PRIVATE)

    async def associated(request: Request) -> Response:
        name = str(request.path_params["name"])
        if name in hidden:  # as if absent: the server withholds them
            raise NotFound("the slide has no associated image of this name")
        data, etag = await service.associated(slide_id_of(request), name)
        return _image(request, data, etag, PRIVATE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        cache_ok = await tile_cache.ping()
        # A cache that cannot be reached only makes serving slower (faults are misses):
        # degraded but ready, unless --require-redis says it must be there.
        ready = library.loaded and (cache_ok or not settings.require_redis)
        status = "not_ready" if not ready else "ready" if cache_ok else "degraded"
        cache_body: dict[str, Any] = {"backend": tile_cache.name, "reachable": cache_ok}
        if not cache_ok:
            cache_body["reason"] = "the shared tile cache (Redis) does not answer; tiles are " \
                "served without it"
        body = {
            "status": status,
            "library_loaded": library.loaded,
            "slides": len(library.entries()),
            "cache": cache_body,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def warm_route(request: Request) -> Response:
        raw = request.query_params.get("levels", str(DEFAULT_WARM_LEVELS))
        if not raw.isdigit() or not 1 <= int(raw) <= 40:
            raise BadRequest("levels must be an integer between 1 and 40")
        report = await warm(service, slide_id_of(request), int(raw), concurrency=threads * 2)
        return JSONResponse(report.as_dict())

    async def metrics_route(request: Request) -> Response:
        metrics.open_slides.set(len(pool))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # -- errors ------------------------------------------------------------------
    async def on_wsi_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WsiServerError)
        metrics.errors.labels(exc.code).inc()
        return _error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)}, status_code=exc.status_code
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        metrics.errors.labels("internal_error").inc()
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed to handle this request"},
            status_code=500,
        )

    from wsi_server.ingest import IngestHook  # GET /api/ingest; the pipeline runs in the lifespan

    ingest = IngestHook(settings, library)
    warm_tasks: set[concurrent.futures.Future[None]] = set()

    def warm_after_ingest(loop: asyncio.AbstractEventLoop, slide_id: str) -> None:
        """Called from the ingest thread: render the new slide's coarse levels, so the
        first pathologist to open it waits for nothing."""

        async def run() -> None:
            try:
                await warm(service, slide_id, settings.ingest_warm_levels, concurrency=threads)
            except Exception as exc:  # a warm-up failure never affects ingest
                log.warning("warm-up after ingest of %s failed: %r", slide_id, exc)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        warm_tasks.add(future)
        future.add_done_callback(warm_tasks.discard)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, library.scan)
        rescanner = None
        if settings.ingest_warm_levels > 0:
            ingest.on_slide = lambda sid: warm_after_ingest(loop, sid)
        await loop.run_in_executor(None, ingest.start)  # no-op unless --ingest
        if settings.rescan_seconds > 0:
            rescanner = asyncio.create_task(_rescan(library, executor, settings.rescan_seconds))
        try:
            yield
        finally:
            if rescanner is not None:
                rescanner.cancel()
            await loop.run_in_executor(None, ingest.stop)
            if isolation is not None:
                await loop.run_in_executor(None, isolation.close)
            await tile_cache.close()
            executor.shutdown(wait=False, cancel_futures=True)

    routes: list[BaseRoute] = [
        # tile routes first: the router tries routes in order, and tiles are most requests
        Route("/slides/{slide_id}/native_files/{level}/{tile}", tile_handler("native")),
        Route("/slides/{slide_id}_files/{level}/{tile}", tile_handler("default")),
        Route("/slides/{slide_id}/native.dzi", dzi_handler("native")),
        Route("/slides/{slide_id}.dzi", dzi_handler("default")),
        Route("/api/slides", list_slides),
        Route("/api/slides/{slide_id}", slide_detail),
        Route("/api/slides/{slide_id}/thumbnail", thumbnail),
        Route("/api/slides/{slide_id}/associated/{name}", associated),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_route),
        Route("/api/slides/{slide_id}/warm", warm_route, methods=["POST"]),
    ]
    routes += _viewer_routes(settings)
    if settings.bench_routes:
        routes += _bench_routes()
    routes += ingest.routes()
    middleware = [Middleware(ServerTimingMiddleware), Middleware(GzipExceptTiles)]
    if settings.cors_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "HEAD", "OPTIONS"],
                expose_headers=["ETag", "X-Tile-Source", "Server-Timing"],
            ),
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            WsiServerError: on_wsi_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.settings = settings
    app.state.library = library
    app.state.service = service
    app.state.cache = tile_cache
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.ingest = ingest
    return app


class _IsolatedProbe:
    """``--isolate-open``: the ingest validator's warm subprocess opens and decodes a slide
    before the server does; a crash or a hang costs that process only."""

    def __init__(self, timeout: float) -> None:
        from wsi_server.ingest.validate import Validator

        self._validator = Validator(timeout)
        self._lock = threading.Lock()  # one question at a time to the one process

    def __call__(self, path: Path) -> WsiServerError | None:
        with self._lock:
            verdict = self._validator.validate(path)
        if verdict.ok:
            return None
        if verdict.code == UnsupportedSlide.code:
            return UnsupportedSlide(verdict.detail)
        return UnreadableSlide(verdict.detail)

    def close(self) -> None:
        with self._lock:
            self._validator.close()


class GzipExceptTiles:
    """gzip for JSON, HTML and scripts; tiles (already compressed images) skip the
    middleware entirely, which keeps per-request work off the hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/slides/"):
            await self.app(scope, receive, send)
        else:
            await self.gzip(scope, receive, send)


def _visible_properties(props: dict[str, str], hidden: set[str]) -> dict[str, str]:
    if not hidden:
        return props
    # Label text and barcodes can be copied into properties by some vendors.
    return {
        k: v for k, v in props.items() if "barcode" not in k.lower() and "label" not in k.lower()
    }


def _image(request: Request, data: bytes, etag: str, cache_control: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=codecs.JPEG, headers=headers)


async def _rescan(library: Library, executor: ThreadPoolExecutor, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            await loop.run_in_executor(executor, library.scan)
        except Exception:
            log.exception("library rescan failed")


def _viewer_routes(settings: Settings) -> list[BaseRoute]:
    from wsi_server.viewer import viewer_routes

    return viewer_routes(settings)


def _bench_routes() -> list[BaseRoute]:
    """``GET /bench/bytes/{n}``: n bytes with the headers of a tile response and none of
    its work, the ceiling that ``benchmarks/bench_http.py`` compares tiles against."""
    payload = bytes(range(256)) * (2**22 // 256)
    headers = {
        "ETag": etag_for("bench"),
        "Cache-Control": REVALIDATE,
        "X-Tile-Source": "memory",
        "Server-Timing": server_timing("memory", 0.0),
    }

    async def bench_bytes(request: Request) -> Response:
        raw = str(request.path_params["n"])
        if not raw.isdigit() or int(raw) > len(payload):
            raise BadRequest(f"n must be an integer from 0 to {len(payload)}")
        return Response(payload[: int(raw)], media_type=codecs.JPEG, headers=headers)

    return [Route("/bench/bytes/{n}", bench_bytes)]
