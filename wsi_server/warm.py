"""Warm the tile cache: render the K coarsest Deep Zoom levels of a slide, in both
geometries (the server's default and the native grid), so a slide opens at once the
first time someone looks at it. Used by ``wsi-server warm`` and ``POST
/api/slides/{id}/warm``; tiles go through ``TileService.fetch`` and so land in whatever
cache the service has (with Redis, every worker and replica sees them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wsi_server.errors import BadRequest, WsiServerError
from wsi_server.tiles import GeometryKind, TileService

if TYPE_CHECKING:
    from wsi_server.settings import Settings

KINDS: tuple[GeometryKind, ...] = ("default", "native")
MAX_WARM_TILES = 50_000
# Levels 0-11 reach 2048 px: what a viewer shows when it opens a slide to fit the screen.
DEFAULT_WARM_LEVELS = 12


@dataclass
class WarmReport:
    slide: str
    levels: int
    tiles: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    service: TileService, slide_id: str, levels: int, kinds: Sequence[GeometryKind] = KINDS
) -> Iterator[tuple[GeometryKind, int, int, int]]:
    """(geometry, level, col, row) of every tile of the ``levels`` coarsest DZ levels."""
    entry = service.library.entry(slide_id)
    for kind in kinds:
        geom = service.geometry(entry, kind)
        for level in range(min(levels, geom.level_count)):
            cols, rows = geom.t_dimensions[level]
            for row in range(rows):
                for col in range(cols):
                    yield kind, level, col, row


async def warm(
    service: TileService,
    slide_id: str,
    levels: int,
    *,
    kinds: Sequence[GeometryKind] = KINDS,
    fmt: str = "jpeg",
    encoding: str = "stored",
    concurrency: int = 8,
    max_tiles: int = MAX_WARM_TILES,
) -> WarmReport:
    """Fetch every tile of the K coarsest levels (tiles of stored levels in ``encoding``,
    the one the viewer asks for); already cached tiles cost a lookup."""
    if levels < 1:
        raise BadRequest("levels must be at least 1")
    await service.entry(slide_id)  # refresh a stale entry, raise for an unreadable slide
    work = list(plan(service, slide_id, levels, kinds))
    if len(work) > max_tiles:
        raise BadRequest(f"warming {levels} levels means {len(work)} tiles; the limit is "
                         f"{max_tiles}: ask for fewer levels")
    report = WarmReport(slide_id, levels)
    start = time.perf_counter()
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(kind: GeometryKind, level: int, col: int, row: int) -> None:
        async with gate:
            tile = await service.tile(slide_id, kind, level, col, row, fmt, encoding)
        report.sources[tile.source] = report.sources.get(tile.source, 0) + 1

    await asyncio.gather(*(one(*w) for w in work))
    report.tiles = len(work)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


# -- command line: ``wsi-server warm`` ------------------------------------------------
def run_cli(settings: Settings, target: str, levels: int) -> int:
    """Warm one slide, given as a path or as an id under the library paths; print the
    report as JSON. Needs Redis: a process-local cache would end with this command."""
    import json
    import os
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from wsi_server.cache import build_cache
    from wsi_server.geometry import GeometryParams
    from wsi_server.library import Library
    from wsi_server.pool import ReaderPool
    from wsi_server.readers import default_registry

    if not settings.redis_url:
        print("wsi-server warm: give --redis-url (or WSI_REDIS_URL): the tiles go to the "
              "Redis cache the servers share", file=sys.stderr)
        return 2
    path = Path(target)
    roots = (path,) if path.exists() else settings.paths
    if not roots:
        print(f"wsi-server warm: {target!r} is neither a slide path nor, without --library, "
              "a slide id", file=sys.stderr)
        return 2
    library = Library(roots, ReaderPool(default_registry(), 4))
    library.scan()
    if path.exists():
        entries = library.entries()
        if len(entries) != 1:
            print(f"wsi-server warm: {target} holds {len(entries)} slides; give one",
                  file=sys.stderr)
            return 2
        slide_id = entries[0].id
    else:
        slide_id = target
    threads = settings.render_threads or os.cpu_count() or 2

    async def main() -> int:
        cache = build_cache(settings)
        executor = ThreadPoolExecutor(threads, thread_name_prefix="wsi-warm")
        try:
            if not await cache.ping():
                print(f"wsi-server warm: Redis at {settings.redis_url} does not answer",
                      file=sys.stderr)
                return 1
            service = TileService(
                library, cache, executor,
                GeometryParams(settings.tile_size, settings.overlap, settings.limit_bounds),
                settings.jpeg_quality,
            )
            report = await warm(service, slide_id, levels,
                                encoding=settings.tile_encoding, concurrency=threads * 2)
        finally:
            await cache.close()
            executor.shutdown(wait=False, cancel_futures=True)
        print(json.dumps(report.as_dict()))
        return 0

    try:
        return asyncio.run(main())
    except WsiServerError as exc:
        print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
        return 1
