"""IIIF in real viewers, in headless Chromium (``-m browser``; fixtures in
tests/plugins/browser.py):

- the web viewer opened through the slide's IIIF service (``/view/{id}?source=iiif``:
  OpenSeadragon's ``IIIFTileSource`` from the npm package the project pins) paints the same
  pixels as through Deep Zoom, at several zooms and a rotation;
- Mirador (npm, pinned in package.json) on a page of another origin opens the slide's
  Presentation 3 manifest (so over CORS) and displays tissue.

Named to sort with the other browser tests, after the asyncio tests: run before them, the
session's Chromium (Playwright's sync API) made pytest-asyncio's runner find a running
event loop in test_oidc.py and test_tokens.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sample_slides import write_svs_like
from tests.conftest import ROOT
from tests.test_viewer import open_viewer, osd_installed

MIRADOR = ROOT / "node_modules" / "mirador" / "dist" / "mirador.min.js"


def mirador_installed() -> None:
    if not MIRADOR.is_file():
        if os.environ.get("CI"):
            pytest.fail("Mirador is not installed in CI (npm ci)")
        pytest.skip("Mirador not installed: run `npm ci` at the repository root")


@pytest.fixture
def page_server() -> Iterator[Callable[[dict[str, tuple[bytes, str]]], str]]:
    """Serve a few files (path -> (body, content type)) on another loopback port: a page of
    another origin than the app's, which Chromium lets reach loopback (a page of a public
    origin may not: Private Network Access)."""
    servers: list[ThreadingHTTPServer] = []

    def start(files: dict[str, tuple[bytes, str]]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, content_type = files.get(self.path, (b"not found", "text/plain"))
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def viewer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("iiif-viewers")
    write_svs_like(d / "tissue.svs", 3000, 2100, tile=256, downsamples=(1, 4, 16), mpp=0.5)
    return d


def canvas_pixels(page: Any) -> np.ndarray:
    url = page.evaluate("() => wsiViewer.drawer.canvas.toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def pink_fraction(rgb: np.ndarray) -> float:
    r, g, b = rgb[..., 0].astype(int), rgb[..., 1].astype(int), rgb[..., 2].astype(int)
    return float(((r > 150) & (r - g > 40) & (b - g > 15)).mean())


@pytest.mark.browser
def test_openseadragon_iiif_source_paints_the_deep_zoom_pixels(
    page: Any, live_server: Any, viewer_dir: Path
) -> None:
    osd_installed()
    base = live_server(viewer_dir)
    sid = httpx.get(f"{base}/api/slides").json()["slides"][0]["id"]
    tiles: list[str] = []
    page.on("requestfinished", lambda r: tiles.append(r.url) if "/iiif/3/" in r.url else None)
    for view in ("", "x=1500&y=1050&z=0.25", "x=700&y=600&z=1", "x=2300&y=1700&z=0.6&r=90"):
        open_viewer(page, f"{base}/view/{sid}?{view}&source=iiif")
        assert page.evaluate("() => wsiViewer.world.getItemAt(0).source instanceof "
                             "OpenSeadragon.IIIFTileSource")
        iiif = canvas_pixels(page)
        assert "source=iiif" in page.url  # the view kept in the URL keeps the source
        open_viewer(page, f"{base}/view/{sid}?{view}")
        assert page.evaluate("() => wsiViewer.world.getItemAt(0).source instanceof "
                             "OpenSeadragon.DziTileSource")
        dz = canvas_pixels(page)
        assert iiif.shape == dz.shape and iiif.shape[1] > 500
        diff = float(np.abs(iiif - dz).mean())
        assert diff < 1.5, (view, diff)  # the same tiles, drawn at the same places
        assert pink_fraction(iiif) > 0.05, view
    image_requests = [u for u in tiles if u.endswith("/default.jpg")]
    assert len(image_requests) > 20
    assert any("/full/" in u for u in image_requests)  # the top of the pyramid
    assert any(",256,256/256,256/" in u for u in image_requests)  # full-resolution tiles
    assert not [m for m in page.wsi_console if "pageerror" in m], page.wsi_console


@pytest.mark.browser
def test_mirador_opens_the_manifest_and_shows_tissue(
    page: Any, live_server: Any, page_server: Any, viewer_dir: Path
) -> None:
    mirador_installed()
    base = live_server(viewer_dir)
    sid = httpx.get(f"{base}/api/slides").json()["slides"][0]["id"]
    manifest = f"{base}/iiif/3/{sid}/manifest.json"
    config = {
        "id": "mirador",
        "windows": [{"manifestId": manifest, "thumbnailNavigationPosition": "off"}],
        "window": {"allowClose": False, "sideBarOpen": False},
        "workspaceControlPanel": {"enabled": False},
    }
    html = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Mirador</title></head>'
        '<body style="margin:0"><div id="mirador" style="position:absolute;inset:0"></div>'
        '<script src="/mirador.min.js"></script>'
        f"<script>Mirador.viewer({json.dumps(config)});</script></body></html>"
    )

    origin = page_server({"/": (html.encode(), "text/html"),
                          "/mirador.min.js": (MIRADOR.read_bytes(), "text/javascript")})
    seen: list[tuple[str, int, str | None]] = []
    page.on("response", lambda r: seen.append(
        (r.url, r.status, r.headers.get("access-control-allow-origin")))
        if "/iiif/3/" in r.url else None)
    page.goto(f"{origin}/")
    page.wait_for_selector(".openseadragon-canvas canvas", state="attached", timeout=30_000)
    page.wait_for_function(
        f"() => performance.getEntriesByType('resource').filter("
        f"e => e.name.includes('/iiif/3/{sid}/') && e.name.endsWith('/default.jpg')).length >= 4",
        timeout=30_000,
    )
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # Mirador's OpenSeadragon blends tiles in
    osd = page.query_selector(".openseadragon-canvas")
    assert osd is not None
    shot = np.asarray(Image.open(io.BytesIO(osd.screenshot())).convert("RGB"))
    assert shot.shape[0] > 200 and shot.shape[1] > 300
    assert pink_fraction(shot) > 0.05, "Mirador shows no tissue"
    urls = [u for u, _, _ in seen]
    assert manifest in urls and any(u.endswith("/info.json") for u in urls)
    assert all(status == 200 and cors == "*" for _, status, cors in seen), seen
    errors = [m for m in page.wsi_console if "pageerror" in m or "CORS" in m]
    assert not errors, errors
