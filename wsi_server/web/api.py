"""JSON slide API: the slide list, one slide's metadata, thumbnails, associated images and
cache warming."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.auth import policy
from wsi_server.context import AppContext, principal
from wsi_server.errors import BadRequest, Forbidden, NotFound
from wsi_server.library import SlideEntry
from wsi_server.warm import DEFAULT_WARM_LEVELS, warm
from wsi_server.web.common import PRIVATE, image_response


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


def visible_properties(props: dict[str, str], hidden: frozenset[str]) -> dict[str, str]:
    if not hidden:
        return props
    # Label text and barcodes can be copied into properties by some vendors.
    return {
        k: v for k, v in props.items() if "barcode" not in k.lower() and "label" not in k.lower()
    }


def routes(ctx: AppContext) -> list[BaseRoute]:
    service = ctx.tiles

    async def list_slides(request: Request) -> Response:
        return JSONResponse({"slides": [slide_summary(e) for e in ctx.visible_slides(request)]},
                            headers={"Cache-Control": "private, no-cache"})

    # the server's choice for its viewer, carried to every tile by OpenSeadragon
    encoding = ("" if ctx.settings.tile_encoding == "stored"
                else f"&encoding={ctx.settings.tile_encoding}")

    async def slide_detail(request: Request) -> Response:
        entry = await ctx.slide(request, readable=False)
        hidden = ctx.hidden_associated(request, entry)
        body = slide_summary(entry)
        body["can_share"] = policy.can_share_slide(principal(request), entry.collection)
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
                associated=[n for n in meta.associated if n not in hidden],
                properties=visible_properties(meta.properties, hidden),
                dzi=f"/slides/{entry.id}.dzi?v={entry.fingerprint}{encoding}",
                native_dzi=f"/slides/{entry.id}/native.dzi?v={entry.fingerprint}{encoding}",
                tile_encoding=ctx.settings.tile_encoding,
            )
        return JSONResponse(body, headers={"Cache-Control": "private, no-cache"})

    async def thumbnail(request: Request) -> Response:
        entry = await ctx.slide(request)
        raw = request.query_params.get("max_size", "512")
        if not raw.isdigit():
            raise BadRequest("max_size must be a positive integer")
        data, etag = await service.thumbnail(entry.id, int(raw))
        return image_response(request, data, etag, PRIVATE)

    async def associated(request: Request) -> Response:
        entry = await ctx.slide(request)
        name = str(request.path_params["name"])
        if name in ctx.hidden_associated(request, entry):  # as if absent: the server withholds them
            raise NotFound("the slide has no associated image of this name")
        data, etag = await service.associated(entry.id, name)
        return image_response(request, data, etag, PRIVATE)

    async def warm_route(request: Request) -> Response:
        entry = await ctx.slide(request)
        if not policy.can_share(principal(request)):
            raise Forbidden("a shared view is read-only: it cannot warm the cache")
        raw = request.query_params.get("levels", str(DEFAULT_WARM_LEVELS))
        if not raw.isdigit() or not 1 <= int(raw) <= 40:
            raise BadRequest("levels must be an integer between 1 and 40")
        report = await warm(service, entry.id, int(raw), encoding=ctx.settings.tile_encoding,
                            concurrency=ctx.threads * 2)
        return JSONResponse(report.as_dict())

    return [
        Route("/api/slides", list_slides),
        Route("/api/slides/{slide_id}", slide_detail),
        Route("/api/slides/{slide_id}/thumbnail", thumbnail),
        Route("/api/slides/{slide_id}/associated/{name}", associated),
        Route("/api/slides/{slide_id}/warm", warm_route, methods=["POST"]),
    ]
