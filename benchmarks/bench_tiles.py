"""Tile production in one process: our TileService against openslide-python's
``DeepZoomGenerator`` + Pillow JPEG q75, measured in the same run on the same tiles.

Contenders, per Deep Zoom level (full resolution, and downsample 2 which is not stored):

- (a) reference: ``DeepZoomGenerator(OpenSlide(path), 254, 1).get_tile`` then Pillow JPEG q75;
- (b) our TileService, default geometry (254 / overlap 1), cold;
- (c) our TileService, native grid (stored tile size, overlap 0), cold;
- (d) the native grid again, with the in-process memory cache warm.

Cold: every pass gets a fresh app (new reader pool, so no decoded-tile memory either) and a
NullCache; (a) gets a fresh ``OpenSlide`` handle per pass. The OS page cache holds the slide
for everyone (it was just generated or read), so "cold" is "nothing decoded or cached in the
process", not "read from disk". Tiles are requested one at a time (latency = one await of
``service.tile``); tiles/s is tiles / summed latency. The same random addresses (fixed seed)
serve (a) and (b); (c) and (d) use random addresses of the native grid at the same level.

Access patterns: ``random`` (tiles spread over the level, no two sharing a stored tile)
and ``viewport`` (6x4 blocks of adjacent tiles, as a viewer fills a view), each measured
for every contender with the same addresses.

    python -m benchmarks.bench_tiles [--tiles 300] [--repeat 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator

from benchmarks.common import Stats, bench_slide, machine, markdown_table
from wsi_server.app import create_app
from wsi_server.cache import MemoryCache, NullCache, TileCache
from wsi_server.settings import Settings
from wsi_server.tiles import GeometryKind, TileService

Address = tuple[int, int]

# Targets of issue 2, as the minimum tiles/s ratio to (a), per contender and level name.
TARGETS: dict[tuple[str, str], float] = {
    ("b", "full"): 2.0,
    ("b", "ds2"): 2.0,
    ("c", "full"): 50.0,
    ("c", "ds2"): 4.0,
    ("d", "full"): 100.0,
    ("d", "ds2"): 100.0,
}
LABELS = {
    "a": "(a) DeepZoomGenerator + PIL q75",
    "b": "(b) TileService 254/1, cold",
    "c": "(c) native 256/0, cold",
    "d": "(d) native 256/0, cached",
}


@dataclass
class Result:
    seconds: list[float]
    sources: Counter[str]


VIEWPORT = (6, 4)  # tiles of one 1536x1024 view, as a viewer fills it


def sample(grid: tuple[int, int], n: int, seed: int, pattern: str = "random") -> list[Address]:
    """About ``n`` distinct tile addresses of a (cols, rows) grid.

    ``random``: spread at random over the grid (neighbours are rare: the worst case for
    every decoded-tile cache). ``viewport``: 6x4 blocks of adjacent tiles at random places,
    row by row, as a viewer fills a view after a jump."""
    cols, rows = grid
    rng = random.Random(seed)
    if pattern == "random":
        picks = rng.sample(range(cols * rows), min(n, cols * rows))
        return [(i % cols, i // cols) for i in picks]
    bw, bh = min(VIEWPORT[0], cols), min(VIEWPORT[1], rows)
    out: dict[Address, None] = {}  # ordered and without repeats
    while len(out) < min(n, cols * rows):
        x0, y0 = rng.randrange(cols - bw + 1), rng.randrange(rows - bh + 1)
        for dy in range(bh):
            for dx in range(bw):
                out[(x0 + dx, y0 + dy)] = None
    return list(out)


def reference(path: Path, level: int, addresses: list[Address]) -> Result:
    slide = openslide.OpenSlide(str(path))  # fresh handle: OpenSlide's tile cache is empty
    try:
        dz = DeepZoomGenerator(slide, 254, 1, limit_bounds=False)
        out: list[float] = []
        for col, row in addresses:
            start = time.perf_counter()
            buf = io.BytesIO()
            dz.get_tile(level, (col, row)).save(buf, "JPEG", quality=75)
            out.append(time.perf_counter() - start)
        return Result(out, Counter(reference=len(out)))
    finally:
        slide.close()


def fresh_service(folder: Path, cache: TileCache) -> tuple[TileService, str]:
    """A TileService wired exactly as the app wires it, with its library scanned."""
    app = create_app(Settings(paths=(folder,), rescan_seconds=0), cache=cache)
    service: TileService = app.state.service
    service.library.scan()
    (entry,) = service.library.entries()
    return service, entry.id


async def ours(
    service: TileService, sid: str, kind: GeometryKind, level: int, addresses: list[Address]
) -> Result:
    out: list[float] = []
    sources: Counter[str] = Counter()
    for col, row in addresses:
        start = time.perf_counter()
        tile = await service.tile(sid, kind, level, col, row, "jpeg")
        out.append(time.perf_counter() - start)
        sources[tile.source] += 1
    return Result(out, sources)


async def warm_up(service: TileService, sid: str, kind: GeometryKind) -> None:
    """Start the worker threads and build the geometry, on a tile outside the sample."""
    await service.tile(sid, kind, 8, 0, 0, "jpeg")


def run_ours(folder: Path, contender: str, level: int, addresses: list[Address]) -> Result:
    kind: GeometryKind = "default" if contender == "b" else "native"

    async def go() -> Result:
        cache: TileCache = MemoryCache(1 << 30) if contender == "d" else NullCache()
        service, sid = fresh_service(folder, cache)
        try:
            await warm_up(service, sid, kind)
            if contender == "d":  # fill the memory cache, then measure hits
                await ours(service, sid, kind, level, addresses)
            return await ours(service, sid, kind, level, addresses)
        finally:
            service.executor.shutdown(wait=True)

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=300, help="tiles per level and pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes per contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=24000)
    parser.add_argument("--height", type=int, default=18000)
    parser.add_argument("--only", default="abcd", help="contenders to run (default abcd)")
    parser.add_argument("--patterns", default="random,viewport",
                        help="access patterns, comma separated (random, viewport)")
    args = parser.parse_args(argv)

    path = bench_slide(args.width, args.height)
    with openslide.OpenSlide(str(path)) as slide:
        ref_dz = DeepZoomGenerator(slide, 254, 1, limit_bounds=False)
        nat_dz = DeepZoomGenerator(slide, 256, 0, limit_bounds=False)
        full = ref_dz.level_count - 1
        levels = {"full": full, "ds2": full - 1}
        grids = {
            (name, g): dz.level_tiles[lv]
            for name, lv in levels.items()
            for g, dz in (("254", ref_dz), ("256", nat_dz))
        }
    # Read the whole file once, so that every contender starts from a warm page cache.
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass

    results: dict[tuple[str, str, str], list[Result]] = {}
    for rep in range(args.repeat):
        for pattern in args.patterns.split(","):
            for name, level in levels.items():
                seed = args.seed + rep
                addr254 = sample(grids[(name, "254")], args.tiles, seed, pattern)
                addr256 = sample(grids[(name, "256")], args.tiles, seed, pattern)
                for c in args.only:
                    print(f"pass {rep + 1}/{args.repeat}: {pattern} {name} {LABELS[c]}",
                          file=sys.stderr, flush=True)
                    if c == "a":
                        res = reference(path, level, addr254)
                    else:
                        res = run_ours(path.parent, c, level, addr254 if c == "b" else addr256)
                    results.setdefault((pattern, name, c), []).append(res)

    print(f"\nSlide: {args.width}x{args.height} SVS-like (JPEG q90 256-px tiles, levels at "
          f"downsample 1/4/16), {path.stat().st_size / 2**20:.0f} MB, in the OS page cache "
          f"for every contender.")
    print(f"Machine: {machine()}. About {args.tiles} tiles per pattern, level and pass; "
          f"{args.repeat} passes (seed {args.seed}+pass); one request at a time; tiles/s = "
          f"tiles / summed latency.")
    for pattern in args.patterns.split(","):
        print(f"\nAccess pattern: {pattern}\n")
        print(table(results, pattern, levels, args.only))
    return 0


def table(
    results: dict[tuple[str, str, str], list[Result]],
    pattern: str,
    levels: dict[str, int],
    contenders: str,
) -> str:
    rows: list[list[object]] = []
    for name, level in levels.items():
        ref = _pooled(results.get((pattern, name, "a"), []))
        for c in contenders:
            res = _pooled(results[(pattern, name, c)])
            assert res is not None
            stats = Stats.of(res.seconds)
            ratio = p50_ratio = "–"
            verdict = ""
            if ref is not None and c != "a":
                ref_stats = Stats.of(ref.seconds)
                r = stats.per_s / ref_stats.per_s
                ratio = f"{r:,.1f}×"
                p50_ratio = f"{ref_stats.p50_ms / stats.p50_ms:,.1f}×"
                target = TARGETS.get((c, name))
                if target is not None:
                    verdict = f"≥ {target:g}×: {'met' if r >= target else 'MISSED'}"
            srcs = ", ".join(f"{k} {v}" for k, v in sorted(res.sources.items()))
            rows.append([
                f"{level} ({name})", LABELS[c], stats.count, stats.per_s, stats.p50_ms,
                stats.p99_ms, ratio, p50_ratio, verdict, srcs,
            ])
    return markdown_table(
        ["DZ level", "contender", "tiles", "tiles/s", "p50 ms", "p99 ms", "× (a) tiles/s",
         "× (a) p50", "target", "served by"],
        rows,
    )


def _pooled(runs: list[Result]) -> Result | None:
    if not runs:
        return None
    out = Result([], Counter())
    for r in runs:
        out.seconds.extend(r.seconds)
        out.sources.update(r.sources)
    return out


if __name__ == "__main__":
    sys.exit(main())
