"""The DICOMweb front and a ``--dicomweb-source`` archive over HTTP on loopback, under
``wrk``.

1. WADO-RS frames against native Deep Zoom tiles: the same stored JPEG tiles of the full-
   resolution level (interior tiles, random order), asked as
   ``/dicomweb/studies/…/instances/…/frames/N`` (``Accept: image/jpeg``, one frame per
   request) and as ``/slides/{id}/native_files/…`` (passthrough), both from a server with
   ``--cache-size 0`` so each request reads the stored tile. Target: a frame costs at most
   1.5× a tile (cost = 1 / rate).
2. A slide behind ``--dicomweb-source`` (a real Orthanc with the DICOMweb plugin, loaded
   with our own export of the slide through its REST API) against the same slide served
   from its file: cold (``--cache-size 0``: every remote tile is one WADO-RS round trip to
   Orthanc) and warm (memory cache, warmed by one pass: served from cache, no round trip).

    python -m benchmarks.bench_dicomweb [--duration 5] [--connections 8] [--urls 1500]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_http import wrk as http_wrk
from benchmarks.common import OUT, LiveServer, bench_slide, http_get, machine, markdown_table


@dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def wrk(base: str, paths: list[str], duration: float, connections: int) -> Run:
    """bench_http's wrk run, every request asking for ``Accept: image/jpeg``."""
    r = http_wrk(base, paths, duration, connections, 1, header="Accept",
                 values=["image/jpeg"], timeout="20s")
    return Run(r.requests, r.seconds, r.p50_ms, r.p99_ms, r.errors)


def get_json(server: LiveServer, path: str) -> Any:
    status, body = http_get(server.url(path))
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    return json.loads(body)


def interior_tiles(width: int, height: int, tile: int, n: int, seed: int
                   ) -> list[tuple[int, int]]:
    """Up to ``n`` (col, row) of full stored tiles, in a fixed random order."""
    cols, rows = width // tile, height // tile
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    random.Random(seed).shuffle(cells)
    return cells[:n]


def dz_level(width: int, height: int) -> int:
    return max(width, height).bit_length() - (1 if max(width, height) & (
        max(width, height) - 1) == 0 else 0)


def frame_paths(server: LiveServer, slide_id: str, cells: list[tuple[int, int]]
                ) -> list[str]:
    insts = get_json(server, f"/dicomweb/instances?ContainerIdentifier={slide_id}"
                     "&includefield=all")
    base = max((i for i in insts if i["00080008"]["Value"][2] == "VOLUME"),
               key=lambda i: i["00480006"]["Value"][0])
    cols = -(-base["00480006"]["Value"][0] // base["00280011"]["Value"][0])
    url = base["00081190"]["Value"][0].split(server.base, 1)[1]
    return [f"{url}/frames/{r * cols + c + 1}" for c, r in cells]


def fetch_all(server: LiveServer, paths: list[str]) -> None:
    def one(path: str) -> None:
        status, body = http_get(server.url(path))
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, paths))


def exported(slide: Path) -> Path:
    """The slide as DICOM files (``wsi-server dicom export``), made once, reused."""
    from wsi_server.dicom.export import export_slide

    dest = OUT / f"dicom-{slide.stem}"
    print(f"exporting {slide.name} as DICOM (resumed if done) ...", file=sys.stderr, flush=True)
    export_slide(slide, dest)
    return dest


def start_orthanc() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.plugins.orthanc_server import BINARY, OrthancServer, _dicomweb_plugin

    plugin = _dicomweb_plugin()
    if plugin is None or not Path(BINARY).exists():
        raise SystemExit("Orthanc is not installed (Debian packages orthanc, "
                         "orthanc-dicomweb; ./dev bench installs them)")
    return OrthancServer(BINARY, plugin).start()


RunFn = Callable[[LiveServer, str, str, list[str]], None]
FLAGS = ("--rescan-seconds", "0")


