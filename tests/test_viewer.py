"""The web viewer: pages and assets over HTTP, then the real thing in headless Chromium.

Browser tests (``-m browser``) start the app with uvicorn on a loopback port and drive
Debian's Chromium through Playwright (fixtures in tests/plugins/browser.py). They read
what a pathologist would see: canvas pixels, the scale bar's drawn length and label, the
viewport after opening a link.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from sample_slides import write_svs_like
from tests.conftest import ROOT, real_slide
from wsi_server.viewer import OSD_BUILD, OSD_SCRIPT, osd_assets_dir

MPP = 0.5  # the viewer slide's pixel size, written into the file below
POWER = 20  # what Aperio writes for that pixel size (AppMag)


def osd_installed() -> None:
    if not (osd_assets_dir() / OSD_SCRIPT).is_file():
        if os.environ.get("CI"):
            pytest.fail("OpenSeadragon is not installed in CI (npm ci)")
        pytest.skip("OpenSeadragon not installed: run `npm ci` at the repository root")


@pytest.fixture(scope="module")
def viewer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40×-style pyramid with pink tissue on white, a label and a macro."""
    d = tmp_path_factory.mktemp("viewer")
    write_svs_like(d / "tissue.svs", 3000, 2100, tile=256, downsamples=(1, 4, 16), mpp=MPP)
    return d


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory: pytest.TempPathFactory, viewer_dir: Path) -> Path:
    """A readable slide and an SVS cut off after its first 4 KB (an interrupted copy)."""
    d = tmp_path_factory.mktemp("broken")
    good = (viewer_dir / "tissue.svs").read_bytes()
    (d / "tissue.svs").write_bytes(good)
    (d / "truncated.svs").write_bytes(good[:4096])
    return d


