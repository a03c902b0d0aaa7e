"""The web viewer: the slide library at ``/``, an OpenSeadragon viewer at ``/view/{id}`` and
the audit trail for administrators at ``/audit``.

The pages are plain HTML, CSS and JavaScript modules from ``viewer/static`` that talk to
the JSON API; nothing is rendered per slide or per user on the server: who is looking
(name, sign-out, share banner, the Share button) comes from ``GET /api/me``, and what they
may see is decided by the API (a non-admin opening ``/audit`` reads the API's 403). No
page has inline script or event handlers (the Content-Security-Policy allows none).

OpenSeadragon itself is an npm package (``package.json`` at the repository root,
installed by ``npm ci``) and is served from its build folder, never from a CDN and never
copied into the repository:

1. the ``osd_dir`` argument (tests),
2. else the ``viewer_assets`` setting (``--viewer-assets`` / ``WSI_VIEWER_ASSETS``: e.g. a
   container that copies ``node_modules/openseadragon/build/openseadragon`` elsewhere),
3. else ``viewer/osd`` inside the installed package: a wheel carries it (the build hook in
   ``setup.py`` installs the pinned version from npm when the wheel is built),
4. else ``node_modules/openseadragon/build/openseadragon`` at the repository root (a
   source checkout or an editable install, after ``npm ci``).

When OpenSeadragon is missing the viewer page says how to install it instead of failing.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from wsi_server.errors import NotFound
from wsi_server.settings import Settings

if TYPE_CHECKING:
    from wsi_server.context import AppContext

STATIC_DIR = Path(__file__).resolve().parent / "static"
REPO_ROOT = Path(__file__).resolve().parents[2]
OSD_BUILD = Path("node_modules", "openseadragon", "build", "openseadragon")
PACKAGED_OSD = Path(__file__).resolve().parent / "osd"
"""Where a wheel carries OpenSeadragon's build (written by the build hook, never committed)."""
OSD_SCRIPT = "openseadragon.min.js"

# The pages are re-checked on each visit (they name the asset version); the viewer's own
# files are versioned by a content hash in their URL; OpenSeadragon's images are not.
PAGE_CACHE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
ASSET_CACHE = "public, max-age=86400"


def osd_assets_dir(osd_dir: Path | None = None) -> Path:
    """Where OpenSeadragon's build (``openseadragon.min.js`` and ``images/``) is looked for."""
    if osd_dir is not None:
        return osd_dir
    if (PACKAGED_OSD / OSD_SCRIPT).is_file():
        return PACKAGED_OSD
    return REPO_ROOT / OSD_BUILD


class _Assets(StaticFiles):
    """OpenSeadragon's files: cached for good when the URL names the current version
    (``?v=``), for a day otherwise (its button images). A missing folder (OpenSeadragon not
    installed) answers 404 like a missing file, not 500."""

    def __init__(self, directory: Path, version: str) -> None:
        super().__init__(directory=directory, check_dir=False)
        self.version = version

    async def check_config(self) -> None:
        return None

    def file_response(self, full_path: os.PathLike[str] | str, stat_result: os.stat_result,
                      scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = f"v={self.version}".encode() in scope.get("query_string", b"").split(b"&")
        response.headers["Cache-Control"] = IMMUTABLE if versioned else ASSET_CACHE
        return response


def _version(folder: Path, names: list[str]) -> str:
    """A short hash of the named files (the static folder and OpenSeadragon's script), so a
    new release or ``npm ci`` changes every asset URL."""
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _missing_assets_page(osd: Path) -> str:
    where = html.escape(str(osd))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Viewer not installed · wsi-server</title>
<link rel="stylesheet" href="/viewer/static/common.css"></head>
<body class="page-message"><main class="message-card" role="alert">
<h1>The slide viewer is not installed</h1>
<p>The server runs, but the viewer's OpenSeadragon files were not found in
<code>{where}</code>.</p>
<p>Install them from the repository root with</p>
<pre>npm ci</pre>
<p>(or run <code>./dev serve</code>, which does it), then reload this page. A packaged
install can point <code>WSI_VIEWER_ASSETS</code> at a copy of
<code>node_modules/openseadragon/build/openseadragon</code>.</p>
<p><a href="/">Back to the slide library</a></p>
</main></body></html>"""


_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _static_files(version: str) -> dict[str, tuple[bytes, str]]:
    """The viewer's own files, read once, with ``{{v}}`` replaced by the asset version so
    that pages and module imports name versioned URLs that can be cached for good."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            text = path.read_text(encoding="utf-8").replace("{{v}}", version)
            files[path.name] = (text.encode(), media_type)
    return files


def routes(ctx: AppContext) -> list[BaseRoute]:
    """The viewer front; ``/view/{id}`` answers 404 for a slide the requester may not see
    (the page itself then says why, from the API's error)."""

    async def visible(request: Request) -> bool:
        try:
            await ctx.slide(request, readable=False)
        except NotFound:
            return False
        return True

    return viewer_routes(ctx.settings, slide_visible=visible)


def viewer_routes(
    settings: Settings,
    osd_dir: Path | None = None,
    slide_visible: Callable[[Request], Awaitable[bool]] | None = None,
) -> list[BaseRoute]:
    """``/``, ``/view/{id}``, ``/audit``, ``/viewer/static/{name}`` and ``/viewer/osd/*``.

    The viewer needs nothing from ``settings``: what it may show (``--hide-associated``)
    is decided by the API it reads.
    """
    osd = osd_assets_dir(osd_dir or settings.viewer_assets)
    static_names = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
    version = _version(STATIC_DIR, static_names) + _version(osd, [OSD_SCRIPT])
    files = _static_files(version)
    etag = f'"{version}"'

    def page(name: str) -> Response:
        data, media_type = files[name]
        return Response(data, media_type=media_type, headers={"Cache-Control": PAGE_CACHE})

    async def index(request: Request) -> Response:
        return page("index.html")

    async def view(request: Request) -> Response:
        # The page reads the slide id from its own URL; unknown or unreadable slides are
        # reported by the page from the API's JSON error.
        if not (osd / OSD_SCRIPT).is_file():
            return HTMLResponse(_missing_assets_page(osd), status_code=503,
                                headers={"Cache-Control": PAGE_CACHE})
        response = page("view.html")
        if slide_visible is not None and not await slide_visible(request):
            response.status_code = 404
        return response

    async def audit(request: Request) -> Response:
        return page("audit.html")

    async def static(request: Request) -> Response:
        name = str(request.path_params["name"])
        if name not in files or name.endswith(".html"):
            raise NotFound("no such viewer file")
        versioned = request.query_params.get("v") == version
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE if versioned else PAGE_CACHE}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        data, media_type = files[name]
        return Response(data, media_type=media_type, headers=headers)

    return [
        Route("/", index),
        Route("/view/{slide_id}", view),
        Route("/audit", audit),
        Route("/viewer/static/{name}", static),
        Mount("/viewer/osd", app=_Assets(osd, version), name="viewer-osd"),
    ]
