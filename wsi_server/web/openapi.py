"""OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

The document is built from the app's router when first asked: every route the router holds
(flattened through mounts; ``HEAD`` goes with ``GET``) is a path of the document. What each
operation takes and answers is declared here, once, in ``OPERATIONS``; the standard fronts
(DICOMweb under ``/dicomweb``, IIIF under ``/iiif/3``), whose grammar their standards
define, are described coarsely by prefix in ``STANDARD_FRONTS``. A route that is neither is
still listed, marked ``x-undescribed``, and ``tests/test_openapi.py`` fails on it: a new
route needs its description here.

Links (``GET /api/slides`` to every slide operation, a created share link to its
revocation) let a client, or schemathesis's stateful tests, walk the API.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

Schema = dict[str, Any]

ERROR: Schema = {"$ref": "#/components/schemas/Error"}
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}
_NULLABLE_NUM: Schema = {"type": ["number", "null"]}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}

SLIDE_SUMMARY: Schema = {
    "type": "object",
    "required": ["id", "name", "status", "size_bytes", "version", "format", "vendor", "width",
                 "height", "level_count", "mpp", "objective_power"],
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
        "name": {"type": "string"},
        "status": {"enum": ["ready", "error"]},
        "size_bytes": {"type": "integer", "minimum": 0},
        "version": {"type": "string"},
        "format": _NULLABLE_STR,
        "vendor": _NULLABLE_STR,
        "width": _NULLABLE_INT,
        "height": _NULLABLE_INT,
        "level_count": {"type": "integer", "minimum": 0},
        "mpp": {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2,
                "maxItems": 2},
        "objective_power": _NULLABLE_NUM,
        "error": {"oneOf": [ERROR, {"type": "null"}]},
    },
}
SLIDE_DETAIL: Schema = {
    "allOf": [
        {"$ref": "#/components/schemas/SlideSummary"},
        {
            "type": "object",
            "required": ["can_share"],
            "properties": {
                "can_share": {"type": "boolean"},
                "levels": {"type": "array", "items": {
                    "type": "object", "required": ["width", "height", "downsample", "tile_size"],
                    "properties": {
                        "width": {"type": "integer"}, "height": {"type": "integer"},
                        "downsample": {"type": "number"},
                        "tile_size": {"type": ["array", "null"], "items": {"type": "integer"}},
                    }}},
                "tile_size": {"type": ["array", "null"], "items": {"type": "integer"}},
                "native_tile_size": {"type": "integer"},
                "bounds": {"type": ["array", "null"], "items": {"type": "integer"}},
                "background": {"type": "string", "pattern": "^[0-9a-f]{6}$"},
                "associated": {"type": "array", "items": {"type": "string"}},
                "properties": {"type": "object", "additionalProperties": {"type": "string"}},
                "dzi": {"type": "string"},
                "native_dzi": {"type": "string"},
                "tile_encoding": {"enum": ["stored", "reencoded"]},
            },
        },
    ]
}
SHARE: Schema = {
    "type": "object",
    "required": ["id", "slide_id", "expires_at"],
    "properties": {"id": {"type": "string"}, "slide_id": {"type": "string"},
                   "url": {"type": "string"}, "expires_at": {"type": "string"},
                   "note": _NULLABLE_STR},
}
COMPONENTS: Schema = {
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            "additionalProperties": False,
        },
        "SlideSummary": SLIDE_SUMMARY,
        "SlideDetail": SLIDE_DETAIL,
        "Share": SHARE,
    },
}

ERROR_TEXT = {
    "400": "Bad parameters", "401": "Not signed in", "403": "Not allowed",
    "404": "Not found (also a slide the requester may not see)", "405": "Method not allowed",
    "406": "Not acceptable", "410": "Gone (an expired share link)",
    "413": "Request body too large", "415": "Unsupported slide format",
    "422": "Unreadable slide (corrupt, truncated)", "429": "Too many requests",
    "501": "Not implemented", "503": "Backend unavailable",
}
COMMON_ERRORS = ("400", "401", "403", "404", "405")
SLIDE_ERRORS = (*COMMON_ERRORS, "415", "422", "503")


def json_body(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def body(media_type: str, description: str = "OK") -> Schema:
    return {"description": description, "content": {media_type: {}}}


def errors(*codes: str) -> dict[str, Schema]:
    return {c: json_body(ERROR, ERROR_TEXT[c]) for c in codes}


def param(name: str, where: str = "path", description: str = "", **schema: Any) -> Schema:
    out: Schema = {"name": name, "in": where, "required": where == "path",
                   "schema": schema or {"type": "string"}}
    if description:
        out["description"] = description
    return out


SLIDE_ID = param("slide_id", description="Opaque slide id (from GET /api/slides)",
                 type="string", pattern="^[A-Za-z0-9_-]{1,64}$")
ENCODING = param(
    "encoding", "query", type="string", enum=["stored", "reencoded"],
    description="Tiles of stored levels as the stored JPEG bytes (default) or re-encoded "
                "as JPEG 4:2:0 at the server's quality (lighter, for slow links). On a "
                "descriptor, OpenSeadragon copies it onto every tile URL.")
TILE_PARAMS = (
    SLIDE_ID, ENCODING,
    param("level", description="Deep Zoom level", type="string", pattern="^[0-9]{1,4}$"),
    param("tile", description="{col}_{row}.{jpeg|png}", type="string",
          pattern="^[0-9]{1,9}_[0-9]{1,9}\\.(jpeg|png)$"),
    param("v", "query", "The slide's version: the tile may then be cached for good"),
)
NOT_MODIFIED: Schema = {"description": "Not modified (If-None-Match)"}
REDIRECT: Schema = {"description": "Redirect"}
SLIDE_LINK = {"slide_id": "$response.body#/slides/0/id"}


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    responses: dict[str, Schema]
    parameters: Sequence[Schema] = ()
    request_body: Schema | None = None
    description: str = ""
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Response links of the 200 (or 201) answer: name to (operationId, parameters)."""

    def as_dict(self, operation_id: str) -> Schema:
        out: Schema = {"operationId": operation_id, "summary": self.summary,
                       "tags": [self.tag], "responses": dict(self.responses)}
        if self.description:
            out["description"] = self.description
        if self.parameters:
            out["parameters"] = list(self.parameters)
        if self.request_body is not None:
            out["requestBody"] = self.request_body
        return out