def frames_part(args: argparse.Namespace, run: RunFn) -> None:
    """WADO-RS frames against native Deep Zoom tiles: the same stored tiles."""
    slide = bench_slide()
    with LiveServer([slide.parent], *FLAGS, "--cache-size", "0",
                    log=OUT / "server-dicomweb-frames.log") as srv:
        (entry,) = get_json(srv, "/api/slides")["slides"]
        meta = get_json(srv, f"/api/slides/{entry['id']}")
        tile = meta["tile_size"][0]
        cells = interior_tiles(meta["width"], meta["height"], tile, args.urls, args.seed)
        level = dz_level(meta["width"], meta["height"])
        tiles = [f"/slides/{entry['id']}/native_files/{level}/{c}_{r}.jpeg" for c, r in cells]
        frames = frame_paths(srv, entry["id"], cells)
        fetch_all(srv, frames[:50])  # the DICOM model is built once, not in the timing
        run(srv, "native DZ tile", "stored tile, passthrough", tiles)
        run(srv, "WADO-RS frame", "stored tile, image/jpeg", frames)


def source_part(args: argparse.Namespace, run: RunFn) -> None:
    """A slide behind --dicomweb-source (Orthanc) against the same slide's file."""
    small = bench_slide(8000, 6000)
    folder = exported(small)
    orthanc = start_orthanc()
    try:
        started = time.perf_counter()
        for path in sorted(folder.glob("*.dcm")):
            orthanc.upload(path)
        print(f"loaded Orthanc in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        source = ("--dicomweb-source", orthanc.dicomweb)
        for kind, cache in (("cold", "0"), ("warm", "1024")):
            with LiveServer([small.parent], *FLAGS, *source, "--cache-size", cache,
                            log=OUT / f"server-dicomweb-source-{kind}.log") as srv:
                deadline = time.monotonic() + 60
                while len(slides := get_json(srv, "/api/slides")["slides"]) < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the archive's slide was not listed")
                    time.sleep(0.2)
                by = {"dicomweb" if s["format"] == "dicomweb" else "local": s["id"]
                      for s in slides}
                meta = get_json(srv, f"/api/slides/{by['dicomweb']}")
                tile = meta["tile_size"][0]
                cells = interior_tiles(meta["width"], meta["height"], tile, args.urls,
                                       args.seed)
                level = dz_level(meta["width"], meta["height"])
                lists = {name: [f"/slides/{sid}/native_files/{level}/{c}_{r}.jpeg"
                                for c, r in cells]
                         for name, sid in (("archive", by["dicomweb"]), ("local", by["local"]))}
                if kind == "warm":
                    for paths in lists.values():
                        fetch_all(srv, paths)
                run(srv, f"{kind}, archive slide", "via WADO-RS" if kind == "cold"
                    else "memory cache", lists["archive"])
                run(srv, f"{kind}, local slide", "passthrough" if kind == "cold"
                    else "memory cache", lists["local"])
    finally:
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--urls", type=int, default=1500, help="tiles per URL list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("frames", "source"), default=None,
                        help="run one of the two parts")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 2
    rows: list[list[object]] = []
    runs: dict[str, Run] = {}

    def run(server: LiveServer, label: str, what: str, paths: list[str]) -> None:
        print(f"wrk: {label} ({len(paths)} URLs)", file=sys.stderr, flush=True)
        res = wrk(server.base, paths, args.duration, args.connections)
        runs[label] = res
        rows.append([label, what, len(paths), res.per_s, res.p50_ms, res.p99_ms, res.errors])

    if args.only != "source":
        frames_part(args, run)
    if args.only != "frames":
        source_part(args, run)
    print(f"\nMachine: {machine()}; server, Orthanc and wrk share it. wrk -t1 "
          f"-c{args.connections} -d{args.duration:g}s on loopback; one server process.\n")
    print(markdown_table(["run", "tiles", "URLs", "req/s", "p50 ms", "p99 ms", "errors"],
                         rows))
    if "WADO-RS frame" in runs:
        ratio = runs["native DZ tile"].per_s / runs["WADO-RS frame"].per_s
        print(f"\nA WADO-RS frame costs {ratio:.2f}x a native Deep Zoom tile (target <= "
              f"1.5x): {'met' if ratio <= 1.5 else 'MISSED'}")
    if "warm, archive slide" in runs:
        warm = runs["warm, archive slide"].per_s / runs["warm, local slide"].per_s
        print(f"Warm archive tiles at {100 * warm:.0f}% of a local slide's cached rate; cold "
              f"archive tiles at {runs['cold, archive slide'].per_s:.0f}/s, one WADO-RS "
              "round trip each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
