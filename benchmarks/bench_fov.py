"""Field of view: the time to fetch every tile a 1920×1080 viewer needs at a random place
and zoom, as OpenSeadragon requests them (6 parallel connections, like a browser's limit
per host on HTTP/1.1). The measure clinical studies of WSI viewers report.

For each field of view: a random zoom (log-uniform between the whole slide fitting the
screen and full resolution) and a random centre on the slide; the Deep Zoom level
OpenSeadragon draws at that zoom (the coarsest whose resolution is at least the screen's)
on the native grid (``/slides/{id}/native_files/...``); every tile of that level the
viewport overlaps, fetched over 6 keep-alive connections. Time per FOV = first request
sent to last tile received.

- cold: a server started with ``--cache-size 0``: every tile is produced from the file
  (stored JPEG passed through, or read, resampled and encoded). The OS page cache holds the
  file, as for a slide being read.
- warm: a server with the memory cache, after one pass over the same fields of view.
- ceiling: the same requests, sizes and concurrency against ``GET /bench/bytes/{n}`` of the
  warm server (``--bench-routes``): what HTTP alone costs for those bytes (the reference).

Two clients: ``raw``, a minimal HTTP/1.1 keep-alive client on asyncio streams (closest to a
browser's cost per request), and ``httpx`` (about 1 ms of client CPU per request, which on a
small machine shared with the server dominates warm figures; its ceiling row shows that).

Targets (issue 5): cold p95 ≤ 250 ms, warm p95 ≤ 50 ms on loopback.

    python -m benchmarks.bench_fov [--fovs 40] [--seed 0] [--connections 6] [--client both]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from benchmarks.common import (
    LiveServer,
    bench_slide,
    fmt_num,
    machine,
    markdown_table,
    percentile,
)
from wsi_server.geometry import DeepZoomGeometry, GeometryParams, Pyramid, deep_zoom

TARGET_COLD_P95_MS = 250.0
TARGET_WARM_P95_MS = 50.0


@dataclass(frozen=True)
class Fov:
    z: float
    """Screen pixels per full-resolution slide pixel."""
    dz_level: int
    urls: tuple[str, ...]


@dataclass
class Pass:
    seconds: list[float]
    tiles: int
    bytes: int
    sources: Counter[str]
    sizes: list[list[int]]
    """Response sizes per FOV, in request order (for the ceiling pass)."""


def native_geometry(detail: dict[str, object]) -> DeepZoomGeometry:
    levels = detail["levels"]
    assert isinstance(levels, list)
    pyramid = Pyramid(
        l_dimensions=tuple((int(lv["width"]), int(lv["height"])) for lv in levels),
        l0_l_downsamples=tuple(float(lv["downsample"]) for lv in levels),
    )
    tile = detail["native_tile_size"]
    assert isinstance(tile, int)
    return deep_zoom(pyramid, GeometryParams(tile, 0, False))


def plan_fovs(
    geom: DeepZoomGeometry, slide_id: str, version: str, n: int, seed: int,
    screen: tuple[int, int],
) -> list[Fov]:
    """Random fields of view and the tile URLs OpenSeadragon would fetch for each."""
    rng = random.Random(seed)
    w0, h0 = geom.l0_dimensions
    top = geom.level_count - 1
    z_fit = min(screen[0] / w0, screen[1] / h0)
    t = geom.tile_size
    fovs = []
    for _ in range(n):
        z = math.exp(rng.uniform(math.log(z_fit), 0.0))
        # Level L has scale 2^(L - top) relative to full resolution: the coarsest level
        # with scale >= z (OpenSeadragon never draws a level coarser than the screen).
        level = min(top, max(0, top + math.ceil(math.log2(z) - 1e-9)))
        scale = geom.z_dimensions[level][0] / w0
        cx, cy = rng.uniform(0, w0), rng.uniform(0, h0)
        half_w, half_h = screen[0] / z / 2, screen[1] / z / 2
        cols, rows = geom.t_dimensions[level]
        c0 = max(0, int((cx - half_w) * scale // t))
        c1 = min(cols - 1, int((cx + half_w) * scale // t))
        r0 = max(0, int((cy - half_h) * scale // t))
        r1 = min(rows - 1, int((cy + half_h) * scale // t))
        urls = tuple(
            f"/slides/{slide_id}/native_files/{level}/{c}_{r}.jpeg?v={version}"
            for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)
        )
        fovs.append(Fov(z, level, urls))
    return fovs


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    source: str


class HttpxClient:
    """httpx.AsyncClient with a pool of ``connections`` keep-alive connections."""

    name = "httpx"

    def __init__(self, base: str, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(base_url=base, limits=limits, timeout=60.0)
        self.connections = connections

    async def open(self) -> None:
        await asyncio.gather(*(self.client.get("/healthz") for _ in range(self.connections)))

    async def fetch_all(self, urls: Sequence[str]) -> list[Reply]:
        responses = await asyncio.gather(*(self.client.get(u) for u in urls))
        return [Reply(r.status_code, r.content, r.headers.get("x-tile-source", "?"))
                for r in responses]

    async def close(self) -> None:
        await self.client.aclose()


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: ``connections`` workers
    share a FOV's URL list, like a browser's per-host connection pool. Much cheaper per
    request than httpx, so the figure is the server's rather than the client's."""

    name = "raw"

    def __init__(self, base: str, connections: int) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port, self.connections = host, int(port), connections
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        self.streams = [await asyncio.open_connection(self.host, self.port)
                        for _ in range(self.connections)]

    async def _get(self, stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                   url: str) -> Reply:
        reader, writer = stream
        writer.write(f"GET {url} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Reply(status, body, headers.get("x-tile-source", "?"))

    async def fetch_all(self, urls: Sequence[str]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(urls)
        next_index = iter(range(len(urls)))

        async def worker(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
            for i in next_index:
                replies[i] = await self._get(stream, urls[i])

        await asyncio.gather(*(worker(s) for s in self.streams))
        return [r for r in replies if r is not None]

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()


async def fetch_fovs(
    client_type: type[HttpxClient] | type[RawClient], base: str, fovs: Sequence[Fov],
    connections: int, ceiling_sizes: Sequence[list[int]] | None,
) -> Pass:
    """Fetch each FOV's tiles over ``connections`` keep-alive connections, one FOV after
    the other; with ``ceiling_sizes``, fetch ``/bench/bytes/{n}`` of those sizes instead."""
    out = Pass([], 0, 0, Counter(), [])
    client = client_type(base, connections)
    # Open the connections first, as a browser that has loaded the page already has.
    await client.open()
    try:
        for i, fov in enumerate(fovs):
            urls = list(fov.urls) if ceiling_sizes is None else [
                f"/bench/bytes/{n}" for n in ceiling_sizes[i]
            ]
            started = time.perf_counter()
            replies = await client.fetch_all(urls)
            out.seconds.append(time.perf_counter() - started)
            bad = [(u, r) for u, r in zip(urls, replies, strict=True) if r.status != 200]
            if bad:
                raise RuntimeError(f"{bad[0][0]}: HTTP {bad[0][1].status}")
            out.tiles += len(replies)
            out.bytes += sum(len(r.body) for r in replies)
            out.sources.update(r.source for r in replies)
            out.sizes.append([len(r.body) for r in replies])
    finally:
        await client.close()
    return out


def summary_row(
    client: str, name: str, p: Pass, target: float | None, ref_p50: float | None
) -> list[object]:
    p50, p95 = percentile(p.seconds, 50) * 1e3, percentile(p.seconds, 95) * 1e3
    verdict = "–" if target is None else ("pass" if p95 <= target else "**fail**")
    ratio = "1.00" if ref_p50 is None else f"{p50 / ref_p50:.2f}"
    served = ", ".join(f"{k} {v}" for k, v in p.sources.most_common()) if name != "ceiling" \
        else "bench route"
    return [
        client, name, len(p.seconds), fmt_num(p.tiles / len(p.seconds)), fmt_num(p50), fmt_num(p95),
        fmt_num(max(p.seconds) * 1e3), ratio, "–" if target is None else f"≤ {target:.0f}",
        verdict, served,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--fovs", type=int, default=40, help="fields of view per pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--connections", type=int, default=6)
    ap.add_argument("--screen", default="1920x1080", help="viewport in CSS pixels, WxH")
    ap.add_argument("--client", choices=("raw", "httpx", "both"), default="both",
                    help="HTTP client: a minimal asyncio one (raw), httpx, or both")
    args = ap.parse_args(argv)
    screen_w, screen_h = (int(v) for v in args.screen.lower().split("x"))

    slide = bench_slide(24000, 18000, tile=256, downsamples=(1, 4, 16))
    results: dict[str, Pass] = {}
    plan: list[Fov] = []

    clients: list[type[HttpxClient] | type[RawClient]] = [
        c for c in (RawClient, HttpxClient) if args.client in (c.name, "both")
    ]
    print(f"cold: server with --cache-size 0, {args.fovs} FOVs ...", file=sys.stderr)
    with LiveServer([slide.parent], "--cache-size", "0") as srv:
        summary = srv.json("/api/slides")
        assert isinstance(summary, dict)
        sid = summary["slides"][0]["id"]
        detail = srv.json(f"/api/slides/{sid}")
        assert isinstance(detail, dict)
        geom = native_geometry(detail)
        plan = plan_fovs(geom, sid, detail["version"], args.fovs, args.seed, (screen_w, screen_h))
        for c in clients:
            results[f"{c.name} cold"] = asyncio.run(
                fetch_fovs(c, srv.base, plan, args.connections, None))

    print("warm: server with the memory cache, after one pass ...", file=sys.stderr)
    with LiveServer([slide.parent], env={"WSI_BENCH_ROUTES": "1"}) as srv:
        asyncio.run(fetch_fovs(clients[0], srv.base, plan, args.connections, None))
        for c in clients:
            warm = asyncio.run(fetch_fovs(c, srv.base, plan, args.connections, None))
            results[f"{c.name} warm"] = warm
            results[f"{c.name} ceiling"] = asyncio.run(
                fetch_fovs(c, srv.base, plan, args.connections, warm.sizes))

    levels = Counter(f.dz_level for f in plan)
    print(f"\n### Field of view: {screen_w}×{screen_h}, {args.connections} connections\n")
    print(f"Slide {slide.name} ({geom.l0_dimensions[0]}×{geom.l0_dimensions[1]}, native grid "
          f"{geom.tile_size} px, {geom.level_count} Deep Zoom levels); {args.fovs} random FOVs "
          f"(seed {args.seed}) at Deep Zoom levels "
          + ", ".join(f"{lv}: {n}" for lv, n in sorted(levels.items())) + f". {machine()}.\n")
    rows = []
    for c in clients:
        ceiling_p50 = percentile(results[f"{c.name} ceiling"].seconds, 50) * 1e3
        rows += [
            summary_row(c.name, "cold", results[f"{c.name} cold"], TARGET_COLD_P95_MS,
                        ceiling_p50),
            summary_row(c.name, "warm", results[f"{c.name} warm"], TARGET_WARM_P95_MS,
                        ceiling_p50),
            summary_row(c.name, "ceiling", results[f"{c.name} ceiling"], None, None),
        ]
    print(markdown_table(
        ["client", "pass", "FOVs", "tiles/FOV", "p50 ms", "p95 ms", "max ms", "p50 / ceiling",
         "target p95 ms", "", "served by"],
        rows,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
