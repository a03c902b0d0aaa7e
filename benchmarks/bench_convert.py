"""Conversion to zarr against ``vips dzsave``, and cold native-grid tiles from the store.

Part 1, conversion (each run in its own process; peak RSS from ``wait4``): a generated
24000x18000 SVS-like slide (JPEG tiles 256, levels 1/4/16) converted by
- ``wsi-server convert`` (default: level-0 JPEG tiles copied, levels below encoded q90),
- ``wsi-server convert --reencode`` (every tile decoded, averaged and encoded q90),
- ``vips dzsave SRC OUT --tile-size 256 --overlap 0`` (q75 JPEG, one file per tile),
- ``vips dzsave`` with ``--suffix .jpg[Q=90]`` (the same quality as ours);
plus ``wsi-server convert`` of a 12000x9000 slide (4x fewer pixels) for peak RSS vs size.

Part 2, cold native-grid tiles (TileService with no tile cache, as the app wires it; the OS
page cache holds the files): random tiles over the native levels one tile wide and more,
the source SVS and the shared NDPI, p50/p99, and the ratio of the source's to the store's.

    .venv/bin/python -m benchmarks.bench_convert [--tiles N] [--skip-vips]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT, ROOT, Stats, bench_slide, fmt_num, machine, markdown_table
from wsi_server.app import create_app
from wsi_server.cache import NullCache
from wsi_server.settings import Settings
from wsi_server.tiles import TileService

NDPI = ROOT.parent / "shared" / "slides" / "ndpi" / "test3-DAPI-2-(387).ndpi"


@dataclass(frozen=True)
class Run:
    name: str
    seconds: float
    peak_rss_mb: float
    mpx: float
    out_bytes: int
    files: int

    @property
    def mpx_per_s(self) -> float:
        return self.mpx / self.seconds


def _measure(cmd: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def _tree(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files), len(files)


def convert_run(name: str, src: Path, dest: Path, extra: list[str], mpx: float) -> Run:
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "wsi_server", "convert", str(src), str(dest), *extra]
    seconds, rss = _measure(cmd)
    size, files = _tree(dest)
    return Run(name, seconds, rss, mpx, size, files)


def vips_run(name: str, src: Path, out: Path, extra: list[str], mpx: float) -> Run:
    shutil.rmtree(out.with_name(out.name + "_files"), ignore_errors=True)
    out.with_suffix(".dzi").unlink(missing_ok=True)
    cmd = ["vips", "dzsave", str(src), str(out), "--tile-size", "256", "--overlap", "0", *extra]
    seconds, rss = _measure(cmd)
    size, files = _tree(out.with_name(out.name + "_files"))
    return Run(name, seconds, rss, mpx, size, files)


# -- tiles ---------------------------------------------------------------------------------
def _addresses(service: TileService, sid: str, n: int, seed: int) -> list[tuple[int, int, int]]:
    entry = service.library.entry(sid)
    geom = service.geometry(entry, "native")
    rng = random.Random(seed)
    # the levels a viewer spends its time on: one tile across and more (all stored levels
    # of the converted store; the tiny levels above are a handful of tiles)
    levels = [z for z in range(geom.level_count) if max(geom.z_dimensions[z]) >= geom.tile_size]
    out = []
    for _ in range(n):
        z = rng.choice(levels)
        cols, rows = geom.t_dimensions[z]
        out.append((z, rng.randrange(cols), rng.randrange(rows)))
    return out


def tile_latency(path: Path, n: int, seed: int) -> tuple[Stats, Stats | None, dict[str, int]]:
    """Cold native-grid tiles: all, and only those rendered (not passed through)."""

    async def go() -> tuple[Stats, Stats | None, dict[str, int]]:
        app = create_app(Settings(paths=(path,), rescan_seconds=0, cache_size=0),
                         cache=NullCache())
        service: TileService = app.state.service
        service.library.scan()
        (entry,) = service.library.entries()
        try:
            await service.tile(entry.id, "native", 0, 0, 0, "jpeg")  # threads, geometry
            times: list[float] = []
            rendered: list[float] = []
            sources: dict[str, int] = {}
            for z, c, r in _addresses(service, entry.id, n, seed):
                start = time.perf_counter()
                tile = await service.tile(entry.id, "native", z, c, r, "jpeg")
                dt = time.perf_counter() - start
                times.append(dt)
                sources[tile.source] = sources.get(tile.source, 0) + 1
                if tile.source == "rendered":
                    rendered.append(dt)
            return Stats.of(times), Stats.of(rendered) if rendered else None, sources
        finally:
            service.executor.shutdown(wait=True)

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=400, help="tiles per latency run")
    parser.add_argument("--skip-vips", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_vips and shutil.which("vips") is None:
        print("vips not found (Debian: libvips-tools); use --skip-vips", file=sys.stderr)
        return 2
    big = bench_slide(24000, 18000)
    small = bench_slide(12000, 9000)
    work = OUT / "convert"
    work.mkdir(parents=True, exist_ok=True)
    mpx_big, mpx_small = 24000 * 18000 / 1e6, 12000 * 9000 / 1e6
    store = work / "big.zarr"
    runs = [
        convert_run("wsi-server convert (level-0 tiles copied)", big, store, [], mpx_big),
        convert_run("wsi-server convert --reencode", big, work / "big-reencoded.zarr",
                    ["--reencode"], mpx_big),
    ]
    if not args.skip_vips:
        runs.append(vips_run("vips dzsave (Q75 default)", big, work / "vips", [], mpx_big))
        runs.append(vips_run("vips dzsave --suffix .jpg[Q=90]", big, work / "vips90",
                             ["--suffix", ".jpg[Q=90]"], mpx_big))
    small_run = convert_run("wsi-server convert, 12000x9000 (1/4 the pixels)", small,
                            work / "small.zarr", [], mpx_small)
    ref = next((r for r in runs if r.name.startswith("vips dzsave (")), None)
    print(f"\n### Conversion of a 24000x18000 SVS-like slide ({machine()})\n")
    rows = []
    for r in [*runs, small_run]:
        rows.append([r.name, fmt_num(r.seconds), fmt_num(r.mpx_per_s), fmt_num(r.peak_rss_mb),
                     fmt_num(r.out_bytes / 2**20), r.files,
                     fmt_num(r.mpx_per_s / ref.mpx_per_s) if ref else "-"])
    print(markdown_table(["run", "s", "Mpx/s", "peak RSS MB", "output MiB", "files",
                          "speed vs vips Q75"], rows))

    print(f"\n### Cold native-grid tiles, {args.tiles} random over the levels of one tile "
          "and more (no tile cache)\n")
    results = {}
    for name, path in [("converted store", store), ("source SVS", big), ("source NDPI", NDPI)]:
        if not path.exists():
            continue
        results[name] = tile_latency(path, args.tiles, seed=7)
    base = results["converted store"][0]
    rows = []
    for name, (all_, rendered, sources) in results.items():
        rows.append([name, fmt_num(all_.p50_ms), fmt_num(all_.p99_ms),
                     fmt_num(rendered.p50_ms) if rendered else "-",
                     fmt_num(rendered.p99_ms) if rendered else "-",
                     ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
                     fmt_num(all_.p50_ms / base.p50_ms), fmt_num(all_.p99_ms / base.p99_ms)])
    print(markdown_table(["slide", "p50 ms", "p99 ms", "rendered p50 ms", "rendered p99 ms",
                          "tiles by path", "p50 / store", "p99 / store"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