def _image(summary: str, tag: str, parameters: Sequence[Schema], media: Sequence[str],
           extra_errors: Sequence[str] = ()) -> Operation:
    ok = {"description": "The image", "content": {m: {} for m in media}}
    return Operation(summary, tag, {"200": ok, "304": NOT_MODIFIED,
                                    **errors(*SLIDE_ERRORS, *extra_errors)}, parameters)


OPERATIONS: dict[tuple[str, str], Operation] = {
    # -- JSON API ------------------------------------------------------------------------
    ("/api/slides", "get"): Operation(
        "The slides the requester may see", "slides",
        {"200": json_body({"type": "object", "required": ["slides"], "properties": {
            "slides": {"type": "array",
                       "items": {"$ref": "#/components/schemas/SlideSummary"}}}}),
         **errors(*COMMON_ERRORS)},
        links={"slide": {"operationId": "get_api_slides_slide_id", "parameters": SLIDE_LINK},
               "dzi": {"operationId": "get_slides_slide_id_dzi", "parameters": SLIDE_LINK},
               "native_dzi": {"operationId": "get_slides_slide_id_native_dzi",
                              "parameters": SLIDE_LINK},
               "thumbnail": {"operationId": "get_api_slides_slide_id_thumbnail",
                             "parameters": SLIDE_LINK},
               "share": {"operationId": "post_api_slides_slide_id_shares",
                         "parameters": SLIDE_LINK}},
    ),
    ("/api/slides/{slide_id}", "get"): Operation(
        "A slide's metadata (also of an unreadable slide: status error, with the reason)",
        "slides", {"200": json_body({"$ref": "#/components/schemas/SlideDetail"}),
                   **errors(*SLIDE_ERRORS)}, (SLIDE_ID,),
    ),
    ("/api/slides/{slide_id}/thumbnail", "get"): _image(
        "JPEG thumbnail", "slides",
        (SLIDE_ID, param("max_size", "query", "Longest side, 1-4096 (default 512)")),
        ("image/jpeg",)),
    ("/api/slides/{slide_id}/associated/{name}", "get"): _image(
        "An associated image the file carries (label, macro, thumbnail), as JPEG", "slides",
        (SLIDE_ID, param("name", description="label, macro, thumbnail...")),
        ("image/jpeg",)),
    ("/api/slides/{slide_id}/warm", "post"): Operation(
        "Render the coarsest levels of both geometries into the cache", "slides",
        {"200": json_body({"type": "object"}), **errors(*SLIDE_ERRORS)},
        (SLIDE_ID, param("levels", "query", "How many levels, 1-40 (default 12)")),
    ),
    ("/api/me", "get"): Operation(
        "Who is asking", "access",
        {"200": json_body({"type": "object", "required": ["auth", "kind", "admin"]}),
         **errors(*COMMON_ERRORS)},
    ),
    ("/api/slides/{slide_id}/shares", "post"): Operation(
        "Create a share link to a slide", "access",
        {"201": json_body({"$ref": "#/components/schemas/Share"}, "Created"),
         **errors(*SLIDE_ERRORS, "429")},
        (SLIDE_ID,),
        request_body={"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "properties": {
                "expires_in_days": {"type": "number", "exclusiveMinimum": 0},
                "note": {"type": "string", "maxLength": 500},
                "viewport": {"type": "object", "required": ["x", "y", "z"], "properties": {
                    "x": {"type": "number"}, "y": {"type": "number"},
                    "z": {"type": "number", "exclusiveMinimum": 0},
                    "r": {"type": "number"}}},
                "allow_associated": {"type": "boolean"}}}}}},
        links={"revoke": {"operationId": "delete_api_shares_share_id",
                          "parameters": {"share_id": "$response.body#/id"}}},
    ),
    ("/api/shares", "get"): Operation(
        "The requester's share links (all of them for an administrator with ?all=1)",
        "access",
        {"200": json_body({"type": "object", "required": ["shares"], "properties": {
            "shares": {"type": "array", "items": {"$ref": "#/components/schemas/Share"}}}}),
         **errors(*COMMON_ERRORS)},
        (param("all", "query", "1 or true: every user's links (administrators)"),),
    ),
    ("/api/shares/{share_id}", "delete"): Operation(
        "Revoke a share link", "access",
        {"200": json_body({"$ref": "#/components/schemas/Share"}), **errors(*COMMON_ERRORS)},
        (param("share_id"),),
    ),
    ("/s/{token}", "get"): Operation(
        "Open a share link: sets the share cookie and redirects to the viewer", "access",
        {"303": REDIRECT, **errors(*COMMON_ERRORS, "410", "429")}, (param("token"),),
    ),
    ("/auth/login", "get"): Operation(
        "Hospital sign-in (OpenID Connect): redirects to the identity provider", "access",
        {"302": REDIRECT, "303": REDIRECT, "307": REDIRECT,
         **errors(*COMMON_ERRORS, "503")},
        (param("next", "query", "Where to go after signing in"),),
    ),
    ("/auth/callback", "get"): Operation(
        "The identity provider's redirect back after sign-in", "access",
        {"303": REDIRECT, "200": body("text/html"), **errors(*COMMON_ERRORS, "503")},
    ),
    ("/auth/logout", "get"): Operation(
        "Sign out (a GET only shows the sign-out form)", "access",
        {"200": body("text/html"), "303": REDIRECT, **errors(*COMMON_ERRORS)},
    ),
    ("/auth/logout", "post"): Operation(
        "Sign out", "access", {"303": REDIRECT, **errors(*COMMON_ERRORS)},
    ),
    ("/api/audit", "get"): Operation(
        "The audit trail, newest first (administrators)", "audit",
        {"200": {"description": "Events", "content": {
            "application/json": {"schema": {"type": "object", "required": ["events"]}},
            "text/csv": {}}}, **errors(*COMMON_ERRORS)},
        tuple(param(n, "query") for n in ("user", "slide", "action", "since", "until",
                                           "limit", "offset", "format")),
    ),
    ("/api/audit/fhir", "get"): Operation(
        "The audit trail as a FHIR R4 Bundle of AuditEvents (administrators)", "audit",
        {"200": {"description": "Bundle", "content": {"application/fhir+json": {}}},
         **errors(*COMMON_ERRORS)},
        tuple(param(n, "query") for n in ("user", "slide", "action", "since", "until",
                                           "limit", "offset")),
    ),
    ("/api/ingest", "get"): Operation(
        "The ingest queue, recent events and failures (administrators)", "ingest",
        {"200": json_body({"type": "object"}), **errors(*COMMON_ERRORS)},
    ),
    # -- Deep Zoom ---------------------------------------------------------------------------
    ("/slides/{slide_id}.dzi", "get"): Operation(
        "Deep Zoom descriptor in the server's geometry (default 254 px, overlap 1)",
        "deepzoom", {"200": body("application/xml"), **errors(*SLIDE_ERRORS)},
        (SLIDE_ID, ENCODING),
    ),
    ("/slides/{slide_id}/native.dzi", "get"): Operation(
        "Deep Zoom descriptor on the slide's native tile grid (overlap 0)", "deepzoom",
        {"200": body("application/xml"), **errors(*SLIDE_ERRORS)}, (SLIDE_ID, ENCODING),
    ),
    ("/slides/{slide_id}_files/{level}/{tile}", "get"): _image(
        "A tile in the server's geometry", "deepzoom", TILE_PARAMS,
        ("image/jpeg", "image/png")),
    ("/slides/{slide_id}/native_files/{level}/{tile}", "get"): _image(
        "A tile on the native grid (stored JPEG tiles pass through unchanged)", "deepzoom",
        TILE_PARAMS, ("image/jpeg", "image/png")),
    # -- operations -------------------------------------------------------------------------
    ("/healthz", "get"): Operation(
        "Liveness", "operations",
        {"200": json_body({"type": "object", "required": ["status"],
                           "properties": {"status": {"const": "ok"}}})},
    ),
    ("/readyz", "get"): Operation(
        "Readiness: library loaded, state store and cache reachable", "operations",
        {"200": json_body({"type": "object", "required": ["status"]}),
         "503": json_body({"type": "object", "required": ["status"]}, "Not ready")},
    ),
    ("/metrics", "get"): Operation(
        "Prometheus metrics", "operations", {"200": body("text/plain")},
    ),
    ("/openapi.json", "get"): Operation(
        "This description (OpenAPI 3.1)", "operations", {"200": body("application/json")},
    ),
    ("/bench/bytes/{n}", "get"): Operation(
        "Benchmark only (--bench-routes): n bytes with a tile's headers", "operations",
        {"200": body("image/jpeg"), **errors("400")}, (param("n"),),
    ),
    # -- viewer -------------------------------------------------------------------------------
    ("/", "get"): Operation("The slide library page", "viewer", {"200": body("text/html")}),
    ("/view/{slide_id}", "get"): Operation(
        "The viewer page of a slide (404 when the requester may not see it)", "viewer",
        {"200": body("text/html"), "404": body("text/html", "No such slide"),
         "503": body("text/html", "The viewer's OpenSeadragon files are missing")},
        (param("slide_id"),),
    ),
    ("/audit", "get"): Operation("The audit trail page", "viewer", {"200": body("text/html")}),
    ("/viewer/static/{name}", "get"): Operation(
        "The viewer's own scripts and styles", "viewer",
        {"200": {"description": "A file", "content": {
            "text/javascript": {}, "text/css": {}, "image/svg+xml": {}}},
         "304": NOT_MODIFIED, **errors("404")},
        (param("name"),),
    ),
    ("/viewer/osd/{path}", "get"): Operation(
        "OpenSeadragon's build (script and button images)", "viewer",
        {"200": {"description": "A file", "content": {"*/*": {}}}, "304": NOT_MODIFIED,
         **errors("404", "405")},
        (param("path"),),
    ),
}

