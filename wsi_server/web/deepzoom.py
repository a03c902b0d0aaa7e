"""Deep Zoom front: ``.dzi`` descriptors and tiles, in the server's default geometry and on
the slide's native grid."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from wsi_server.context import AppContext
from wsi_server.errors import BadRequest
from wsi_server.geometry import dzi_xml
from wsi_server.metrics import server_timing
from wsi_server.tiles import ENCODINGS, GeometryKind

_TILE = re.compile(r"^(\d{1,9})_(\d{1,9})\.([a-z]{1,8})$")
Handler = Callable[[Request], Awaitable[Response]]


def parse_tile_address(level: str, tile: str) -> tuple[int, int, int, str]:
    """``(level, col, row, format)`` from the ``{level}/{col}_{row}.{fmt}`` of a tile URL."""
    m = _TILE.match(tile)
    if not level.isdigit() or len(level) > 4 or m is None:
        raise BadRequest("tile address must be {level}/{col}_{row}.{jpeg|png}")
    return int(level), int(m.group(1)), int(m.group(2)), m.group(3)


def tile_encoding(request: Request) -> str:
    """The ``encoding`` query parameter of a descriptor or tile (``stored`` when absent).
    OpenSeadragon copies a descriptor's query string onto its tile URLs, so a viewer opened
    on ``native.dzi?encoding=reencoded`` asks for every tile that way."""
    encoding = request.query_params.get("encoding", "stored")
    if encoding not in ENCODINGS:
        raise BadRequest("encoding must be 'stored' or 'reencoded'")
    return encoding


def routes(ctx: AppContext) -> list[BaseRoute]:
    service = ctx.tiles

    def dzi_handler(kind: GeometryKind) -> Handler:
        async def handler(request: Request) -> Response:
            entry = await ctx.slide(request)
            tile_encoding(request)  # the same descriptor either way; a bad value is a 400
            geom = service.geometry(entry, kind)
            return Response(
                dzi_xml(geom, "jpeg"),
                media_type="application/xml",
                headers={
                    "Cache-Control": ctx.cache_control(request, immutable=False),
                    "ETag": f'"{entry.fingerprint}"',
                },
            )

        return handler

    def tile_handler(kind: GeometryKind) -> Handler:
        async def handler(request: Request) -> Response:
            entry = await ctx.slide(request)
            level, col, row, fmt = parse_tile_address(
                str(request.path_params["level"]), str(request.path_params["tile"])
            )
            ref = await service.locate(entry.id, kind, level, col, row, fmt,
                                       tile_encoding(request))
            versioned = request.query_params.get("v") == ref.entry.fingerprint
            headers = {
                "ETag": ref.etag,
                "Cache-Control": ctx.cache_control(request, immutable=versioned),
            }
            if ref.etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
            started = time.perf_counter()
            tile = await service.fetch(ref)
            headers["X-Tile-Source"] = tile.source
            headers["Server-Timing"] = server_timing(tile.source, time.perf_counter() - started)
            return Response(tile.data, media_type=tile.media_type, headers=headers)

        return handler

    # tile routes first: the router tries routes in order, and tiles are most requests
    return [
        Route("/slides/{slide_id}/native_files/{level}/{tile}", tile_handler("native")),
        Route("/slides/{slide_id}_files/{level}/{tile}", tile_handler("default")),
        Route("/slides/{slide_id}/native.dzi", dzi_handler("native")),
        Route("/slides/{slide_id}.dzi", dzi_handler("default")),
    ]
