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
Each run (profile × proxy × encoding) gets a fresh server (default settings: memory cache
on) and a fresh browser context (empty HTTP cache). Profiles: ``wan`` 40 ms, 20 Mbit/s;
``lan`` 1 ms, 1 Gbit/s. The server's CPU time (user + system, its process tree, from
``/proc``) is read before and after each step.

``--encoding stored,reencoded``: one run per tile encoding, the viewer opened as
``/view/{id}?encoding=X`` (``reencoded``: stored tiles re-encoded as JPEG 4:2:0 at the
server's quality instead of sent as stored).

``--prefetch on,off`` (one run each; ``off`` opens the viewer with ``?prefetch=0``) and
``--dwell-ms N`` (the reader looks at each view N ms before the next step; what the viewer
fetches meanwhile counts towards the step just made): the viewer's next-screen prefetch
pays off only when the reader pauses, which back-to-back steps (the default) never do.

``--proxy none,h1,h2``: one run per front; ``h1``/``h2`` put Debian's nginx in front, as
the deployment's ``proxy`` service does (HTTP/1.1 keepalive upstream), on TLS with a
self-signed certificate made for the run, speaking HTTP/1.1 or HTTP/2 to the browser (a
browser speaks HTTP/2 only over TLS, and opens at most 6 HTTP/1.1 connections per origin).
The protocol column is what Chromium reports for the tile responses.

Target (issue 12): WAN ``sharp`` p95 ≤ 1.0 s after each pan or zoom step.

``--peers``: the same session through wsi-server's, iipsrv's and deepzoom_server's Deep
Zoom (set up as in ``bench_peers``, on its every-2× pyramidal TIFF), each in the same bare
OpenSeadragon page (the viewer's tile-loading options) that Playwright serves on the
server's origin; wsi-server twice, stored and re-encoded tiles (each on a fresh server).
Each row adds the session's bytes and the CPU time of the server's process tree (for iipsrv:
lighttpd and its iipsrv processes).

    python -m benchmarks.bench_wan [--profiles wan,lan] [--pans 20] [--steps] [--peers]
        [--encoding stored,reencoded] [--prefetch on,off] [--dwell-ms 0]
        [--proxy none,h1,h2]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from benchmarks.common import (
    LiveServer,
    bench_slide,
    free_port,
    machine,
    markdown_table,
    percentile,
)
from tests.plugins.browser import CHROMIUM, CHROMIUM_FLAGS  # the browser the tests drive

NGINX = os.environ.get("WSI_BENCH_NGINX", "/usr/sbin/nginx")
SCREEN = (1920, 1080)
TARGET_WAN_P95_S = 1.0
TILE_URL = re.compile(r"_files/(\d+)/\d+_\d+\.")
ENCODINGS = ("stored", "reencoded")
PROXIES = ("none", "h1", "h2")


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
    cpu_s: float = float("nan")
    """The server's CPU time during the step (NaN when not measured)."""


@dataclass
class Traffic:
    """Counters fed by the page's DevTools network events."""

    bytes: int = 0
    requests: int = 0
    levels: Counter[int] = field(default_factory=Counter)
    """Tile requests per Deep Zoom level."""
    protocols: Counter[str] = field(default_factory=Counter)
    """Tile responses per protocol Chromium reports (``h2``, ``http/1.1``)."""
    encodings: Counter[str] = field(default_factory=Counter)
    """Tile requests per ``encoding`` query parameter (``-``: none)."""

    def on_request(self, params: dict[str, Any]) -> None:
        url = str(params.get("request", {}).get("url", ""))
        m = TILE_URL.search(url)
        if m:
            self.levels[int(m.group(1))] += 1
            self.encodings[parse_qs(urlsplit(url).query).get("encoding", ["-"])[0]] += 1

    def on_response(self, params: dict[str, Any]) -> None:
        response = params.get("response", {})
        if TILE_URL.search(str(response.get("url", ""))) and response.get("protocol"):
            self.protocols[str(response["protocol"])] += 1

    def on_finished(self, params: dict[str, Any]) -> None:
        self.bytes += int(params.get("encodedDataLength", 0))
        self.requests += 1


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (with their reaped
    children), from ``/proc``; NaN where there is no ``/proc``."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return float("nan")
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            stat = Path("/proc", name, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        f = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd (state) on
        children.setdefault(int(f[1]), []).append(int(name))
        ticks[int(name)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


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


# -- TLS front: Debian's nginx, as the deployment's proxy service ----------------------
def self_signed(key: Path, cert: Path) -> str:
    """A P-256 key and a self-signed certificate for 127.0.0.1 (``cryptography`` if
    installed, else ``openssl req``); returns the base64 SHA-256 of its public key (for
    Chromium's ``--ignore-certificate-errors-spki-list``)."""
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
                             check=True, capture_output=True).stdout
        spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=der,
                              check=True, capture_output=True).stdout
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    spki = private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    if not m:
        raise RuntimeError(f"cannot read nginx's version from {out.stderr!r}")
    return tuple(int(g) for g in m.groups())


# The deployment's proxy (compose.yaml's `proxy` service), on TLS, in a prefix of its own.
NGINX_CONF = """
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream wsi {{
    server {upstream};
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port} ssl{listen_http2};{http2_on}
    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    location / {{
      proxy_pass http://wsi;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


@dataclass(frozen=True)
class Front:
    base: str
    pid: int


def https_ready(url: str, timeout: float = 20.0) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextmanager
def nginx_front(upstream: str, http2: bool, certs: Path) -> Iterator[Front]:
    """Debian's nginx on a free loopback port, TLS (``certs``/key.pem, cert.pem) with or
    without HTTP/2, proxying to ``upstream`` (host:port) as compose.yaml's proxy does; in
    a temp prefix, stopped (with its workers) on exit."""
    new_syntax = nginx_version() >= (1, 25, 1)  # `http2 on;` replaces `listen ... http2`
    with tempfile.TemporaryDirectory(prefix="bench-wan-nginx-") as tmp:
        d = Path(tmp)
        if os.geteuid() == 0:  # workers run as nobody: let them reach their temp paths
            d.chmod(0o711)
        for name in ("key.pem", "cert.pem"):
            shutil.copy(certs / name, d / name)
        port = free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(
            dir=d, port=port, upstream=upstream,
            listen_http2=" http2" if http2 and not new_syntax else "",
            http2_on="\n    http2 on;" if http2 and new_syntax else ""))
        subprocess.run([NGINX, "-t", "-q", "-p", tmp, "-e", str(d / "error.log"), "-c",
                        "nginx.conf"], check=True)
        with open(d / "stderr.log", "wb") as err:
            proc = subprocess.Popen([NGINX, "-p", tmp, "-e", str(d / "error.log"), "-c",
                                     "nginx.conf", "-g", "daemon off;"],
                                    stdout=subprocess.DEVNULL, stderr=err)
        base = f"https://127.0.0.1:{port}"
        try:
            https_ready(f"{base}/readyz")
            yield Front(base, proc.pid)
        except BaseException:
            sys.stderr.write((d / "error.log").read_text(errors="replace")[-2000:])
            raise
        finally:
            if proc.poll() is None:
                proc.terminate()  # fast shutdown: the master stops its workers, then exits
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


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
                cpu: Callable[[], float] | None = None, traffic: Traffic | None = None,
                dwell_ms: float = 0,
                ) -> list[Result]:
    """The session in a fresh context; ``cpu`` (the server's CPU seconds so far) is read
    around each step, ``traffic`` (if given) collects the whole session's network events.
    ``dwell_ms``: the reader looks at each view that long before the next step; what the
    viewer fetches meanwhile (its prefetch) counts towards the step just made."""
    context = browser.new_context(viewport={"width": SCREEN[0], "height": SCREEN[1]},
                                  device_scale_factor=1)
    cpu = cpu or (lambda: float("nan"))
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        traffic = traffic or Traffic()
        cdp.on("Network.loadingFinished", traffic.on_finished)
        cdp.on("Network.requestWillBeSent", traffic.on_request)
        cdp.on("Network.responseReceived", traffic.on_response)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", profile.cdp())
        results = []
        for url, (ctype, body) in (routes or {}).items():
            page.route(url, lambda route, t=ctype, b=body: route.fulfill(
                status=200, content_type=t, body=b))
        c0 = cpu()
        t0 = time.perf_counter()
        page.goto(view_url)
        page.wait_for_function(
            "() => window.wsiViewer && window.wsiViewer.world.getItemCount() > 0"
            " && window.wsiViewer.world.getItemAt(0).getFullyLoaded()",
            polling="raf", timeout=60_000,
        )
        opened = time.perf_counter() - t0
        page.wait_for_timeout(50)
        results.append(Result(Step("open", 0, 0, 0), opened, float("nan"), traffic.bytes,
                              traffic.requests, 0, Counter(traffic.levels), cpu() - c0))
        if item_options:
            page.evaluate("(o) => Object.assign(window.wsiViewer.world.getItemAt(0), o)",
                          item_options)
        if loader_limit:
            page.evaluate("(n) => { window.wsiViewer.imageLoader.jobLimit = n; }", loader_limit)
        for step in steps:
            b0, r0, l0, c0 = traffic.bytes, traffic.requests, Counter(traffic.levels), cpu()
            sharp_ms, settle_ms, drawn = page.evaluate(
                STEP_JS, [step.kind, step.x, step.y, step.z, 30_000])
            page.wait_for_timeout(50 + dwell_ms)  # and the last loadingFinished events arrive
            results.append(Result(step, sharp_ms / 1e3, settle_ms / 1e3, traffic.bytes - b0,
                                  traffic.requests - r0, int(drawn), traffic.levels - l0,
                                  cpu() - c0))
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
    every-2× pyramidal TIFF, in the same bare OpenSeadragon page; wsi-server with stored
    and with re-encoded tiles."""
    from benchmarks import bench_peers as bp

    tiff = bp.peers_tiff(bp.FULL_PYRAMID)
    osd = OSD_JS.read_bytes()
    rows: list[list[object]] = []

    def one(name: str, base: str, dzi: str, pid: int) -> None:
        html = PEER_PAGE % {"dzi": json.dumps(dzi), "min_pixel_ratio": min_pixel_ratio}
        routes = {f"{base}/__bench__/view.html": ("text/html", html.encode()),
                  f"{base}/__bench__/openseadragon.min.js": ("text/javascript", osd)}
        steps = session(bp.WIDTH, bp.HEIGHT, 40.0, pans)
        for profile in profiles:
            traffic = Traffic()
            c0 = tree_cpu_s(pid)
            results = run_profile(browser, f"{base}/__bench__/view.html", steps, profile,
                                  routes=routes, traffic=traffic)
            cpu = tree_cpu_s(pid) - c0
            for row in summary_rows([name, profile.name], results):
                if row[2] == "pan + zoom":
                    rows.append([*row, sum(r.bytes for r in results) / 1e6, cpu])
            if name.startswith("wsi-server") and not dzi_encoding_ok(dzi, traffic):
                print(f"warning: {name}: tile requests by encoding {dict(traffic.encodings)}",
                      file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-wan-peers-") as tmp:
        with bp.wsi_server([tiff], cold=False) as s:
            dzi = s.tile_urls[tiff.name].split("_files/")[0] + ".dzi"
            one("wsi-server", s.base, dzi, s.pid)
        # a fresh server: the re-encoded session starts with the same (empty) tile cache
        with bp.wsi_server([tiff], cold=False) as s:
            dzi = s.tile_urls[tiff.name].split("_files/")[0] + ".dzi"
            one(f"wsi-server (re-encoded q{bp.QUALITY})", s.base, dzi + "?encoding=reencoded",
                s.pid)
        with bp.iipsrv([tiff], 1024) as s:
            one("iipsrv", s.base, f"/fcgi-bin/iipsrv.fcgi?DeepZoom={tiff.name}.dzi", s.pid)
        script = bp.deepzoom_example(Path(tmp))
        with bp.deepzoom_server(script, tiff) as s:
            one("deepzoom_server", s.base, "/slide.dzi", s.pid)
    return rows


def dzi_encoding_ok(dzi: str, traffic: Traffic) -> bool:
    """Every tile request carried the descriptor's ``encoding`` (OpenSeadragon copies the
    descriptor's query string onto tile URLs)."""
    want = parse_qs(urlsplit(dzi).query).get("encoding", ["-"])[0]
    return set(traffic.encodings) <= {want}


def summary_rows(prefix: Sequence[object], results: Sequence[Result], with_cpu: bool = False
                 ) -> list[list[object]]:
    """Per step kind: ``[*prefix, kind, n, sharp p50/p95 ms, after settle p50/p95 ms,
    kB/step, requests/step (, server CPU ms/step)]``."""
    rows: list[list[object]] = []
    groups = {"open": ["open"], "zoom": ["zoom"], "pan": ["pan"], "home": ["home"],
              "pan + zoom": ["pan", "zoom"]}
    for label, kinds in groups.items():
        rs = [r for r in results if r.step.kind in kinds]
        if not rs:
            continue
        sharp = [r.sharp_s for r in rs]
        settle = [r.settle_s for r in rs if r.settle_s == r.settle_s]
        row: list[object] = [
            *prefix, label, len(rs),
            percentile(sharp, 50) * 1e3, percentile(sharp, 95) * 1e3,
            percentile(settle, 50) * 1e3 if settle else "–",
            percentile(settle, 95) * 1e3 if settle else "–",
            sum(r.bytes for r in rs) / len(rs) / 1e3,
            sum(r.requests for r in rs) / len(rs),
        ]
        if with_cpu:
            row.append(sum(r.cpu_s for r in rs) / len(rs) * 1e3)
        rows.append(row)
    return rows


def protocol_label(protocols: Counter[str]) -> str:
    """``h2``, ``http/1.1``, or each with its count when mixed."""
    if len(protocols) <= 1:
        return next(iter(protocols), "?")
    return ", ".join(f"{p} ×{n}" for p, n in protocols.most_common())


def comma_list(value: str, allowed: Sequence[str]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--profiles", default="wan,lan", help="comma-separated: wan, lan")
    ap.add_argument("--pans", type=int, default=20)
    ap.add_argument("--width", type=int, default=24000)
    ap.add_argument("--height", type=int, default=18000)
    ap.add_argument("--steps", action="store_true", help="also print every step")
    ap.add_argument("--server-flag", action="append", default=[],
                    help="extra flag for `wsi_server serve` (repeatable)")
    ap.add_argument("--encoding", default=["stored"],
                    type=lambda v: comma_list(v, ENCODINGS),
                    help="comma-separated tile encodings, one run each: stored, reencoded "
                         "(the viewer opened with ?encoding=X)")
    ap.add_argument("--prefetch", default=["on"], type=lambda v: comma_list(v, ("on", "off")),
                    help="comma-separated, one run each: on (the viewer's default), off "
                         "(?prefetch=0: no next-screen prefetch)")
    ap.add_argument("--dwell-ms", type=float, default=0,
                    help="the reader looks at each view this long before the next step "
                         "(what the prefetch needs to pay off; default 0: back to back)")
    ap.add_argument("--proxy", default=["none"], type=lambda v: comma_list(v, PROXIES),
                    help="comma-separated fronts, one run each: none (the server itself), "
                         "h1 / h2 (Debian's nginx on TLS, HTTP/1.1 / HTTP/2 to the browser)")
    ap.add_argument("--osd-item", action="append", default=[], metavar="NAME=JSON",
                    help="set an option of the viewer's TiledImage after open, to try a "
                         "setting without editing viewer.js (e.g. minPixelRatio=0.55)")
    ap.add_argument("--osd-loader-limit", type=int, default=0,
                    help="set OpenSeadragon's imageLoader.jobLimit (imageLoaderLimit)")
    ap.add_argument("--peers", action="store_true",
                    help="instead: the session through wsi-server's (stored and re-encoded "
                         "tiles), iipsrv's and deepzoom_server's Deep Zoom on bench_peers' "
                         "TIFF")
    ap.add_argument("--min-pixel-ratio", type=float, default=0.55,
                    help="OpenSeadragon minPixelRatio of the --peers page")
    args = ap.parse_args(argv)
    item_options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.osd_item)}

    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        print("chromium is missing (Debian package chromium)", file=sys.stderr)
        return 2
    tls = [p for p in args.proxy if p != "none"]
    if tls and args.peers:
        print("--proxy applies to the viewer session, not to --peers", file=sys.stderr)
        return 2
    if tls and not Path(NGINX).exists():
        print(f"{NGINX} is missing (Debian package nginx-light)", file=sys.stderr)
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
             "after settle p50 ms", "after settle p95 ms", "kB/step", "requests/step",
             "session MB", "server CPU s"], peer_rows))
        load = os.getloadavg()
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    path = bench_slide(args.width, args.height)
    print(f"slide {path.name}; OpenSeadragon overrides: {item_options or 'none'}, loader "
          f"limit {args.osd_loader_limit or 'default'}", end="")
    if tls:
        v = ".".join(map(str, nginx_version()))
        print(f"; front: nginx {v} on TLS (self-signed P-256), HTTP/1.1 keepalive upstream",
              end="")
    print(f"; the reader looks at each view {args.dwell_ms:g} ms before the next step\n")
    rows: list[list[object]] = []
    sessions: list[list[object]] = []
    per_step: list[list[object]] = []
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp, sync_playwright() as pw:
        flags = list(CHROMIUM_FLAGS)
        if tls:
            # Trusting the certificate's key (not ignoring errors): Chromium does not cache
            # responses that came with a certificate error.
            spki = self_signed(Path(tmp, "key.pem"), Path(tmp, "cert.pem"))
            flags.append(f"--ignore-certificate-errors-spki-list={spki}")
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=flags)
        try:
            for profile in profiles:
                for proxy in args.proxy:
                    for encoding, prefetch in itertools.product(args.encoding, args.prefetch):
                        with LiveServer([path.parent], *args.server_flag) as srv:
                            listing = srv.json("/api/slides")
                            assert isinstance(listing, dict)
                            slide_id = str(listing["slides"][0]["id"])
                            detail = srv.json(f"/api/slides/{slide_id}")
                            assert isinstance(detail, dict)
                            power = float(detail.get("objective_power") or 40)
                            steps = session(int(detail["width"]), int(detail["height"]),
                                            power, args.pans)
                            traffic = Traffic()

                            def server_cpu(pid: int = srv.pid) -> float:
                                return tree_cpu_s(pid)

                            query = f"?encoding={encoding}"
                            query += "&prefetch=0" if prefetch == "off" else ""
                            front_cpu = float("nan")
                            if proxy == "none":
                                results = run_profile(
                                    browser, f"{srv.base}/view/{slide_id}{query}", steps,
                                    profile, item_options, args.osd_loader_limit,
                                    cpu=server_cpu, traffic=traffic, dwell_ms=args.dwell_ms)
                            else:
                                with nginx_front(f"127.0.0.1:{srv.port}", proxy == "h2",
                                                 Path(tmp)) as front:
                                    n0 = tree_cpu_s(front.pid)
                                    results = run_profile(
                                        browser, f"{front.base}/view/{slide_id}{query}",
                                        steps, profile, item_options, args.osd_loader_limit,
                                        cpu=server_cpu, traffic=traffic,
                                        dwell_ms=args.dwell_ms)
                                    front_cpu = tree_cpu_s(front.pid) - n0
                        protocol = protocol_label(traffic.protocols)
                        if set(traffic.encodings) - {encoding}:
                            print(f"warning: asked for {encoding} tiles; tile requests by "
                                  f"encoding: {dict(traffic.encodings)}", file=sys.stderr)
                        labels = [profile.name, proxy, protocol,
                                  encoding + (", no prefetch" if prefetch == "off" else "")]
                        rows += summary_rows(labels, results, with_cpu=True)
                        moves = [r.sharp_s for r in results if r.step.kind in ("pan", "zoom")]
                        p95 = percentile(moves, 95)
                        one = sum(r.cpu_s for r in results)
                        sessions.append([
                            *labels, sum(r.bytes for r in results) / 1e6,
                            sum(r.requests for r in results), p95 * 1e3, one,
                            front_cpu if proxy != "none" else "–", os.getloadavg()[0]])
                        if profile.name == "wan":
                            verdicts.append(
                                f"WAN ({proxy}, {encoding}) pan/zoom sharp p95 {p95 * 1e3:.0f} "
                                f"ms (target ≤ {TARGET_WAN_P95_S * 1e3:.0f} ms): "
                                f"{'met' if p95 <= TARGET_WAN_P95_S else 'NOT met'}")
                        print(f"done: {' '.join(labels)}: p95 {p95 * 1e3:.0f} ms, server CPU "
                              f"{one:.1f} s", file=sys.stderr, flush=True)
                        for i, r in enumerate(results):
                            per_step.append([
                                *labels, i, r.step.kind, round(r.step.z * power, 1),
                                r.sharp_s * 1e3, r.settle_s * 1e3, r.bytes / 1e3, r.requests,
                                r.tiles_drawn, r.cpu_s * 1e3,
                                " ".join(f"{k}:{n}" for k, n in sorted(r.levels.items()))])
        finally:
            browser.close()
    print(markdown_table(
        ["profile", "proxy", "protocol", "encoding", "step", "n", "sharp p50 ms",
         "sharp p95 ms", "after settle p50 ms", "after settle p95 ms", "kB/step",
         "requests/step", "server CPU ms/step"], rows))
    print("\nWhole sessions (open to home):\n")
    print(markdown_table(
        ["profile", "proxy", "protocol", "encoding", "MB", "requests",
         "pan/zoom sharp p95 ms", "server CPU s", "nginx CPU s", "load (1 min) after"],
        sessions))
    if args.steps:
        print()
        print(markdown_table(["profile", "proxy", "protocol", "encoding", "#", "step", "mag",
                              "sharp ms", "after settle ms", "kB", "requests", "tiles drawn",
                              "server CPU ms", "tiles per DZ level"], per_step))
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for v in verdicts:
        print(v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
