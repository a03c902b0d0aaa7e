"""IIIF front: every slide is a IIIF Image API 3.0 image service (level 2) and has a
Presentation 3 manifest.

::

    GET /iiif/3/{id}                                              303 to its info.json
    GET /iiif/3/{id}/info.json                                    image information
    GET /iiif/3/{id}/{region}/{size}/{rotation}/{quality}.{fmt}   an image
    GET /iiif/3/{id}/manifest.json                                Presentation 3 manifest

The grammar and arithmetic are ``wsi_server.iiif`` (pure). An image that lines up with
the slide's native Deep Zoom grid *is* that tile (``TileService.tile_ref`` and ``fetch``:
cache, stored JPEG bytes, or the same render, under the Deep Zoom front's key); any other
image goes through ``TileService.locate_image`` and ``fetch_image``. Every response of
these routes carries the CORS headers of ``--iiif-cors-origins`` (``*`` by default),
errors included; access is decided by ``ctx.slide``, as on every slide route.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from wsi_server.context import AppContext
from wsi_server.errors import NotFound, SlideNotFound, WsiServerError
from wsi_server.geometry import DeepZoomGeometry
from wsi_server.iiif.documents import (
    IMAGE_CONTEXT,
    PREFIX,
    PRESENTATION_CONTEXT,
    PROFILE_URI,
    ImageService,
    SlideFacts,
    info_json,
    json_media_type,
    manifest,
    public_base,
    service_id,
)
from wsi_server.iiif.request import (
    FORMATS,
    Limits,
    ResolvedImage,
    canonical,
    native_tile,
    parse_image_request,
    resolve,
    resolve_tile_form,
)
from wsi_server.library import SlideEntry
from wsi_server.metrics import Metrics, server_timing
from wsi_server.tiles import ImageRef, TileRef, etag_for
from wsi_server.web.errors import exception_handlers

Endpoint = Callable[[Request], Awaitable[Response]]
_CODEC = {"jpg": "jpeg", "png": "png", "webp": "webp"}
# the quality.format of a tile request, as viewers ask tiles (see plan_of)
_TILE_FORMATS = {"default.jpg": "jpeg", "color.jpg": "jpeg", "default.png": "png",
                 "color.png": "png"}
_EXTRA_FORMATS = ("webp",)
_VARY = "Accept, Forwarded, X-Forwarded-Host, X-Forwarded-Proto"
_EXPOSE = b"ETag, Link, X-Tile-Source, Server-Timing"
_BASE_HEADERS = frozenset({b"host", b"forwarded", b"x-forwarded-proto", b"x-forwarded-host"})
_GRIDS_MAX = 4096


def _link(path: str) -> str:
    """The Link header of an image after its service id: canonical request, profile."""
    return f'/{path}>;rel="canonical", <{PROFILE_URI}>;rel="profile"'


class _Plan(NamedTuple):
    """An image request worked out: what serves it, and its Link header."""

    resolved: ResolvedImage | None
    """The request resolved (None for a native tile found by the cheap check)."""
    fmt: str
    """The codec's name of the format (jpeg, png, webp)."""
    address: tuple[int, int, int] | None
    """The native Deep Zoom tile (level, col, row) that is this image, if one is."""
    link: str
    """The Link header after the service id: canonical request and profile."""


class Cors:
    """CORS on every response of the IIIF routes, errors included (``Access-Control-
    Allow-Origin: *`` by default, or the request's origin when it is listed), and the
    answers to preflight requests: ``wrap`` turns an endpoint into one that does this.

    A wrapper rather than an ASGI middleware around the mount: nothing more per request
    than the headers themselves (IIIF tiles are many, and cheap to serve)."""

    def __init__(self, origins: tuple[str, ...], metrics: Metrics) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in origins)
        self.any_headers = [(b"access-control-allow-origin", b"*"),
                            (b"access-control-expose-headers", _EXPOSE)]
        self.on_error = exception_handlers(metrics)[WsiServerError]

    def headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        """``*``; or, for listed origins, ``Vary: Origin`` always (a shared cache must not
        hand one origin's answer to another) and the origin when it is listed."""
        if self.any:
            return self.any_headers
        if not self.origins:
            return []
        origin = request.headers.get("origin", "")
        if origin.lower() in self.origins:
            return [(b"vary", b"Origin"),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", _EXPOSE)]
        return [(b"vary", b"Origin")]

    def wrap(self, endpoint: Endpoint) -> Endpoint:
        async def with_cors(request: Request) -> Response:
            extra = self.any_headers if self.any else self.headers(request)
            if request.scope["method"] == "OPTIONS":
                response = self.preflight(request, extra)
            else:
                try:
                    response = await endpoint(request)
                except WsiServerError as exc:  # the app's JSON error, with the headers
                    response = await self.on_error(request, exc)
            response.raw_headers.extend(extra)
            return response

        return with_cors

    @staticmethod
    def preflight(request: Request, extra: list[tuple[bytes, bytes]]) -> Response:
        if len(extra) < 2 or "access-control-request-method" not in request.headers:
            return JSONResponse({"error": "method_not_allowed",
                                 "detail": "OPTIONS is for CORS preflight requests"},
                                status_code=405, headers={"Allow": "GET, HEAD, OPTIONS"})
        return Response(status_code=204, headers={
            "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get(
                "access-control-request-headers", ""),
            "Access-Control-Max-Age": "86400",
        })


