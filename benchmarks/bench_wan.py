"""Field of view in a real browser over an emulated WAN: headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright) opens the viewer (``/view/{id}``) on the
benchmark slide at 1920×1080 and runs a scripted reading session:

    open (whole slide) → zoom to 10× → pan by one screen ×20 → zoom to 40× → pan ×20 →
    jump back (home)

Pans follow a serpentine over the slide (right until the edge, one screen down, left...),
so at 10× on a small slide some screens are seen twice (served from the browser's caches,
as for a real reader). Each step is made as a user makes it, through OpenSeadragon's
viewport with its own animation (``animationTime`` 0.5 s in the viewer), and timed in the
page from the call to the first frame where the viewport has settled and the tiled image
reports ``getFullyLoaded()`` (every tile of the level drawn for the final view is loaded
and drawn: OpenSeadragon's ``fully-loaded-change``). Two figures per step:

- ``sharp``: from the step's start (includes the 0.5 s animation);
- ``after settle``: from the end of the animation to sharp (0 when the tiles were there).

Network conditions are emulated by Chromium itself (DevTools
``Network.emulateNetworkConditions``: added latency per request and throughput caps) on
loopback; bytes per step are the sum of ``Network.loadingFinished.encodedDataLength``.
Each profile gets a fresh server (default settings: memory cache on) and a fresh browser
context (empty HTTP cache). Profiles: ``wan`` 40 ms, 20 Mbit/s; ``lan`` 1 ms, 1 Gbit/s.

Target (issue 12): WAN ``sharp`` p95 ≤ 1.0 s after each pan or zoom step.

``--peers``: the same session through wsi-server's, iipsrv's and deepzoom_server's Deep
Zoom (set up as in ``bench_peers``, on its every-2× pyramidal TIFF), each in the same bare
OpenSeadragon page (the viewer's tile-loading options) that Playwright serves on the
server's origin.

    python -m benchmarks.bench_wan [--profiles wan,lan] [--pans 20] [--steps] [--peers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import LiveServer, bench_slide, machine, markdown_table, percentile

CHROMIUM = os.environ.get("WSI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREEN = (1920, 1080)
TARGET_WAN_P95_S = 1.0
TILE_URL = re.compile(r"_files/(\d+)/\d+_\d+\.")


@dataclass(frozen=True)
class Profile:
    name: str
    latency_ms: float
    mbit_s: float

    def cdp(self) -> dict[str, object]:
        rate = self.mbit_s * 1e6 / 8  # bytes/s
        return {"offline": False, "latency": self.latency_ms, "downloadThroughput": rate,
                "uploadThroughput": rate}


PROFILES = {
    "wan": Profile("wan", 40.0, 20.0),
    "lan": Profile("lan", 1.0, 1000.0),
}


@dataclass(frozen=True)
class Step:
    kind: str
    """open, zoom, pan or home."""
    x: float
    y: float
    z: float
    """Screen pixels per full-resolution pixel (0 for home)."""


@dataclass
class Result:
    step: Step
    sharp_s: float
    settle_s: float
    bytes: int
    requests: int
    tiles_drawn: int
    levels: Counter[int]


@dataclass
class Traffic:
    """Counters fed by the page's DevTools network events."""

    bytes: int = 0
    requests: int = 0
    levels: Counter[int] = field(default_factory=Counter)
    """Tile requests per Deep Zoom level."""

    def on_request(self, params: dict[str, Any]) -> None:
        m = TILE_URL.search(str(params.get("request", {}).get("url", "")))
        if m:
            self.levels[int(m.group(1))] += 1

    def on_finished(self, params: dict[str, Any]) -> None:
        self.bytes += int(params.get("encodedDataLength", 0))
        self.requests += 1


def serpentine(width: float, height: float, z: float, start: tuple[float, float],
               n: int) -> list[tuple[float, float]]:
    """``n`` view centres, each one screen from the last: along x to the slide's edge,
    one screen down (up at the bottom), then back along x."""
    sw, sh = SCREEN[0] / z, SCREEN[1] / z
    x, y = start
    dx, dy = 1, 1
    out = []
    for _ in range(n):
        if 0 <= x + dx * sw <= width:
            x += dx * sw
        else:
            dx = -dx
            if not 0 <= y + dy * sh <= height:
                dy = -dy
            y += dy * sh
        out.append((x, y))
    return out


