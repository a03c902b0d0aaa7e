"""``AppContext``: the services every front reaches, built once by ``create_app``.

A front is a module with ``routes(ctx) -> list[BaseRoute]``; it reaches the library, the
tile path, the cache and the metrics through the context, never by importing ``app.py``.
Every slide route resolves its slide through ``ctx.slide(request)``: the one place where a
slide id becomes a ``SlideEntry`` and where access is decided.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import HTTPConnection

from wsi_server.cache import TileCache, build_cache
from wsi_server.errors import SlideNotFound, UnreadableSlide, UnsupportedSlide, WsiServerError
from wsi_server.geometry import GeometryParams
from wsi_server.ingest.web import IngestHook
from wsi_server.library import Library, SlideEntry
from wsi_server.metrics import Metrics
from wsi_server.pool import ReaderPool
from wsi_server.readers import ReaderRegistry, default_registry
from wsi_server.settings import Settings
from wsi_server.tiles import TileService

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HIDDEN_ASSOCIATED = frozenset({"label", "macro"})


@dataclass(eq=False)
class AppContext:
    settings: Settings
    library: Library
    tiles: TileService
    cache: TileCache
    pool: ReaderPool
    metrics: Metrics
    executor: ThreadPoolExecutor
    threads: int
    ingest: IngestHook
    isolation: IsolatedProbe | None = None

    # -- the one slide helper ------------------------------------------------------
    def slide_id_of(self, conn: HTTPConnection) -> str:
        sid = str(conn.path_params.get("slide_id", ""))
        if not _ID.match(sid):
            raise SlideNotFound("no slide with this id")
        return sid

    async def slide(self, conn: HTTPConnection, *, readable: bool = True) -> SlideEntry:
        """The slide a request names, when the requester may see it.

        Raises ``SlideNotFound`` both for an unknown id and for a slide the requester may
        not see, so the two cannot be told apart. With ``readable`` (the default) an
        unreadable slide raises its error; without, its entry is returned as is (the
        JSON API describes unreadable slides).
        """
        entry = self.library.entry(self.slide_id_of(conn))
        if self.library.is_stale(entry):
            entry = await self.tiles.run(self.library.refresh, entry)
        if readable and entry.error is not None:
            raise entry.error
        return entry

    def visible_slides(self, conn: HTTPConnection) -> list[SlideEntry]:
        """The library entries the requester may see, by name."""
        return self.library.entries()

    def hidden_associated(self, conn: HTTPConnection) -> frozenset[str]:
        """Associated images withheld from this requester (label and macro carry patient
        identifiers)."""
        return HIDDEN_ASSOCIATED if self.settings.hide_associated else frozenset()


def build_context(
    settings: Settings,
    registry: ReaderRegistry | None = None,
    cache: TileCache | None = None,
) -> AppContext:
    registry = registry or default_registry()
    pool = ReaderPool(registry, settings.pool_size)
    isolation = IsolatedProbe(settings.ingest_validate_timeout) if settings.isolate_open else None
    library = Library(settings.paths, pool, convert_dir=settings.convert_dir, probe=isolation)
    metrics = Metrics()
    threads = settings.render_threads or os.cpu_count() or 2
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-render")
    tile_cache = cache or build_cache(settings)
    tiles = TileService(
        library,
        tile_cache,
        executor,
        GeometryParams(settings.tile_size, settings.overlap, settings.limit_bounds),
        settings.jpeg_quality,
        metrics,
    )
    return AppContext(
        settings=settings,
        library=library,
        tiles=tiles,
        cache=tile_cache,
        pool=pool,
        metrics=metrics,
        executor=executor,
        threads=threads,
        ingest=IngestHook(settings, library),
        isolation=isolation,
    )


class IsolatedProbe:
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
