"""Operations front: liveness, readiness, Prometheus metrics and the benchmark-only route."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server import codecs
from wsi_server.context import AppContext
from wsi_server.errors import BadRequest
from wsi_server.metrics import server_timing
from wsi_server.tiles import etag_for
from wsi_server.web.common import REVALIDATE


def routes(ctx: AppContext) -> list[BaseRoute]:
    library, cache, settings = ctx.library, ctx.cache, ctx.settings

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        cache_ok = await cache.ping()
        store_ok = await ctx.auth.ping()
        # A cache that cannot be reached only makes serving slower (faults are misses):
        # degraded but ready, unless --require-redis says it must be there. Without the
        # state store nobody can sign in or open a share link: not ready.
        ready = library.loaded and store_ok and (cache_ok or not settings.require_redis)
        status = "not_ready" if not ready else "ready" if cache_ok else "degraded"
        cache_body: dict[str, Any] = {"backend": cache.name, "reachable": cache_ok}
        if not cache_ok:
            cache_body["reason"] = "the shared tile cache (Redis) does not answer; tiles are " \
                "served without it"
        body = {
            "status": status,
            "library_loaded": library.loaded,
            "slides": len(library.entries()),
            "cache": cache_body,
            "store": {"backend": ctx.auth.store.dialect_name, "reachable": store_ok},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_route(request: Request) -> Response:
        ctx.metrics.open_slides.set(len(ctx.pool))
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    out: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_route),
    ]
    if settings.bench_routes:
        out += bench_routes()
    return out


def bench_routes() -> list[BaseRoute]:
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
