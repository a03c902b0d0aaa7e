"""The ASGI application, built by ``create_app(settings)``: a wiring file with no
module-level state. It builds one ``AppContext`` and mounts each front's ``routes(ctx)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from wsi_server import viewer
from wsi_server.cache import TileCache
from wsi_server.context import AppContext, build_context
from wsi_server.library import Library
from wsi_server.metrics import ServerTimingMiddleware
from wsi_server.readers import ReaderRegistry
from wsi_server.settings import Settings
from wsi_server.warm import warm
from wsi_server.web import api, deepzoom, ops
from wsi_server.web.errors import exception_handlers
from wsi_server.web.middleware import GzipExceptTiles

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    registry: ReaderRegistry | None = None,
    cache: TileCache | None = None,
) -> Starlette:
    ctx = build_context(settings, registry, cache)
    routes: list[BaseRoute] = [
        *deepzoom.routes(ctx),  # first: the router tries routes in order, tiles are most
        *api.routes(ctx),
        *ops.routes(ctx),
        *viewer.routes(ctx),
        *ctx.ingest.routes(),
    ]
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
        await loop.run_in_executor(ctx.executor, ctx.library.scan)
        rescanner = None
        if settings.ingest_warm_levels > 0:
            ctx.ingest.on_slide = lambda sid: warm_after_ingest(loop, sid)
        await loop.run_in_executor(None, ctx.ingest.start)  # no-op unless --ingest
        if settings.rescan_seconds > 0:
            rescanner = asyncio.create_task(
                _rescan(ctx.library, ctx.executor, settings.rescan_seconds)
            )
        try:
            yield
        finally:
            if rescanner is not None:
                rescanner.cancel()
            await loop.run_in_executor(None, ctx.ingest.stop)
            if ctx.isolation is not None:
                await loop.run_in_executor(None, ctx.isolation.close)
            await ctx.cache.close()
            ctx.executor.shutdown(wait=False, cancel_futures=True)

    return lifespan


async def _rescan(library: Library, executor: ThreadPoolExecutor, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            await loop.run_in_executor(executor, library.scan)
        except Exception:
            log.exception("library rescan failed")