def _check_identifier(request: Request) -> None:
    """An identifier holding an escaped ``/`` (``%2F``) names no slide (slide ids never
    contain one), even though the decoded path would match another route's shape."""
    raw = request.scope.get("raw_path")
    if raw is not None and b"%" in raw and b"%2f" in raw.lower():
        raise SlideNotFound("no slide with this id")


def routes(ctx: AppContext) -> list[BaseRoute]:
    settings = ctx.settings
    service = ctx.tiles
    limits = Limits(settings.iiif_max_width, settings.iiif_max_width, settings.iiif_max_area)
    grids: dict[str, DeepZoomGeometry] = {}  # slide version -> its native grid

    def native_grid(entry: SlideEntry) -> DeepZoomGeometry:
        grid = grids.get(entry.fingerprint)
        if grid is None:
            if len(grids) >= _GRIDS_MAX:
                grids.clear()
            grid = grids[entry.fingerprint] = service.geometry(entry, "native")
        return grid

    def plan_of(entry: SlideEntry, params: dict[str, Any]) -> _Plan:
        """The request worked out: parsed, resolved, matched against the native grid."""
        meta = entry.metadata
        assert meta is not None
        l0_size = (meta.width, meta.height)
        region, size = params["region"], params["size"]
        rotation, quality_format = params["rotation"], params["quality_format"]
        fmt = _TILE_FORMATS.get(quality_format) if rotation == "0" else None
        if fmt is not None:  # how viewers ask tiles: first see if it is one, cheaply
            simple = resolve_tile_form(region, size, l0_size, limits)
            if simple is not None:
                address = native_tile(native_grid(entry), *simple)
                if address is not None:
                    return _Plan(None, fmt, address, _link(
                        canonical(*simple, l0_size, limits, f"0/{quality_format}")))
        resolved = resolve(parse_image_request(region, size, rotation, quality_format,
                                               FORMATS), l0_size, limits)
        fmt = _CODEC[resolved.fmt]
        address = None
        if resolved.plain and fmt != "webp":
            address = native_tile(native_grid(entry), resolved.l0_region, resolved.out_size)
        return _Plan(resolved, fmt, address, _link(resolved.canonical(l0_size, limits)))

    public_url = settings.public_url.rstrip("/") if settings.public_url else None

    def base_of(request: Request) -> str:
        """The public ``scheme://host[/prefix]`` (one pass over the raw headers: this is
        on every image request, for its canonical Link header)."""
        if public_url:
            return public_url
        scope = request.scope
        found: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _BASE_HEADERS:
                found[name.decode("latin-1")] = value.decode("latin-1")
        host = found.pop("host", "")
        if not host:
            server = scope.get("server") or ("localhost", 80)
            host = f"{server[0]}:{server[1]}"
        root = str(scope.get("root_path", ""))
        return public_base(None, found, scope.get("scheme", "http"), host,
                           root.removesuffix(PREFIX))

    def image_service(entry: SlideEntry, base: str) -> ImageService:
        assert entry.metadata is not None
        return ImageService(
            id=service_id(base, entry.id),
            l0_size=(entry.metadata.width, entry.metadata.height),
            tile=service.params_for(entry, "native").tile_size,
            limits=limits,
            formats=_EXTRA_FORMATS,
        )

    def json_response(request: Request, doc: dict[str, Any], context: str, key: str
                      ) -> Response:
        media_type = json_media_type(request.headers.get("accept", ""), context)
        etag = etag_for(f"{key}:{media_type}")
        headers = {
            "ETag": etag,
            "Cache-Control": ctx.cache_control(request, immutable=False),
            "Vary": _VARY,
        }
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        return Response(body, media_type=media_type, headers=headers)

    async def base_uri(request: Request) -> Response:
        _check_identifier(request)
        entry = await ctx.slide(request)
        return RedirectResponse(f"{service_id(base_of(request), entry.id)}/info.json",
                                status_code=303)

    async def info(request: Request) -> Response:
        _check_identifier(request)
        entry = await ctx.slide(request)
        svc = image_service(entry, base_of(request))
        return json_response(request, info_json(svc), IMAGE_CONTEXT,
                             f"info:{entry.fingerprint}:{svc.id}:{svc.tile}:{limits}")

    async def manifest_route(request: Request) -> Response:
        _check_identifier(request)
        entry = await ctx.slide(request)
        meta = entry.metadata
        assert meta is not None
        base = base_of(request)
        svc = image_service(entry, base)
        hidden = ctx.hidden_associated(request, entry)
        shown = [(label, name) for name, label in (("label", "Slide label"),
                                                   ("macro", "Macro (overview photo)"))
                 if name in meta.associated and name not in hidden]
        facts = SlideFacts(
            name=entry.name,
            metadata=_metadata(entry),
            associated=[(label, f"{base}/api/slides/{entry.id}/associated/{name}"
                                f"?v={entry.fingerprint}") for label, name in shown],
        )
        key = f"manifest:{entry.fingerprint}:{svc.id}:{svc.tile}:{limits}:{sorted(hidden)}"
        return json_response(request, manifest(base, entry.id, svc, facts),
                             PRESENTATION_CONTEXT, key)

    async def image(request: Request) -> Response:
        _check_identifier(request)
        entry = await ctx.slide(request)
        plan = plan_of(entry, request.path_params)
        ref: TileRef | ImageRef
        if plan.address is not None:  # a tile of the native grid: the Deep Zoom path
            ref = service.tile_ref(entry, native_grid(entry), *plan.address, plan.fmt)
        else:
            resolved = plan.resolved
            assert resolved is not None
            rotation = resolved.rotation
            quality = "color" if resolved.quality == "default" else resolved.quality
            ref = service.locate_image(entry, resolved.l0_region, resolved.out_size,
                                       float(rotation.degrees), rotation.mirror, quality,
                                       plan.fmt)
        headers = {
            "ETag": ref.etag,
            "Cache-Control": ctx.cache_control(request, immutable=False),
            "Link": f"<{base_of(request)}{PREFIX}/{entry.id}{plan.link}",
        }
        if ref.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        started = time.perf_counter()
        if isinstance(ref, TileRef):
            tile = await service.fetch(ref)
        else:
            tile = await service.fetch_image(ref)
        headers["X-Tile-Source"] = tile.source
        headers["Server-Timing"] = server_timing(tile.source, time.perf_counter() - started)
        return Response(tile.data, media_type=tile.media_type, headers=headers)

    async def nothing_here(request: Request) -> Response:
        raise NotFound("no IIIF resource at this address: /iiif/3/{id}/info.json, "
                       "/iiif/3/{id}/{region}/{size}/{rotation}/{quality}.{format}, "
                       "/iiif/3/{id}/manifest.json")

    cors = Cors(settings.iiif_cors_origins, ctx.metrics)
    methods = ["GET", "HEAD", "OPTIONS"]
    return [
        Mount(PREFIX, routes=[
            Route(path, cors.wrap(endpoint), methods=methods)
            for path, endpoint in (
                ("/{slide_id}/{region}/{size}/{rotation}/{quality_format}", image),
                ("/{slide_id}/info.json", info),
                ("/{slide_id}/manifest.json", manifest_route),
                ("/{slide_id}", base_uri),
                ("/{path:path}", nothing_here),
            )
        ])
    ]


def _metadata(entry: SlideEntry) -> list[tuple[str, str]]:
    """The slide facts a manifest lists (what the viewer's side panel shows)."""
    meta = entry.metadata
    assert meta is not None
    vendor = f" ({meta.vendor})" if meta.vendor and meta.vendor != meta.format else ""
    out = [("Format", meta.format + vendor),
           ("Dimensions", f"{meta.width:,} × {meta.height:,} px"),
           ("Levels", str(len(meta.levels)))]
    if meta.mpp:
        out.append(("Resolution", f"{meta.mpp[0]:.4g} × {meta.mpp[1]:.4g} µm/px"))
    if meta.objective_power:
        out.append(("Objective", f"{meta.objective_power:g}×"))
    return out
