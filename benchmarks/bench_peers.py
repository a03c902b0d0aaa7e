"""wsi-server side by side with the servers a hospital would pick instead, in one run, on
one pyramidal TIFF, on loopback, loaded with ``wrk`` (cold and warm tiles at concurrency
16 and 32, on a stored level and on a level the file does not store):

- IIPImage ``iipsrv`` (Debian ``iipimage-server``) as a FastCGI program behind Debian's
  ``lighttpd`` (``mod_fastcgi``), configured by this script in a temp dir: 2 iipsrv
  processes (one per core; each is single-threaded), Deep Zoom at
  ``/fcgi-bin/iipsrv.fcgi?DeepZoom=FILE_files/L/C_R.jpg`` (its tiles: the TIFF's 256 px,
  overlap 0), JPEG quality 75, tile cache ``MAX_IMAGE_CACHE_SIZE`` 1024 MB per process
  (warm) or 0 (cold);
- openslide-python's ``examples/deepzoom/deepzoom_server.py`` (Flask's threaded server),
  run from the openslide-python sdist (``pip download --no-deps --no-binary :all:
  openslide-python``; never vendored) with ``-s 256 -e 0`` (the same grid as the others),
  JPEG quality 75; it has no tile cache (OpenSlide's decoded-tile cache only), so its cold
  and warm rows are the same server;
- wsi-server's native grid (``/slides/{id}/native_files/L/C_R.jpeg``, 256 px, overlap 0),
  ``--cache-size 0`` (cold) or the default memory cache (warm).

The file: a generic tiled pyramidal TIFF (JPEG q90 YCbCr 256-px tiles; levels at
downsample 1, 4 and 16, like Aperio) written with ``sample_slides.write_generic_tiff``
into ``benchmarks/out/peers-tiff/``. ``stored``: the full-resolution Deep Zoom level;
``not stored``: the level at downsample 2. Every server gets the same random subset of
each level's tiles (``--tiles``), in the same order; ``warm`` rows are measured after
fetching the list (three times for iipsrv, whose two processes each have their own cache).
Throughput and latency are wrk's; ratios are the peer over wsi-server (requests/s: < 1
means wsi-server is faster).

    python -m benchmarks.bench_peers [--duration 5] [--tiles 1000] [--connections 16,32]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_http import WrkResult, wrk
from benchmarks.common import (
    OUT,
    LiveServer,
    free_port,
    http_get,
    machine,
    markdown_table,
)

IIPSRV = "/usr/lib/iipimage-server/iipsrv.fcgi"
LIGHTTPD = "/usr/sbin/lighttpd"
WIDTH, HEIGHT = 24000, 18000
FULL_PYRAMID = (1, 2, 4, 8, 16, 32, 64)
APERIO_LIKE = (1, 4, 16)
QUALITY = 75


def peers_tiff(downsamples: Sequence[int], out: Path = OUT / "peers-tiff") -> Path:
    """A pyramidal TIFF the servers read (written once, reused)."""
    from sample_slides.generate import write_generic_tiff

    name = f"pyramid-{WIDTH}x{HEIGHT}-ds{'-'.join(map(str, downsamples))}.tif"
    path = out / name
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.partial"
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        write_generic_tiff(tmp, WIDTH, HEIGHT, 256, downsamples, ("jpeg", 90), "ycbcr", 0.25)
        tmp.rename(path)
    return path


@dataclass(frozen=True)
class Server:
    name: str
    base: str
    tile_urls: dict[str, str]
    """Per file name: a format string with level, col, row."""
    pid: int = 0
    """The server's (or its front's) process, the root of its process tree."""


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_get(url, timeout=5.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LIGHTTPD_CONF = """
server.modules = ("mod_fastcgi")
server.document-root = "{tmp}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{tmp}/lighttpd-error.log"
server.max-connections = 1024
server.max-keep-alive-requests = 100000
fastcgi.server = ("/fcgi-bin/iipsrv.fcgi" => ((
    "socket" => "{tmp}/iipsrv.sock",
    "bin-path" => "{iipsrv}",
    "max-procs" => {procs},
    "check-local" => "disable",
    "bin-environment" => (
        "FILESYSTEM_PREFIX" => "{root}/",
        "MAX_IMAGE_CACHE_SIZE" => "{cache_mb}",
        "JPEG_QUALITY" => "{quality}",
        "LOGFILE" => "{tmp}/iipsrv.log",
        "VERBOSITY" => "1"
    )
)))
"""


@contextmanager
def iipsrv(tiffs: Sequence[Path], cache_mb: int, procs: int = 2) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="bench-iipsrv-") as tmp:
        port = free_port()
        conf = Path(tmp, "lighttpd.conf")
        conf.write_text(LIGHTTPD_CONF.format(tmp=tmp, port=port, iipsrv=IIPSRV, procs=procs,
                                             root=tiffs[0].parent, cache_mb=cache_mb,
                                             quality=QUALITY))
        proc = subprocess.Popen([LIGHTTPD, "-D", "-f", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        prefix = "/fcgi-bin/iipsrv.fcgi?DeepZoom="
        try:
            wait_ready(f"{base}{prefix}{tiffs[0].name}.dzi")
            yield Server(f"iipsrv (cache {cache_mb} MB)", base,
                         {t.name: f"{prefix}{t.name}" + "_files/{0}/{1}_{2}.jpg"
                          for t in tiffs}, proc.pid)
        finally:
            stop(proc)


def deepzoom_example(tmp: Path) -> Path:
    """openslide-python's deepzoom example, from its sdist, unpacked under ``tmp``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "openslide-python", "-d", str(tmp)], check=True)
    (sdist,) = tmp.glob("openslide_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    (script,) = tmp.glob("openslide_python-*/examples/deepzoom/deepzoom_server.py")
    return script


@contextmanager
def deepzoom_server(script: Path, tiff: Path) -> Iterator[Server]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), "-l", "127.0.0.1", "-p", str(port), "-s", "256",
         "-e", "0", "-Q", str(QUALITY), str(tiff)],
        cwd=script.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/slide.dzi")
        yield Server("deepzoom_server", base, {tiff.name: "/slide_files/{0}/{1}_{2}.jpeg"},
                     proc.pid)
    finally:
        stop(proc)