def session(width: int, height: int, power: float, pans: int) -> list[Step]:
    centre = (width / 2, height / 2)
    z10, z40 = 10 / power, 40 / power
    steps = [Step("zoom", *centre, z10)]
    last = centre
    for x, y in serpentine(width, height, z10, centre, pans):
        steps.append(Step("pan", x, y, z10))
        last = (x, y)
    steps.append(Step("zoom", *last, z40))
    for x, y in serpentine(width, height, z40, last, pans):
        steps.append(Step("pan", x, y, z40))
    steps.append(Step("home", 0, 0, 0))
    return steps


# Runs one step in the page; resolves with [sharp ms, after-settle ms, tiles drawn].
STEP_JS = """
async ([kind, x, y, z, timeoutMs]) => {
  const v = window.wsiViewer, vp = v.viewport, item = v.world.getItemAt(0);
  let drawn = 0;
  const onDrawn = () => { drawn += 1; };
  v.addHandler("tile-drawn", onDrawn);
  const t0 = performance.now();
  if (kind === "home") vp.goHome();
  else {
    vp.zoomTo(vp.imageToViewportZoom(z));
    vp.panTo(vp.imageToViewportCoordinates(x, y));
  }
  const moving = () => {
    const a = vp.getCenter(true), b = vp.getCenter(false), zt = vp.getZoom(false);
    return Math.abs(vp.getZoom(true) - zt) > zt * 1e-6
      || Math.abs(a.x - b.x) > 1e-6 / zt || Math.abs(a.y - b.y) > 1e-6 / zt;
  };
  const result = await new Promise((resolve) => {
    let settledAt = null;
    const tick = () => {
      const now = performance.now();
      if (!moving()) {
        if (settledAt === null) settledAt = now;
        // One frame after settling, so that OpenSeadragon has updated for the final view.
        if (now > settledAt && item.getFullyLoaded()) {
          return resolve([now - t0, Math.max(0, now - settledAt - 1000 / 60)]);
        }
      } else settledAt = null;
      if (now - t0 > timeoutMs) return resolve([NaN, NaN]);
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  });
  v.removeHandler("tile-drawn", onDrawn);
  return [result[0], result[1], drawn];
}
"""


def run_profile(browser: Any, view_url: str, steps: Sequence[Step],
                profile: Profile, item_options: dict[str, object] | None = None,
                loader_limit: int = 0, routes: dict[str, tuple[str, bytes]] | None = None,
                ) -> list[Result]:
    context = browser.new_context(viewport={"width": SCREEN[0], "height": SCREEN[1]},
                                  device_scale_factor=1)
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        traffic = Traffic()
        cdp.on("Network.loadingFinished", traffic.on_finished)
        cdp.on("Network.requestWillBeSent", traffic.on_request)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", profile.cdp())
        results = []
        t0 = time.perf_counter()
        for url, (ctype, body) in (routes or {}).items():
            page.route(url, lambda route, t=ctype, b=body: route.fulfill(
                status=200, content_type=t, body=b))
        page.goto(view_url)
        page.wait_for_function(
            "() => window.wsiViewer && window.wsiViewer.world.getItemCount() > 0"
            " && window.wsiViewer.world.getItemAt(0).getFullyLoaded()",
            polling="raf", timeout=60_000,
        )
        opened = time.perf_counter() - t0
        results.append(Result(Step("open", 0, 0, 0), opened, float("nan"), traffic.bytes,
                              traffic.requests, 0, Counter(traffic.levels)))
        if item_options:
            page.evaluate("(o) => Object.assign(window.wsiViewer.world.getItemAt(0), o)",
                          item_options)
        if loader_limit:
            page.evaluate("(n) => { window.wsiViewer.imageLoader.jobLimit = n; }", loader_limit)
        for step in steps:
            b0, r0, l0 = traffic.bytes, traffic.requests, Counter(traffic.levels)
            sharp_ms, settle_ms, drawn = page.evaluate(
                STEP_JS, [step.kind, step.x, step.y, step.z, 30_000])
            page.wait_for_timeout(50)  # let the last loadingFinished events arrive
            results.append(Result(step, sharp_ms / 1e3, settle_ms / 1e3, traffic.bytes - b0,
                                  traffic.requests - r0, int(drawn), traffic.levels - l0))
        return results
    finally:
        context.close()