STANDARD_FRONTS: tuple[tuple[str, str, str], ...] = (
    ("/dicomweb/", "dicomweb",
     "DICOMweb (DICOM PS3.18): QIDO-RS, WADO-RS and STOW-RS over the slides as DICOM "
     "whole-slide studies; see the standard for each resource's grammar and media types"),
    ("/iiif/3/", "iiif",
     "IIIF Image API 3.0 and Presentation API 3.0: info.json, images, manifests; see the "
     "standards for the grammar of each path"),
)


def _standard_operation(path: str, method: str, tag: str, text: str) -> Operation:
    names = re.findall(r"{(\w+)", path)
    return Operation(
        f"{tag}: {method.upper()} {path}", tag,
        # media types as the standard defines them (several per resource, by Accept)
        {"2XX": {"description": "As the standard defines"},
         "3XX": REDIRECT,
         "4XX": {"description": "Refused (a JSON error, or as the standard defines)"}},
        tuple(param(n) for n in names), description=text,
    )


def _path_of(template: str) -> str:
    """A Starlette path template as an OpenAPI one: ``{path:path}`` is ``{path}``."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", template)


def route_table(routes: Iterable[BaseRoute], prefix: str = "") -> list[tuple[str, str]]:
    """(OpenAPI path, lower-case method) of every route, mounts flattened; HEAD omitted."""
    out: list[tuple[str, str]] = []
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    out.append((_path_of(prefix + route.path), method.lower()))
        elif isinstance(route, Mount):
            inner = route.routes
            if inner:
                out += route_table(inner, prefix + route.path)
            else:  # an app (static files): everything below it
                out.append((_path_of(prefix + route.path + "/{path}"), "get"))
    return out


def operation_id(path: str, method: str) -> str:
    return method + "_" + "_".join(re.findall(r"[A-Za-z0-9]+", path.replace(".", "_")))


def describe(path: str, method: str) -> Operation | None:
    """The description of one route: declared, or coarse for a standard front."""
    op = OPERATIONS.get((path, method))
    if op is not None:
        return op
    for prefix, tag, text in STANDARD_FRONTS:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return _standard_operation(path, method, tag, text)
    return None


def undescribed(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """Routes of the router that have no description here."""
    return [(p, m) for p, m in route_table(routes) if describe(p, m) is None]


def document(routes: Iterable[BaseRoute]) -> Schema:
    """The OpenAPI 3.1 document of the app whose router holds ``routes``."""
    table = route_table(routes)
    present = {operation_id(p, m) for p, m in table}
    paths: dict[str, dict[str, Schema]] = {}
    for path, method in table:
        op = describe(path, method)
        oid = operation_id(path, method)
        if op is None:
            entry: Schema = {"operationId": oid, "summary": "(not described)",
                             "x-undescribed": True,
                             "responses": {"default": {"description": "Any"}}}
            names = re.findall(r"{(\w+)}", path)
            if names:
                entry["parameters"] = [param(n) for n in names]
        else:
            entry = op.as_dict(oid)
            ok = "201" if "201" in op.responses else "200"
            links = {name: link for name, link in op.links.items()
                     if link["operationId"] in present}
            if links:
                entry["responses"][ok] = {**entry["responses"][ok], "links": links}
        paths.setdefault(path, {})[method] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsi-server",
            "version": _version(),
            "description": "Whole-slide pathology tile server: slides as Deep Zoom, IIIF and "
                           "DICOMweb, a JSON API, share links and the audit trail. Errors are "
                           "JSON {\"error\": code, \"detail\": text}.",
        },
        "paths": paths,
        "components": COMPONENTS,
        "tags": [{"name": t} for t in ("slides", "deepzoom", "access", "audit", "ingest",
                                        "operations", "viewer", "dicomweb", "iiif")],
    }


def _version() -> str:
    from wsi_server import __version__

    return __version__


def routes() -> list[BaseRoute]:
    """``GET /openapi.json``, built from the serving app's router on first request."""
    built: list[Schema] = []

    async def openapi_json(request: Request) -> Response:
        if not built:
            built.append(document(request.app.router.routes))
        return JSONResponse(built[0], headers={"Cache-Control": "no-cache"})

    return [Route("/openapi.json", openapi_json)]