@contextmanager
def wsi_server(tiffs: Sequence[Path], cold: bool) -> Iterator[Server]:
    flags = ["--cache-size", "0"] if cold else []
    with LiveServer(list(tiffs), *flags) as srv:
        listing = srv.json("/api/slides")
        assert isinstance(listing, dict)
        ids = {Path(str(s["path"])).name if "path" in s else str(s["name"]): s["id"]
               for s in listing["slides"]}
        urls = {}
        for t in tiffs:
            sid = ids.get(t.name) or ids.get(t.stem)
            urls[t.name] = f"/slides/{sid}/native_files/{{0}}/{{1}}_{{2}}.jpeg"
        yield Server(f"wsi-server ({'--cache-size 0' if cold else 'memory cache'})",
                     srv.base, urls, srv.pid)


@dataclass(frozen=True)
class Case:
    name: str
    file: str
    level: int
    tiles: list[tuple[int, int]]


def cases(full: Path, aperio: Path, n: int, seed: int) -> list[Case]:
    """Random subsets of interior tiles (full tiles only): full resolution and
    downsample 2 of the every-2× pyramid (both stored), and downsample 2 of the 1/4/16
    pyramid (not stored)."""
    top = math.ceil(math.log2(max(WIDTH, HEIGHT)))
    out = []
    for name, file, ds in (("ds1 stored", full, 1), ("ds2 stored", full, 2),
                           ("ds2 not stored", aperio, 2)):
        cols, rows = (WIDTH // ds) // 256, (HEIGHT // ds) // 256
        tiles = [(c, r) for r in range(rows) for c in range(cols)]
        random.Random(seed).shuffle(tiles)
        out.append(Case(name, file.name, top - (ds.bit_length() - 1), tiles[:n]))
    return out


def fetch_all(base: str, paths: Sequence[str]) -> int:
    """GET every path once; the number of non-200 answers."""
    def one(p: str) -> int:
        return http_get(base + p)[0]

    with ThreadPoolExecutor(4) as pool:
        return sum(1 for s in pool.map(one, paths) if s != 200)


def version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def dpkg_version(pkg: str) -> str:
    return version(["dpkg-query", "-W", "-f", "${Version}", pkg])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--tiles", type=int, default=1000, help="tiles per level list")
    ap.add_argument("--connections", default="16,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="wsi,iipsrv,deepzoom")
    args = ap.parse_args(argv)
    for tool in ("wrk", LIGHTTPD, IIPSRV):
        if shutil.which(tool) is None and not Path(tool).exists():
            print(f"{tool} is missing (Debian packages wrk, lighttpd, iipimage-server)",
                  file=sys.stderr)
            return 2
    conns = [int(c) for c in args.connections.split(",")]
    only = set(args.only.split(","))
    full, aperio = peers_tiff(FULL_PYRAMID), peers_tiff(APERIO_LIKE)
    plan = cases(full, aperio, args.tiles, args.seed)
    results: dict[tuple[str, str, str, int], tuple[str, WrkResult]] = {}
    load0 = os.getloadavg()

    def run(kind: str, server: Server, temperature: str, warm_passes: int) -> None:
        for case in plan:
            if case.file not in server.tile_urls:
                continue
            level_name = case.name
            paths = [server.tile_urls[case.file].format(case.level, c, r) for c, r in case.tiles]
            bad = 0
            for _ in range(warm_passes):
                bad += fetch_all(server.base, paths)
            for c in conns:
                res = wrk(server.base, paths, args.duration, c, 1)
                results[(kind, level_name, temperature, c)] = (server.name, res)
                print(f"{server.name} {level_name} {temperature} c{c}: {res.per_s:.0f}/s "
                      f"p50 {res.p50_ms:.1f} ms p99 {res.p99_ms:.1f} ms errors {res.errors}"
                      f"{f' (warm-up non-200: {bad})' if bad else ''}",
                      file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        if "wsi" in only:
            with wsi_server([full, aperio], cold=True) as s:
                run("wsi-server", s, "cold", 0)
            with wsi_server([full, aperio], cold=False) as s:
                run("wsi-server", s, "warm", 1)
        if "iipsrv" in only:
            # iipsrv maps a TIFF's pages to consecutive Deep Zoom levels (each half the
            # last): it serves the 1/4/16 pyramid at wrong scales, so only the full one.
            with iipsrv([full], 0) as s:
                run("iipsrv", s, "cold", 0)
            with iipsrv([full], 1024) as s:
                run("iipsrv", s, "warm", 3)
        if "deepzoom" in only:
            script = deepzoom_example(Path(tmp))
            for tiff in (full, aperio):
                with deepzoom_server(script, tiff) as s:
                    run("deepzoom_server", s, "cold", 0)
                    run("deepzoom_server", s, "warm", 1)

    load1 = os.getloadavg()
    print(f"# wsi-server and its peers, same pyramidal TIFF, wrk on loopback\n\n{machine()}; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; {full.name} "
          f"(every 2× level stored) and {aperio.name}; "
          f"{args.tiles} tiles per list; {args.duration:g} s per run\n")
    rows: list[list[object]] = []
    order = {c.name: i for i, c in enumerate(plan)}
    kinds = {"wsi-server": 0, "iipsrv": 1, "deepzoom_server": 2}
    for (_kind, level_name, temperature, c), (label, res) in sorted(
            results.items(),
            key=lambda kv: (order[kv[0][1]], kv[0][2], kv[0][3], kinds[kv[0][0]])):
        ref = results.get(("wsi-server", level_name, temperature, c))
        ratio: object = res.per_s / ref[1].per_s if ref else "–"
        rows.append([label, level_name, temperature, c, res.per_s, res.p50_ms, res.p99_ms,
                     res.mb_per_s, res.bytes / max(res.requests, 1) / 1e3, res.errors, ratio])
    print(markdown_table(["server", "level", "tiles", "conns", "req/s", "p50 ms", "p99 ms",
                          "MB/s", "kB/response", "errors", "req/s vs wsi-server"], rows))
    import openslide

    print("\nVersions: "
          f"iipimage-server {dpkg_version('iipimage-server')} behind lighttpd "
          f"{dpkg_version('lighttpd')} (mod_fastcgi, 2 iipsrv processes, JPEG_QUALITY "
          f"{QUALITY}, MAX_IMAGE_CACHE_SIZE 0 cold / 1024 MB warm); deepzoom_server from "
          f"openslide-python sdist (installed openslide-python {openslide.__version__}, "
          f"OpenSlide {openslide.__library_version__}; Flask threaded, -s 256 -e 0 -Q "
          f"{QUALITY}); wsi-server native grid (cold: --cache-size 0; warm: default memory "
          "cache); wrk 1 thread.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