# A bare OpenSeadragon page with the viewer's tile-loading options, for Deep Zoom sources
# that have no viewer of ours (the peers); served by Playwright on the peer's origin.
PEER_PAGE = """<!doctype html><html><body style="margin:0">
<div id="osd" style="width:100vw;height:100vh;background:#000"></div>
<script src="/__bench__/openseadragon.min.js"></script>
<script>
window.wsiViewer = OpenSeadragon({
  element: document.getElementById("osd"), tileSources: %(dzi)s, drawer: "canvas",
  showNavigationControl: false, maxZoomPixelRatio: 2, visibilityRatio: 0.2,
  animationTime: 0.5, timeout: 30000, maxTilesPerFrame: 6, maxImageCacheCount: 600,
  minPixelRatio: %(min_pixel_ratio)s,
});
</script></body></html>
"""
OSD_JS = Path(__file__).resolve().parent.parent / "node_modules" / "openseadragon" / "build" \
    / "openseadragon" / "openseadragon.min.js"


def run_peers(browser: Any, profiles: Sequence[Profile], pans: int, min_pixel_ratio: float
              ) -> list[list[object]]:
    """The session through each server's Deep Zoom (256 px, overlap 0) on bench_peers'
    every-2× pyramidal TIFF, in the same bare OpenSeadragon page."""
    from benchmarks import bench_peers as bp

    tiff = bp.peers_tiff(bp.FULL_PYRAMID)
    osd = OSD_JS.read_bytes()
    rows: list[list[object]] = []

    def one(name: str, base: str, dzi: str) -> None:
        html = PEER_PAGE % {"dzi": json.dumps(dzi), "min_pixel_ratio": min_pixel_ratio}
        routes = {f"{base}/__bench__/view.html": ("text/html", html.encode()),
                  f"{base}/__bench__/openseadragon.min.js": ("text/javascript", osd)}
        steps = session(bp.WIDTH, bp.HEIGHT, 40.0, pans)
        for profile in profiles:
            results = run_profile(browser, f"{base}/__bench__/view.html", steps, profile,
                                  routes=routes)
            for row in summary_rows(profile.name, results):
                if row[1] == "pan + zoom":
                    rows.append([name, *row])

    with tempfile.TemporaryDirectory(prefix="bench-wan-peers-") as tmp:
        with bp.wsi_server([tiff], cold=False) as s:
            one("wsi-server", s.base, s.tile_urls[tiff.name].split("_files/")[0] + ".dzi")
        with bp.iipsrv([tiff], 1024) as s:
            one("iipsrv", s.base, f"/fcgi-bin/iipsrv.fcgi?DeepZoom={tiff.name}.dzi")
        script = bp.deepzoom_example(Path(tmp))
        with bp.deepzoom_server(script, tiff) as s:
            one("deepzoom_server", s.base, "/slide.dzi")
    return rows


