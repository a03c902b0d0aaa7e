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
from typing import Any

from wsi_server.errors import BadRequest
from wsi_server.tiles import GeometryKind, TileService

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
    concurrency: int = 8,
    max_tiles: int = MAX_WARM_TILES,
) -> WarmReport:
    """Fetch every tile of the K coarsest levels; already cached tiles cost a lookup."""
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
            tile = await service.tile(slide_id, kind, level, col, row, fmt)
        report.sources[tile.source] = report.sources.get(tile.source, 0) + 1

    await asyncio.gather(*(one(*w) for w in work))
    report.tiles = len(work)
    report.seconds = round(time.perf_counter() - start, 3)
    return report
