"""IIIF image requests against the Deep Zoom tiles they stand for, over HTTP, in one run.

One server (``python -m wsi_server serve`` with ``--cache-size 0``: every request produces
its image) loaded with ``wrk`` on loopback, rotating through URL lists in a fixed random
order. Pairs, each a IIIF list and its Deep Zoom reference:

- ``passthrough``: interior tiles of the full-resolution level. Deep Zoom:
  ``/slides/{id}/native_files/{L}/{c}_{r}.jpeg``; IIIF: the same tiles as OpenSeadragon's
  IIIF source asks them, ``/iiif/3/{id}/{x},{y},256,256/256,256/0/default.jpg``. Both are
  the stored JPEG bytes (one ``pread``).
- ``rendered (grid)``: the level at downsample 2, which the file does not store. Deep Zoom
  native tiles against the IIIF requests of the same tiles (``{x},{y},512,512/256,256``):
  both rendered (DCT-scaled decode, Lanczos, JPEG).
- ``rendered (any region)``: IIIF regions off the grid (``{x+100},{y+100},512,512/256,256``,
  rendered by ``TileService.fetch_image``) against the Deep Zoom tiles of the default
  254/overlap-1 geometry at the same level (which straddle stored tiles too): a render of
  the same size from the same level on both sides.

The pairs are run alternately, ``--rounds`` times each; the table gives the median of each
side and the ratio of the IIIF side's cost to its reference's, in the server process's CPU
time per request (user + system, all threads: robust when the machine is shared) and in
requests/s (the reference's over IIIF's). 1.0 is as cheap; the issue's target is <= 1.2.

    python -m benchmarks.bench_iiif [--duration 3] [--rounds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_http import WrkResult, tile_sources, wrk
from benchmarks.common import OUT, LiveServer, bench_slide, http_get, machine, markdown_table
from wsi_server.geometry import GeometryParams, Pyramid, deep_zoom

TARGET = 1.2
@dataclass(frozen=True)
class Pair:
    name: str
    reference: str
    """What the IIIF list is compared with."""
    dz: list[str]
    iiif: list[str]


def url_pairs(slide_id: str, pyramid: Pyramid, tile: int, seed: int) -> list[Pair]:
    """The three pairs of URL lists (see the module docstring)."""
    native = deep_zoom(pyramid, GeometryParams(tile, 0, False))
    default = deep_zoom(pyramid, GeometryParams(254, 1, False))
    full = native.level_count - 1
    rng = random.Random(seed)
    base = f"/iiif/3/{slide_id}"

    def interior(cols: int, rows: int) -> list[tuple[int, int]]:
        cells = [(c, r) for r in range(rows - 1) for c in range(cols - 1)]
        rng.shuffle(cells)
        return cells

    cols, rows = native.t_dimensions[full]
    cells = interior(cols, rows)
    passthrough = Pair(
        "passthrough", "native Deep Zoom tile (passed through)",
        [f"/slides/{slide_id}/native_files/{full}/{c}_{r}.jpeg" for c, r in cells],
        [f"{base}/{c * tile},{r * tile},{tile},{tile}/{tile},{tile}/0/default.jpg"
         for c, r in cells],
    )
    cols, rows = native.t_dimensions[full - 1]
    cells = interior(cols, rows)
    span = 2 * tile
    grid = Pair(
        "rendered (grid)", "native Deep Zoom tile, downsample 2 (rendered)",
        [f"/slides/{slide_id}/native_files/{full - 1}/{c}_{r}.jpeg" for c, r in cells],
        [f"{base}/{c * span},{r * span},{span},{span}/{tile},{tile}/0/default.jpg"
         for c, r in cells],
    )
    dcols, drows = default.t_dimensions[full - 1]
    dcells = interior(dcols, drows)
    anywhere = Pair(
        "rendered (any region)", "Deep Zoom 254/1 tile, downsample 2 (rendered)",
        [f"/slides/{slide_id}_files/{full - 1}/{c}_{r}.jpeg" for c, r in dcells],
        [f"{base}/{c * span + 100},{r * span + 100},{span},{span}/{tile},{tile}/0/default.jpg"
         for c, r in cells],
    )
    return [passthrough, grid, anywhere]


def check(server: LiveServer, paths: list[str], source: str) -> None:
    """The first URLs answer 200, served the way the pair says."""
    for path in paths[:3]:
        status, body = http_get(server.url(path))
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    before = tile_sources(server)
    for path in paths[3:23]:
        http_get(server.url(path))
    served = tile_sources(server) - before
    if set(served) != {source}:
        raise RuntimeError(f"{paths[3]}: served by {dict(served)}, expected {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each list")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2

    slide = bench_slide()
    results: dict[tuple[str, str], list[WrkResult]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    served: dict[tuple[str, str], Counter[str]] = {}

    def measure(server: LiveServer, name: str, side: str, paths: list[str], seconds: float
                ) -> WrkResult:
        print(f"{name}, {side} ({len(paths)} URLs)", file=sys.stderr, flush=True)
        cpu0 = cpu_seconds(server.pid)
        before = tile_sources(server)
        res = wrk(server.base, paths, seconds, args.connections, args.threads)
        time.sleep(0.5)  # requests wrk left in flight finish in this run's count
        cpu.setdefault((name, side), []).append((cpu_seconds(server.pid) - cpu0) / res.requests)
        served.setdefault((name, side), Counter()).update(tile_sources(server) - before)
        results.setdefault((name, side), []).append(res)
        return res

    with LiveServer([slide.parent], "--rescan-seconds", "0", "--cache-size", "0",
                    log=OUT / "server-iiif.log") as srv:
        (entry,) = srv.json("/api/slides")["slides"]  # type: ignore[index]
        detail: dict[str, Any] = srv.json(f"/api/slides/{entry['id']}")  # type: ignore[assignment]
        levels = detail["levels"]
        pyramid = Pyramid(tuple((lv["width"], lv["height"]) for lv in levels),
                          tuple(lv["downsample"] for lv in levels))
        tile = int(detail["native_tile_size"])
        pairs = url_pairs(entry["id"], pyramid, tile, args.seed)
        for pair in pairs:
            expected = "passthrough" if pair.name == "passthrough" else "rendered"
            check(srv, pair.dz, expected)
            check(srv, pair.iiif, expected)
        for _ in range(args.rounds):
            for pair in pairs:
                for side, paths in (("dz", pair.dz), ("iiif", pair.iiif)):
                    measure(srv, pair.name, side, paths, args.duration)

    rows: list[list[object]] = []
    verdicts = []
    def med(values: dict[tuple[str, str], list[Any]], name: str, side: str,
            key: Callable[[Any], float]) -> float:
        return statistics.median(key(v) for v in values[(name, side)])

    for pair in pairs:
        per_s = {side: med(results, pair.name, side, lambda r: r.per_s)
                 for side in ("dz", "iiif")}
        us = {side: med(cpu, pair.name, side, lambda c: c * 1e6) for side in ("dz", "iiif")}
        # ratios of the runs of one round (back to back), then their median: steadier than
        # a ratio of medians when the machine's load drifts
        cost = statistics.median(
            i / d for d, i in zip(cpu[(pair.name, "dz")], cpu[(pair.name, "iiif")], strict=True))
        cost_rate = statistics.median(
            d.per_s / i.per_s for d, i in zip(results[(pair.name, "dz")],
                                              results[(pair.name, "iiif")], strict=True))
        verdicts.append(f"{pair.name}: IIIF costs {cost:.2f}x its reference in server CPU, "
                        f"{cost_rate:.2f}x in requests/s (target <= {TARGET}x): "
                        f"{'met' if cost <= TARGET else 'MISSED'}")
        for side, label in (("dz", pair.reference), ("iiif", "IIIF")):
            by = served[(pair.name, side)]
            total = max(1, by.total())
            rows.append([
                pair.name, label, per_s[side], med(results, pair.name, side, lambda r: r.p50_ms),
                us[side], sum(r.errors for r in results[(pair.name, side)]),
                ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by.items())),
                f"{cost:.2f}x / {cost_rate:.2f}x" if side == "iiif" else "–",
            ])
    print(f"\nSlide: {slide.name} ({detail['width']}x{detail['height']}, native tile {tile}, "
          f"{slide.stat().st_size / 2**20:.0f} MB, in the OS page cache). Machine: "
          f"{machine()}; server and wrk share it.")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s on loopback, "
          f"{args.rounds} alternating rounds (medians; costs: median of each round's ratio); "
          "one server process with --cache-size 0 (every request produces its image). Server "
          "CPU: the server process's user + system time over the requests of the run.\n")
    print(markdown_table(["pair", "requests", "req/s", "p50 ms", "server CPU µs/req",
                          "errors", "served by", "IIIF cost (CPU / req/s)"], rows))
    print()
    for line in verdicts:
        print(line)
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
