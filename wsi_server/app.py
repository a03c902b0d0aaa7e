"""The ASGI application, built by ``create_app(settings)``: a wiring file with no
module-level state. It builds one ``AppContext`` and mounts each front's ``routes(ctx)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from wsi_server import viewer
from wsi_server.auth.middleware import PrincipalBackend, RequireSignIn, on_auth_error
from wsi_server.cache import TileCache
from wsi_server.context import AppContext, build_context
from wsi_server.library import Library
from wsi_server.metrics import ServerTimingMiddleware
from wsi_server.readers import ReaderRegistry
from wsi_server.settings import Settings, is_loopback
from wsi_server.store._time import utcnow
from wsi_server.warm import warm
from wsi_server.web import api, audit, auth, deepzoom, dicomweb, iiif, openapi, ops, shares
from wsi_server.web.errors import exception_handlers
from wsi_server.web.middleware import GzipExceptTiles, Hardening, origin_of

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    registry: ReaderRegistry | None = None,
    cache: TileCache | None = None,
) -> Starlette:
    ctx = build_context(settings, registry, cache)
    routes: list[BaseRoute] = [
        *iiif.routes(ctx),  # one Mount, a cheap miss for others: IIIF tiles are many
        *deepzoom.routes(ctx),  # the router tries routes in order, tiles are most
        *api.routes(ctx),
        *dicomweb.routes(ctx),
        *shares.routes(ctx),
        *auth.routes(ctx),
        *audit.routes(ctx),
        *ops.routes(ctx),
        *openapi.routes(),
        *viewer.routes(ctx),
        *ctx.ingest.routes(),
    ]
    middleware = [
        Middleware(Hardening, frame_ancestors=settings.frame_ancestors,
                   public_url=settings.public_url,
                   form_targets=origin_of(settings.oidc_issuer or "")),
        Middleware(ServerTimingMiddleware),
        Middleware(GzipExceptTiles),
        Middleware(AuthenticationMiddleware, backend=PrincipalBackend(ctx.auth),
                   on_error=on_auth_error),
        Middleware(RequireSignIn, enabled=settings.auth != "none"),
    ]
    if settings.cors_origins:
        middleware.insert(
            1,
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
        lifespan=_lifespan(ctx),
        exception_handlers=exception_handlers(ctx.metrics),
    )
    app.state.ctx = ctx
    app.state.settings = settings
    app.state.library = ctx.library
    app.state.service = ctx.tiles
    app.state.cache = ctx.cache
    app.state.metrics = ctx.metrics
    app.state.pool = ctx.pool
    app.state.ingest = ctx.ingest
    return app


Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]


def _lifespan(ctx: AppContext) -> Lifespan:
    settings = ctx.settings
    warm_tasks: set[concurrent.futures.Future[None]] = set()

    def warm_after_ingest(loop: asyncio.AbstractEventLoop, slide_id: str) -> None:
        """Called from the ingest thread: render the new slide's coarse levels, so the
        first pathologist to open it waits for nothing."""

        async def run() -> None:
            try:
                await warm(ctx.tiles, slide_id, settings.ingest_warm_levels,
                           concurrency=ctx.threads)
            except Exception as exc:  # a warm-up failure never affects ingest
                log.warning("warm-up after ingest of %s failed: %r", slide_id, exc)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        warm_tasks.add(future)
        future.add_done_callback(warm_tasks.discard)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if settings.auth == "none" and not is_loopback(settings.host):
            log.warning("serving every slide WITHOUT SIGN-IN on %s (--allow-anonymous): "
                        "anyone who reaches this port sees every slide", settings.host)
        housekeeping = asyncio.create_task(_housekeeping(ctx))
        await ctx.auth.start()
        await loop.run_in_executor(ctx.executor, ctx.library.scan)
        if ctx.isolation is not None:  # verdicts of files gone or changed since: dropped
            current = [e.fingerprint for e in ctx.library.entries()]
            await loop.run_in_executor(ctx.executor, ctx.isolation.compact, current)
        if ctx.sources is not None:  # listed by its own thread: an archive never delays start
            ctx.sources.start(ctx.library)
        rescanner = None
        if settings.ingest_warm_levels > 0:
            ctx.ingest.on_slide = lambda sid: warm_after_ingest(loop, sid)
        ctx.ingest.on_outcome = ctx.auth.record_ingest
        await loop.run_in_executor(None, ctx.ingest.start)  # no-op unless --ingest
        if settings.rescan_seconds > 0:
            rescanner = asyncio.create_task(
                _rescan(ctx.library, ctx.executor, settings.rescan_seconds)
            )
        try:
            yield
        finally:
            housekeeping.cancel()
            if rescanner is not None:
                rescanner.cancel()
            await loop.run_in_executor(None, ctx.ingest.stop)
            if ctx.sources is not None:
                await ctx.sources.aclose()
            if ctx.isolation is not None:
                await loop.run_in_executor(None, ctx.isolation.close)
            await ctx.cache.close()
            await ctx.auth.close()
            ctx.executor.shutdown(wait=False, cancel_futures=True)

    return lifespan


async def _housekeeping(ctx: AppContext, every: float = 5.0) -> None:
    """Write the audit trail's view counters every few seconds; once a day, apply the
    audit retention and drop expired sign-ins."""
    auth = ctx.auth
    retention = ctx.settings.audit_retention_days
    next_purge = 0.0
    while True:
        await asyncio.sleep(every)
        try:
            await auth.run(auth.audit.flush)
            now = time.monotonic()
            if now >= next_purge:
                next_purge = now + 86400
                await auth.run(auth.sessions.purge_expired)
                if retention > 0:
                    cutoff = utcnow() - timedelta(days=retention)
                    purged = await auth.run(auth.audit.purge, cutoff)
                    if purged:
                        log.info("audit retention: %d records older than %d days deleted",
                                 purged, retention)
        except Exception:
            log.exception("audit housekeeping failed (retried in %.0f s)", every)


async def _rescan(library: Library, executor: ThreadPoolExecutor, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            await loop.run_in_executor(executor, library.scan)
        except Exception:
            log.exception("library rescan failed")
