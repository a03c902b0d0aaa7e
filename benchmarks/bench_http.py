"""The running server over HTTP on loopback, loaded with ``wrk``: native-grid tiles cold and
cached, next to a trivial route of the same app that returns the same bytes (the ceiling).

Two URL lists of native-grid tiles (random order, every tile of the level):
``full`` is the full-resolution level (stored JPEG tiles passed through; edge tiles are
cropped, so rendered) and ``ds2`` the level at downsample 2 (not stored: every tile
rendered from level 0 with DCT-scaled decoding).

- cold: a server started with ``--cache-size 0``, so every request misses and produces its
  tile (passthrough read or render) - what a first pass over unseen tiles costs. The OS
  page cache holds the slide (as for any slide being read).
- cached: a server with the memory cache, warmed by fetching every URL of the list once.
- ceiling: ``GET /bench/bytes/{n}`` (mounted by ``--bench-routes``) on that same server, with
  the list's response sizes in the same order: the HTTP stack's cost for the same bytes.

Each row says what produced the tiles (the server's tile-latency histogram counts by
source, read from ``/metrics`` before and after the run). The Lua script hands every wrk
thread its own stride through the list.

    python -m benchmarks.bench_http [--duration 5] [--connections 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator

from benchmarks.common import (
    OUT,
    LiveServer,
    bench_slide,
    http_get,
    machine,
    markdown_table,
)

LUA = r"""
-- Rotate through a list of paths (thread k of n takes paths k, k+n, k+2n, ...) and, when a
-- header name is given, through a list of values of that header (cookie, token, Accept).
local paths = {}
local headers = {}
local next_index = 0
local step = 1
local thread_count = 0

function setup(thread)
  thread:set("thread_id", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  for line in io.lines(args[1]) do
    paths[#paths + 1] = line
  end
  step = tonumber(args[2])
  next_index = thread_id
  if args[3] ~= nil and args[3] ~= "" then
    for line in io.lines(args[4]) do
      headers[#headers + 1] = {[args[3]] = line}
    end
  end
end

function request()
  local path = paths[(next_index % #paths) + 1]
  local h = nil
  if #headers > 0 then
    h = headers[(next_index % #headers) + 1]
  end
  next_index = next_index + step
  return wrk.format("GET", path, h)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, ' ..
    '"p99_us": %d, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""

_SOURCE = re.compile(r'^wsi_tile_seconds_count\{source="([a-z_]+)"\} ([0-9.e+]+)$', re.M)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 2**20


def wrk(url: str, paths: list[str], duration: float, connections: int, threads: int,
        header: str | None = None, values: Sequence[str] = (), timeout: str = "10s",
        ) -> WrkResult:
    """One wrk run over ``paths`` in rotation; with ``header``, every request also carries
    that header, its value rotating through ``values`` (the other benchmarks use this)."""
    with tempfile.TemporaryDirectory() as tmp:
        script, listing, listed = (Path(tmp, "rotate.lua"), Path(tmp, "paths.txt"),
                                   Path(tmp, "values.txt"))
        script.write_text(LUA)
        listing.write_text("\n".join(paths) + "\n")
        extra: list[str] = []
        if header:
            listed.write_text("\n".join(values) + "\n")
            extra = [header, str(listed)]
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout",
               timeout, "-s", str(script), url, "--", str(listing), str(threads), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    out = proc.stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    d = json.loads(line.removeprefix("WRKJSON "))
    return WrkResult(d["requests"], d["duration_us"] / 1e6, d["bytes"], d["p50_us"] / 1e3,
                     d["p99_us"] / 1e3, d["non_2xx"] + d["socket_errors"])


def tile_sources(server: LiveServer) -> Counter[str]:
    """Tiles served so far by source (memory, passthrough, rendered, ...)."""
    status, body = http_get(server.url("/metrics"))
    assert status == 200, status
    return Counter({m[1]: int(float(m[2])) for m in _SOURCE.finditer(body.decode())})


def tile_paths(slide: Path, sid: str, seed: int) -> dict[str, list[str]]:
    """Every native-grid tile of the full-resolution level and of the level below it
    (downsample 2), each list in a fixed random order."""
    with OpenSlide(str(slide)) as s:
        dz = DeepZoomGenerator(s, 256, 0, limit_bounds=False)
        full = dz.level_count - 1
        out: dict[str, list[str]] = {}
        for name, level in (("full", full), ("ds2", full - 1)):
            cols, rows = dz.level_tiles[level]
            paths = [f"/slides/{sid}/native_files/{level}/{c}_{r}.jpeg"
                     for r in range(rows) for c in range(cols)]
            random.Random(seed).shuffle(paths)
            out[name] = paths
    return out


def fetch_all(server: LiveServer, paths: list[str]) -> list[int]:
    """GET every path once (warming the cache); the response sizes, in order."""
    def size(path: str) -> int:
        status, body = http_get(server.url(path))
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return len(body)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(size, paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2

    slide = bench_slide()
    folder = slide.parent
    flags = ("--rescan-seconds", "0")
    results: dict[tuple[str, str], tuple[WrkResult, Counter[str], int]] = {}

    def run(server: LiveServer, name: str, kind: str, paths: list[str]) -> None:
        print(f"wrk: {name} {kind} ({len(paths)} URLs)", file=sys.stderr, flush=True)
        before = tile_sources(server)
        res = wrk(server.base, paths, args.duration, args.connections, args.threads)
        results[(name, kind)] = (res, tile_sources(server) - before, len(paths))

    with LiveServer([folder], *flags, "--cache-size", "0", log=OUT / "server-cold.log") as srv:
        (entry,) = srv.json("/api/slides")["slides"]  # type: ignore[index]
        lists = tile_paths(slide, entry["id"], args.seed)
        for name, paths in lists.items():
            run(srv, name, "cold", paths)
    with LiveServer([folder], *flags, "--cache-size", "1024", "--bench-routes",
                    log=OUT / "server-cached.log") as srv:
        for name, paths in lists.items():
            print(f"warming: {name} ({len(paths)} tiles)", file=sys.stderr, flush=True)
            sizes = fetch_all(srv, paths)
            run(srv, name, "cached", paths)
            run(srv, name, "ceiling", [f"/bench/bytes/{n}" for n in sizes])

    rows: list[list[object]] = []
    for name in lists:
        ceiling = results[(name, "ceiling")][0]
        for kind in ("cold", "cached", "ceiling"):
            res, served, n_urls = results[(name, kind)]
            total = max(1, served.total())
            by = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(served.items()))
            share = f"{100 * res.per_s / ceiling.per_s:.0f}%" if kind != "ceiling" else "–"
            rows.append([name, kind, n_urls, res.per_s, res.p50_ms, res.p99_ms, res.mb_per_s,
                         res.errors, by or "–", share])
    print(f"\nSlide: {slide.name} ({slide.stat().st_size / 2**20:.0f} MB, in the OS page "
          f"cache). Machine: {machine()}; server and wrk share it.")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s on loopback; one "
          f"server process (python -m wsi_server serve, 1 worker).\n")
    print(markdown_table(
        ["tiles", "run", "URLs", "req/s", "p50 ms", "p99 ms", "MB/s", "errors", "served by",
         "of ceiling"],
        rows,
    ))
    for name in lists:
        ratio = results[(name, "cached")][0].per_s / results[(name, "ceiling")][0].per_s
        print(f"Target, cached tiles >= 60% of the ceiling ({name}): {100 * ratio:.0f}% "
              f"{'met' if ratio >= 0.6 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