def slides_of(base: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{base}/api/slides", timeout=30).json()
    return {s["name"]: s for s in body["slides"]}


# -- pages and assets (no browser) -------------------------------------------------------
def test_pages_and_versioned_assets(make_client: Any, viewer_dir: Path) -> None:
    osd_installed()
    client = make_client(paths=(viewer_dir,))
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    scripts = re.findall(r'src="(/viewer/[^"]+)"', index.text)
    assert scripts, "the library page loads its script"
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    view = client.get(f"/view/{sid}")
    assert view.status_code == 200
    urls = re.findall(r'(?:src|href)="(/viewer/[^"]+)"', view.text)
    assert any("openseadragon.min.js" in u for u in urls)
    for url in urls + scripts:
        r = client.get(url)
        assert r.status_code == 200, url
        assert "immutable" in r.headers["cache-control"], url  # versioned: cached for good
        assert "{{v}}" not in r.text
        again = client.get(url, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, url
    # OpenSeadragon's button images come from the same installed package.
    assert client.get("/viewer/osd/images/zoomin_rest.png").headers["content-type"] == "image/png"
    assert client.get("/viewer/static/nothing.js").json()["error"] == "not_found"


def test_missing_openseadragon_says_how_to_install(
    make_client: Any, viewer_dir: Path, tmp_path: Path
) -> None:
    client = make_client(paths=(viewer_dir,), viewer_assets=tmp_path / "not-installed")
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    r = client.get(f"/view/{sid}")
    assert r.status_code == 503
    assert "npm ci" in r.text and "<html" in r.text
    missing = client.get("/viewer/osd/openseadragon.min.js")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert client.get("/").status_code == 200  # the library still works


def test_openseadragon_is_pinned_not_committed() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    version = package["dependencies"]["openseadragon"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "an exact version, not a range"
    lock = json.loads((ROOT / "package-lock.json").read_text())
    locked = lock["packages"]["node_modules/openseadragon"]
    assert locked["version"] == version and locked["integrity"].startswith("sha512-")
    assert OSD_BUILD.parts[0] == "node_modules"
    static = ROOT / "wsi_server" / "viewer" / "static"
    assert not [p for p in static.rglob("*") if "openseadragon" in p.name.lower()]


# -- in Chromium ---------------------------------------------------------------------------
def open_viewer(page: Any, url: str) -> None:
    """Navigate and wait until every tile the view needs has been drawn."""
    page.goto(url)
    page.wait_for_function(
        "() => window.wsiViewer && wsiViewer.world.getItemCount() > 0"
        " && wsiViewer.world.getItemAt(0).getFullyLoaded()"
    )


def viewport_state(page: Any) -> dict[str, float]:
    return page.evaluate(
        """() => {
        const vp = wsiViewer.viewport;
        const c = vp.viewportToImageCoordinates(vp.getCenter(true));
        return {x: c.x, y: c.y, z: vp.viewportToImageZoom(vp.getZoom(true)),
                r: vp.getRotation(true)};
    }"""
    )


@pytest.mark.browser
@pytest.mark.real_slides
def test_library_lists_real_and_synthetic_slides(
    page: Any, live_server: Any, synthetic_dir: Path
) -> None:
    real = [real_slide("svs"), real_slide("ndpi"), real_slide("dicom")]
    base = live_server(synthetic_dir, *real)
    expected = slides_of(base)
    assert {p.name for p in real} <= set(expected)
    page.goto(base + "/")
    page.wait_for_selector("#rows tr[data-id]")
    rows = page.eval_on_selector_all(
        "#rows tr[data-id]",
        "rs => rs.map(r => ({id: r.dataset.id, text: r.innerText}))",
    )
    assert {r["id"] for r in rows} == {s["id"] for s in expected.values()}
    for row in rows:
        slide = next(s for s in expected.values() if s["id"] == row["id"])
        assert slide["name"] in row["text"]
        assert f"{slide['width']:,} × {slide['height']:,}" in row["text"]
    # Thumbnails are real images from the server.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#rows img')].every(i => i.complete)"
    )
    widths = page.eval_on_selector_all("#rows img", "is => is.map(i => i.naturalWidth)")
    assert len(widths) == len(expected) and min(widths) > 0
    # Search narrows the list; the URL keeps it.
    page.fill("#search", "ndpi")
    shown = page.eval_on_selector_all("#rows tr[data-id]", "rs => rs.map(r => r.dataset.id)")
    assert shown == [expected[real[1].name]["id"]]
    assert "q=ndpi" in page.url
    # Sorting by file size, largest first, follows the sizes the API reports.
    page.fill("#search", "")
    page.select_option("#sort", "size")
    page.click("#order")
    shown = page.eval_on_selector_all("#rows tr[data-id]", "rs => rs.map(r => r.dataset.id)")
    by_size = sorted(expected.values(), key=lambda s: -s["size_bytes"])
    assert shown == [s["id"] for s in by_size]
    # A row opens its viewer.
    page.click(f"#rows tr[data-id='{expected[real[0].name]['id']}'] td.dim")
    page.wait_for_url(re.compile(r"/view/"))
    assert page.url.endswith(f"/view/{expected[real[0].name]['id']}")


PINK = """() => {
  const c = wsiViewer.drawer.canvas;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let pink = 0, n = 0;
  for (let i = 0; i < d.length; i += 4 * 7) {
    const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
    n += 1;
    if (r > 150 && r - g > 40 && b - g > 15) pink += 1;
  }
  return {pink: pink / n, width: c.width, height: c.height};
}"""


@pytest.mark.browser
def test_viewer_paints_tissue(page: Any, live_server: Any, viewer_dir: Path) -> None:
    osd_installed()
    base = live_server(viewer_dir)
    sid = slides_of(base)["tissue.svs"]["id"]
    open_viewer(page, f"{base}/view/{sid}")
    sample = page.evaluate(PINK)
    assert sample["width"] > 500 and sample["height"] > 400
    assert sample["pink"] > 0.15, sample  # stained tissue on the canvas, not a blank view
    # Deep in, at full resolution, the canvas still shows tissue from level-0 tiles.
    open_viewer(page, f"{base}/view/{sid}?x=1500&y=1050&z=1")
    assert page.evaluate(PINK)["pink"] > 0.05
    # The viewer records when its first tile was drawn (how fast is the benchmarks' job,
    # not a timed test's: see benchmarks/bench_fov.py).
    first_ms = page.evaluate("() => window.wsiFirstTileMs")
    assert first_ms is not None and first_ms > 0, first_ms
    assert not [m for m in page.wsi_console if "pageerror" in m], page.wsi_console


def scale_bar(page: Any) -> tuple[float, float]:
    """The scale bar's label in micrometres and its drawn length in CSS pixels."""
    label = page.inner_text("#scalebar .label").strip()
    m = re.fullmatch(r"([\d.]+) (µm|mm)", label)
    assert m, label
    um = float(m.group(1)) * (1000 if m.group(2) == "mm" else 1)
    px = page.eval_on_selector("#scalebar .bar", "b => b.getBoundingClientRect().width")
    return um, px


@pytest.mark.browser
def test_scale_bar_and_magnification_follow_mpp(
    page: Any, live_server: Any, viewer_dir: Path
) -> None:
    osd_installed()
    base = live_server(viewer_dir)
    sid = slides_of(base)["tissue.svs"]["id"]
    # z=1: one screen pixel is one slide pixel, MPP micrometres.
    open_viewer(page, f"{base}/view/{sid}?x=1500&y=1050&z=1")
    um, px = scale_bar(page)
    assert um / px == pytest.approx(MPP, rel=0.02)
    assert page.inner_text("#mag").strip() == f"{POWER}×"
    # Key 4 is the fourth standard magnification, 10×: half the scan's 20×.
    page.keyboard.press("4")
    page.wait_for_function(
        "() => Math.abs(Number(document.querySelector('#mag').dataset.magnification) - 10) < 0.05"
    )
    page.wait_for_timeout(700)  # let the zoom animation settle
    um, px = scale_bar(page)
    assert um / px == pytest.approx(MPP * POWER / 10, rel=0.02)
    assert page.inner_text("#mag").strip() == "10×"
    buttons = page.eval_on_selector_all("#mags button", "bs => bs.map(b => b.innerText)")
    assert buttons == ["1.25×", "2.5×", "5×", "10×", "20×"]  # nothing beyond the scan's 20×


@pytest.mark.browser
def test_url_viewport_opens_there_and_history_steps_back(
    page: Any, live_server: Any, viewer_dir: Path, chromium: Any
) -> None:
    osd_installed()
    base = live_server(viewer_dir)
    sid = slides_of(base)["tissue.svs"]["id"]
    open_viewer(page, f"{base}/view/{sid}?x=2100&y=700&z=0.5&r=90")
    state = viewport_state(page)
    assert state["x"] == pytest.approx(2100, abs=2)
    assert state["y"] == pytest.approx(700, abs=2)
    assert state["z"] == pytest.approx(0.5, rel=0.01)
    assert state["r"] == pytest.approx(90)
    first_url = page.url
    # Change the view (key 5: 20×): the URL follows with a new history entry.
    page.keyboard.press("5")
    page.wait_for_function(f"() => location.href !== {json.dumps(first_url)}", timeout=5000)
    moved = page.url
    assert "z=1&" in moved or moved.endswith("z=1")
    # The copied link opens a colleague's browser on the same view.
    other = chromium.new_page(viewport={"width": 1000, "height": 700})
    try:
        open_viewer(other, moved)
        theirs = viewport_state(other)
        assert theirs["z"] == pytest.approx(1, rel=0.01)
        assert theirs["x"] == pytest.approx(2100, abs=8)
        assert theirs["r"] == pytest.approx(90)
    finally:
        other.close()
    # Back returns to the first view, forward to the second.
    page.go_back()
    page.wait_for_function("() => Math.abs(wsiViewer.viewport.viewportToImageZoom("
                           "wsiViewer.viewport.getZoom(true)) - 0.5) < 0.005")
    assert page.url == first_url
    page.go_forward()
    page.wait_for_function("() => Math.abs(wsiViewer.viewport.viewportToImageZoom("
                           "wsiViewer.viewport.getZoom(true)) - 1) < 0.01")
    page.wait_for_timeout(600)
    assert page.url == moved  # stepping through history adds no entries


@pytest.mark.browser
def test_broken_slide_shows_the_error(page: Any, live_server: Any, broken_dir: Path) -> None:
    osd_installed()
    base = live_server(broken_dir)
    slides = slides_of(base)
    broken = slides["truncated.svs"]
    assert broken["status"] == "error"
    page.goto(base + "/")
    row = page.wait_for_selector(f"#rows tr[data-id='{broken['id']}']")
    assert "Unreadable" in row.inner_text()
    assert broken["error"]["detail"] in row.inner_text()
    page.goto(f"{base}/view/{broken['id']}")
    page.wait_for_selector("#slide-error:not([hidden])")
    text = page.inner_text("#slide-error")
    assert "cannot be displayed" in text and broken["error"]["detail"] in text
    assert page.is_hidden("#scalebar")
    # An id that does not exist: the API's 404 detail, not a blank page.
    page.goto(f"{base}/view/no-such-slide")
    page.wait_for_selector("#slide-error:not([hidden])")
    assert "slide_not_found" in page.inner_text("#slide-error") or \
        "no slide" in page.inner_text("#slide-error").lower()


@pytest.mark.browser
@pytest.mark.parametrize("hide", [False, True], ids=["shown", "hidden"])
def test_hide_associated_hides_the_label(
    page: Any, live_server: Any, viewer_dir: Path, hide: bool
) -> None:
    osd_installed()
    base = live_server(viewer_dir, hide_associated=hide)
    sid = slides_of(base)["tissue.svs"]["id"]
    open_viewer(page, f"{base}/view/{sid}")
    images = page.eval_on_selector_all(
        "img", "is => is.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth}))"
    )
    label = [i for i in images if "/associated/label" in i["src"]]
    if hide:
        assert label == [] and page.is_hidden("#associated")
        assert not [i for i in images if "/associated/" in i["src"]]
    else:
        page.wait_for_function(
            "() => document.querySelector('img[src*=\"/associated/label\"]').complete"
        )
        assert page.eval_on_selector("img[src*='/associated/label']", "i => i.naturalWidth") > 0
        assert page.is_visible("#associated")


@pytest.mark.browser
def test_failed_tiles_show_a_message(page: Any, live_server: Any, viewer_dir: Path) -> None:
    osd_installed()
    base = live_server(viewer_dir)
    sid = slides_of(base)["tissue.svs"]["id"]
    # Tiles of the finest levels are sent to an address outside the slide's grid: the
    # server's real 404 answer reaches the viewer as a failed tile.
    fine = re.compile(r"/native_files/(1[0-9])/\d+_\d+\.jpeg")
    page.route(fine, lambda route: route.continue_(
        url=fine.sub("/native_files/\\1/9999_9999.jpeg", route.request.url)))
    page.goto(f"{base}/view/{sid}")
    toast = page.wait_for_selector("#tile-error:not([hidden])")
    text = toast.inner_text()
    assert "could not be loaded" in text
    detail = httpx.get(f"{base}/slides/{sid}/native_files/10/9999_9999.jpeg").json()["detail"]
    assert detail in text  # the server's reason, not only "something failed"
    page.unroute(fine)
    page.click("#tile-retry")
    page.wait_for_function("() => wsiViewer.world.getItemAt(0).getFullyLoaded()")
    assert page.is_hidden("#tile-error")


PAN_ONE_SCREEN_RIGHT = """() => {
  const vp = wsiViewer.viewport, item = wsiViewer.world.getItemAt(0);
  const r = item.viewportToImageRectangle(vp.getBounds(true));
  const c = item.viewportToImageCoordinates(vp.getCenter(true));
  vp.panTo(item.imageToViewportCoordinates(c.x + r.width, c.y));
}"""
SETTLED = ("() => !wsiViewer.isAnimating() && wsiViewer.world.getItemAt(0).getFullyLoaded()"
           " && !wsiViewer.world.needsDraw()")


# Tile images of the finest level that loaded since ``t0``: how many came over the network
# and how many from the browser's cache (Resource Timing: transferSize 0).
FINEST_TILES_SINCE = """(t0) => {
  const tiles = performance.getEntriesByType("resource").filter(
    (e) => e.startTime >= t0 && e.initiatorType === "img" && e.name.includes("_files/"));
  const level = (e) => Number(e.name.match(/_files\\/(\\d+)\\//)[1]);
  const finest = Math.max(...tiles.map(level));
  const at = tiles.filter((e) => level(e) === finest);
  return {network: at.filter((e) => e.transferSize > 0).length,
          cached: at.filter((e) => e.transferSize === 0).length};
}"""


def second_pan(chromium: Any, base: str, sid: str, prefetch: bool) -> dict[str, int]:
    """Finest-level tiles of the second of two pans to the right at 20× (after the reader
    has looked at the first screen), in a browser of its own."""
    page = chromium.new_page(viewport={"width": 1000, "height": 700})
    try:
        open_viewer(page, f"{base}/view/{sid}?x=600&y=1050&z=1&prefetch={int(prefetch)}")
        page.evaluate("() => performance.setResourceTimingBufferSize(5000)")
        page.evaluate(PAN_ONE_SCREEN_RIGHT)
        page.wait_for_timeout(100)
        page.wait_for_function(SETTLED)
        if prefetch:
            page.wait_for_function("() => wsiPrefetch.stats.started > 0"
                                   " && wsiPrefetch.stats.fetched === wsiPrefetch.stats.started")
        t0 = page.evaluate("() => performance.now()")
        page.evaluate(PAN_ONE_SCREEN_RIGHT)
        page.wait_for_timeout(100)
        page.wait_for_function(SETTLED)
        assert page.evaluate(PINK)["pink"] > 0.05  # tissue drawn, from wherever it came
        counts: dict[str, int] = page.evaluate(FINEST_TILES_SINCE, t0)
        return counts
    finally:
        page.close()


@pytest.mark.browser
def test_the_next_screen_in_the_pan_direction_is_fetched_ahead(
    chromium: Any, live_server: Any, viewer_dir: Path
) -> None:
    """After a pan settles, the viewer fetches the next screen the same way into the
    browser's cache: the next pan's tiles come from there, none over the network (each
    run in a browser of its own, so neither warms the other's cache)."""
    osd_installed()
    base = live_server(viewer_dir)
    sid = slides_of(base)["tissue.svs"]["id"]
    # a 1000 px wide screen at 1:1 is 4-5 columns of 256-px tiles by 3 rows
    cold = second_pan(chromium, base, sid, prefetch=False)
    assert cold["network"] >= 8 and cold["cached"] == 0, cold
    ahead = second_pan(chromium, base, sid, prefetch=True)
    assert ahead["network"] == 0 and ahead["cached"] >= 8, ahead
