"""HTTP load on loopback with ``wrk``: warm-cache tiles/s and p99 against a ceiling
measured in the same run on the same server.

Configurations (each a live server subprocess, ``uvicorn`` with the app factory below):

- ``memory``: the in-process LRU only (no Redis), 1 worker;
- ``redis``: Redis only (``--cache-size 0``: no memory tier), 1 worker;
- ``tiered``: a memory tier in front of Redis, 1 worker and 2 workers.

Tiles: every tile of the default geometry (254/1) of the sample slide, requested in
rotation (wrk Lua script), warmed first. Ceiling: ``/bench/ceiling/{i}``, a route that
this benchmark mounts on the same app (same middleware, same worker processes), returning
the i-th tile's exact bytes from a list held in memory, with the same headers a tile
carries. Mounting it here keeps the production app free of benchmark routes; the factory
(``app_factory``) is the server's own ``wsi_server.cli:app_from_env`` plus that one route.

Memory soak (``--soak``): 50 copies of the slide open (pool of 64), a 256 MB memory tier,
wrk at concurrency 8 for 60 s over every tile of all 50 slides (cold, then warm as the
tier fills); the worker's RSS is sampled every 5 s.

    python -m benchmarks.bench_load [--seconds 5] [--soak] [--soak-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, bench_slide, free_port, http_get, machine, markdown_table

CONCURRENCY = (1, 8, 32)
WRK_SCRIPT = r"""
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = math.random(#paths)
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p99_us\": %d, " ..
    "\"errors\": %d, \"non2xx\": %d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


# -- the app under load: the server's factory plus the ceiling route -------------------
def app_factory() -> Any:
    """``wsi_server.cli:app_from_env`` with ``/bench/ceiling/{i}`` mounted: the i-th file
    of ``$BENCH_CEILING_DIR`` (the tiles' bytes), served from memory."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from wsi_server.cli import app_from_env

    app = app_from_env()
    folder = Path(os.environ["BENCH_CEILING_DIR"])
    bodies = [p.read_bytes() for p in sorted(folder.iterdir(), key=lambda p: int(p.stem))]
    etag = '"0123456789abcdef0123"'

    async def ceiling(request: Request) -> Response:
        i = int(request.path_params["i"])
        return Response(bodies[i % len(bodies)], media_type="image/jpeg", headers={
            "ETag": etag, "Cache-Control": "public, no-cache", "X-Tile-Source": "ceiling",
        })

    app.router.routes.insert(0, Route("/bench/ceiling/{i:int}", ceiling))
    return app


# -- processes ---------------------------------------------------------------------------
@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (./dev bench installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
             "--appendonly", "no", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                 check=False).stdout.strip() != b"PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[bytes]

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (the server process itself with one worker)."""
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmd = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"spawn_main" in cmd:
                kids.append(int(stat.parent.name))
        return kids or [self.proc.pid]


@contextmanager
def server(paths: Sequence[Path], ceiling_dir: Path, workers: int, **settings: str) -> Iterator[
    Server
]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    env.update({
        "WSI_PATHS": os.pathsep.join(map(str, paths)), "WSI_RESCAN_SECONDS": "0",
        "WSI_LOG_LEVEL": "warning", "BENCH_CEILING_DIR": str(ceiling_dir),
        **{"WSI_" + k.upper(): v for k, v in settings.items()},
    })
    argv = [sys.executable, "-m", "uvicorn", "benchmarks.bench_load:app_factory", "--factory",
            "--app-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    srv = Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(srv.base + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        while len(srv.worker_pids()) < workers:
            time.sleep(0.1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failed: int

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def wrk(base: str, paths_file: Path, script: Path, connections: int, seconds: float) -> Load:
    threads = min(connections, 2)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "5s", "-s", str(script), base],
        capture_output=True, text=True, check=True, env={**os.environ,
                                                         "BENCH_PATHS": str(paths_file)},
    )
    m = re.search(r"^BENCH (\{.*\})$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"no result from wrk: {out.stdout}{out.stderr}")
    r = json.loads(m.group(1))
    return Load(r["requests"], r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3,
                r["errors"] + r["non2xx"])


def tile_paths(base: str, max_per_slide: int = 100_000) -> list[str]:
    """Every tile of the coarsest default-geometry levels of every slide the server lists,
    whole levels, at most ``max_per_slide`` per slide."""
    out: list[str] = []
    for s in json.loads(http_get(base + "/api/slides")[1])["slides"]:
        xml = http_get(f"{base}/slides/{s['id']}.dzi")[1].decode()
        w, h, size = (int(re.search(rf'{k}="(\d+)"', xml).group(1))  # type: ignore[union-attr]
                      for k in ("Width", "Height", "TileSize"))
        dims = [(w, h)]
        while dims[-1] != (1, 1):
            dims.append(((dims[-1][0] + 1) // 2, (dims[-1][1] + 1) // 2))
        taken = 0
        for level, (lw, lh) in enumerate(reversed(dims)):
            cols, rows = -(-lw // size), -(-lh // size)
            if taken + cols * rows > max_per_slide:
                break
            taken += cols * rows
            out += [f"/slides/{s['id']}_files/{level}/{c}_{r}.jpeg"
                    for r in range(rows) for c in range(cols)]
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(RSS, anonymous part of it) in MB. The rest is file pages mapped by the readers,
    which the kernel can drop and which count once per mapping."""
    kb = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            kb[name] = int(value.split()[0])
    return kb.get("VmRSS", 0) / 1024, kb.get("RssAnon", 0) / 1024


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk duration per cell")
    ap.add_argument("--soak", action="store_true", help="also run the 60 s memory soak")
    ap.add_argument("--soak-seconds", type=float, default=60.0)
    ap.add_argument("--tiles", type=int, default=1000,
                    help="tiles in rotation: whole coarsest levels, at most this many")
    ap.add_argument("--only", default="", help="run only configurations whose name has this")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (./dev bench installs it)")

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        lib = tmp / "lib"
        lib.mkdir()
        slide = bench_slide()
        os.symlink(slide, lib / slide.name)
        script = tmp / "rotate.lua"
        script.write_text(WRK_SCRIPT)
        # Fetch every tile once from a plain server: the ceiling serves these bytes.
        ceiling_dir = tmp / "ceiling"
        ceiling_dir.mkdir()
        (ceiling_dir / "0").write_bytes(b"")
        with server([lib], ceiling_dir, 1) as srv:
            paths = tile_paths(srv.base, args.tiles)
            for i, p in enumerate(paths):
                (ceiling_dir / str(i)).write_bytes(http_get(srv.base + p)[1])
        tiles_file = tmp / "tiles.txt"
        tiles_file.write_text("\n".join(paths) + "\n")
        ceiling_file = tmp / "ceiling.txt"
        ceiling_file.write_text("\n".join(f"/bench/ceiling/{i}" for i in range(len(paths))) + "\n")
        mean_kb = sum(p.stat().st_size for p in ceiling_dir.iterdir()) / len(paths) / 1024
        print(f"{len(paths)} tiles of {slide.name}, mean {mean_kb:.1f} kB; "
              f"{args.seconds:g} s per cell; {machine()}", file=sys.stderr)

        rows: list[list[object]] = []
        configs: list[tuple[str, int, dict[str, str], bool]] = [
            ("memory", 1, {"cache_size": "256"}, False),
            ("redis only", 1, {"cache_size": "0"}, True),
            ("memory + redis", 1, {"cache_size": "256"}, True),
            ("memory + redis", 2, {"cache_size": "256"}, True),
        ]
        for name, workers, settings, use_redis in configs:
            if args.only not in name:
                continue
            with _maybe_redis(use_redis) as url:
                if url:
                    settings = {**settings, "redis_url": url}
                with server([lib], ceiling_dir, workers, **settings) as srv:
                    for p in paths:  # render once: into Redis and/or this worker's memory
                        http_get(srv.base + p)
                    # every worker's memory tier warm too
                    wrk(srv.base, tiles_file, script, 8, 2)
                    for c in CONCURRENCY:
                        t = wrk(srv.base, tiles_file, script, c, args.seconds)
                        ref = wrk(srv.base, ceiling_file, script, c, args.seconds)
                        rows.append([name, workers, c, t.per_s, t.p99_ms, ref.per_s, ref.p99_ms,
                                     f"{t.per_s / ref.per_s:.0%}", t.failed + ref.failed])
                        print(markdown_table(HEADER, rows[-1:]).splitlines()[-1],
                              file=sys.stderr, flush=True)
        print()
        print(f"Warm-cache tile load, wrk on loopback, {args.seconds:g} s per cell, "
              f"{len(paths)} tiles in rotation (mean {mean_kb:.1f} kB); {machine()}")
        print()
        print(markdown_table(HEADER, rows))
        if args.soak:
            print()
            print(soak(tmp, slide, script, args.soak_seconds, args.tiles))
    return 0


HEADER = ["cache", "workers", "conc.", "tiles/s", "p99 ms", "ceiling/s", "ceiling p99 ms",
          "tiles/ceiling", "failed"]


@contextmanager
def _maybe_redis(use: bool) -> Iterator[str | None]:
    if not use:
        yield None
        return
    with redis_server() as url:
        yield url


def soak(tmp: Path, slide: Path, script: Path, seconds: float, per_slide: int) -> str:
    lib = tmp / "soak"
    lib.mkdir()
    for i in range(50):  # symlinks: 50 slides (distinct paths, ids, readers), no copies
        os.symlink(slide, lib / f"slide-{i:02d}.svs")
    ceiling_dir = tmp / "ceiling"
    samples: list[tuple[float, tuple[float, float]]] = []
    with server([lib], ceiling_dir, 1, cache_size="256", pool_size="64") as srv:
        paths = tile_paths(srv.base, per_slide)
        random.Random(0).shuffle(paths)
        paths_file = tmp / "soak.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        pid = srv.worker_pids()[0]
        stop = threading.Event()
        start = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - start, rss_mb(pid)))
                stop.wait(5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        load = wrk(srv.base, paths_file, script, 8, seconds)
        stop.set()
        sampler.join()
        samples.append((time.monotonic() - start, rss_mb(pid)))
        metrics = http_get(srv.base + "/metrics")[1].decode()
    open_slides = re.search(r"^wsi_open_slides (\S+)$", metrics, re.M)
    curve = ", ".join(f"{t:.0f}s {mb[0]:.0f} ({mb[1]:.0f})" for t, mb in samples)
    return (
        f"Memory soak: 50 slides, 256 MB memory tier, wrk c=8 for {seconds:g} s over "
        f"{len(paths)} tiles: {load.per_s:.0f} tiles/s, p99 {load.p99_ms:.1f} ms, "
        f"{load.failed} failed; open slides {open_slides.group(1) if open_slides else '?'}; "
        f"worker RSS MB (anonymous): {curve}"
    )


if __name__ == "__main__":
    sys.exit(main())