def summary_rows(profile: str, results: Sequence[Result]) -> list[list[object]]:
    rows: list[list[object]] = []
    groups = {"open": ["open"], "zoom": ["zoom"], "pan": ["pan"], "home": ["home"],
              "pan + zoom": ["pan", "zoom"]}
    for label, kinds in groups.items():
        rs = [r for r in results if r.step.kind in kinds]
        if not rs:
            continue
        sharp = [r.sharp_s for r in rs]
        settle = [r.settle_s for r in rs if r.settle_s == r.settle_s]
        rows.append([
            profile, label, len(rs),
            percentile(sharp, 50) * 1e3, percentile(sharp, 95) * 1e3,
            percentile(settle, 50) * 1e3 if settle else "–",
            percentile(settle, 95) * 1e3 if settle else "–",
            sum(r.bytes for r in rs) / len(rs) / 1e3,
            sum(r.requests for r in rs) / len(rs),
        ])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--profiles", default="wan,lan", help="comma-separated: wan, lan")
    ap.add_argument("--pans", type=int, default=20)
    ap.add_argument("--width", type=int, default=24000)
    ap.add_argument("--height", type=int, default=18000)
    ap.add_argument("--steps", action="store_true", help="also print every step")
    ap.add_argument("--server-flag", action="append", default=[],
                    help="extra flag for `wsi_server serve` (repeatable)")
    ap.add_argument("--osd-item", action="append", default=[], metavar="NAME=JSON",
                    help="set an option of the viewer's TiledImage after open, to try a "
                         "setting without editing viewer.js (e.g. minPixelRatio=0.55)")
    ap.add_argument("--osd-loader-limit", type=int, default=0,
                    help="set OpenSeadragon's imageLoader.jobLimit (imageLoaderLimit)")
    ap.add_argument("--peers", action="store_true",
                    help="instead: the session through wsi-server's, iipsrv's and "
                         "deepzoom_server's Deep Zoom on bench_peers' TIFF")
    ap.add_argument("--min-pixel-ratio", type=float, default=0.55,
                    help="OpenSeadragon minPixelRatio of the --peers page")
    args = ap.parse_args(argv)
    item_options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.osd_item)}

    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        print("chromium is missing (Debian package chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    profiles = [PROFILES[p] for p in args.profiles.split(",")]
    load = os.getloadavg()
    print(f"# Field of view in Chromium over emulated networks\n\n{machine()}; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"screen {SCREEN[0]}×{SCREEN[1]}; ", end="")
    if args.peers:
        print(f"bench_peers' every-2× TIFF through each server's Deep Zoom (256/0) in a bare "
              f"OpenSeadragon page (minPixelRatio {args.min_pixel_ratio})\n")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, headless=True,
                                         args=CHROMIUM_FLAGS)
            try:
                peer_rows = run_peers(browser, profiles, args.pans, args.min_pixel_ratio)
            finally:
                browser.close()
        print(markdown_table(
            ["server", "profile", "steps", "n", "sharp p50 ms", "sharp p95 ms",
             "after settle p50 ms", "after settle p95 ms", "kB/step", "requests/step"],
            peer_rows))
        load = os.getloadavg()
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    path = bench_slide(args.width, args.height)
    print(f"slide {path.name}; OpenSeadragon overrides: {item_options or 'none'}, loader "
          f"limit {args.osd_loader_limit or 'default'}\n")
    rows: list[list[object]] = []
    per_step: list[list[object]] = []
    verdicts = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=CHROMIUM_FLAGS)
        try:
            for profile in profiles:
                with LiveServer([path.parent], *args.server_flag) as srv:
                    listing = srv.json("/api/slides")
                    assert isinstance(listing, dict)
                    slide_id = str(listing["slides"][0]["id"])
                    detail = srv.json(f"/api/slides/{slide_id}")
                    assert isinstance(detail, dict)
                    power = float(detail.get("objective_power") or 40)
                    steps = session(int(detail["width"]), int(detail["height"]), power,
                                    args.pans)
                    results = run_profile(browser, f"{srv.base}/view/{slide_id}", steps,
                                          profile, item_options, args.osd_loader_limit)
                rows += summary_rows(profile.name, results)
                moves = [r.sharp_s for r in results if r.step.kind in ("pan", "zoom")]
                p95 = percentile(moves, 95)
                if profile.name == "wan":
                    verdicts.append(f"WAN pan/zoom sharp p95 {p95 * 1e3:.0f} ms (target ≤ "
                                    f"{TARGET_WAN_P95_S * 1e3:.0f} ms): "
                                    f"{'met' if p95 <= TARGET_WAN_P95_S else 'NOT met'}")
                for i, r in enumerate(results):
                    per_step.append([profile.name, i, r.step.kind, round(r.step.z * power, 1),
                                     r.sharp_s * 1e3, r.settle_s * 1e3, r.bytes / 1e3,
                                     r.requests, r.tiles_drawn,
                                     " ".join(f"{k}:{n}" for k, n in sorted(r.levels.items()))])
        finally:
            browser.close()
    print(markdown_table(
        ["profile", "step", "n", "sharp p50 ms", "sharp p95 ms", "after settle p50 ms",
         "after settle p95 ms", "kB/step", "requests/step"], rows))
    if args.steps:
        print()
        print(markdown_table(["profile", "#", "step", "mag", "sharp ms", "after settle ms",
                              "kB", "requests", "tiles drawn", "tiles per DZ level"], per_step))
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for v in verdicts:
        print(v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
