"""Soak: one live server under a long mixed load at concurrency 32, with ingest running and
a slide replaced in place half-way; the curve of throughput, latency and memory, window by
window, and verdicts (issue 12).

Library (a fresh folder under ``benchmarks/out/``, removed at the end): ``--slides``
symlinks to the benchmark slide (distinct paths, so distinct ids, readers and cache keys),
the three quick-start samples of ``sample_slides/`` (an SVS-like file, a JPEG generic TIFF
and a zlib TIFF with 128-px tiles and odd sizes) and ``replaced.svs``, a real 6000x4000
SVS-like file (generated once into ``benchmarks/out/soak-src/``, as are its replacement and
the scans below). The server: ``python -m wsi_server serve LIB --ingest WATCH
--ingest-settle-seconds 2 --state-dir STATE --workers N --cache-size MB`` (default rescan
every 30 s, isolated open checks on), through ``benchmarks.common.LiveServer``.

Load: ``wrk -t2 -c32`` on loopback through ``bench_http``'s runner and rotating-URL Lua
script, in consecutive ``--window``-second runs until ``--minutes`` have passed; each
window's list is built just before it, with these weights (percent of requests):

- native-grid tiles (``/slides/{id}/native_files/L/C_R.jpeg``): cold 22, cached 27;
- default-geometry tiles (``/slides/{id}_files/L/C_R.jpeg``, 254/1): cold 13, cached 20;
- DZI descriptors of either geometry 5, slide metadata (``/api/slides/{id}``) 6,
  thumbnails (``/api/slides/{id}/thumbnail``) cached 3.5 (default and 256 px) and cold 0.5
  (a random ``max_size``), the slide list (``/api/slides``) 3; over every slide, the
  ingested ones included once listed.

"Cold" tiles come from a random permutation of every tile address of every level of every
slide, per geometry, consumed in order and never sent twice: after each window the cursor
moves past the entries wrk can have reached (1.25x the requests made, since the two wrk
threads take alternate entries; the rest are skipped, never reused). With 40 slides that
is ~700,000 addresses, more than 10 minutes can serve, so cold renders and passthrough
reads go on to the end (the ``tiles`` column, from the server's ``/metrics``, shows it).
"Cached" tiles are a fixed set of 400 per geometry on four slides, hit over and over.

Meanwhile, in background threads:

- ingest: every ``--ingest-every`` seconds a new small SVS-like scan (distinct content) is
  written into the watch folder in 8 chunks, as a scanner does; the slide list is polled
  until it lists the scan (latency from the last byte), and after the load, at most 60 s
  more for the last ones;
- replacement: at the half-way point (moved to a third of the way into the window that
  holds it, so that wrk is running), ``replaced.svs`` is replaced in place by a file of the
  same dimensions and different content, written under a dot-name beside it and renamed
  over it (``os.replace``: readers see the old file or the new one, never half of one).
  A probe GETs a cached tile of it (the one whose pixels differ most between the two
  files) every 50 ms for 10 s, and its metadata, counting any status but 200 as an error;
  the new content must be served (the ETag changes, and the tile's pixels match the new
  file as OpenSlide reads it, not the old one), and the DZI and thumbnail still answer;
- memory: every ``--rss-every`` seconds the RSS (and its anonymous part) of the server
  process and all its descendants (uvicorn workers, the warm validator processes of
  ingest and of the isolated open check), from ``/proc``.

Per window: requests/s, p50 and p99 (wrk), errors (wrk's non-2xx responses, which wrk
counts as status >= 400, and its socket errors: connect, read, write, timeout after 10 s;
no request is conditional and no URL redirects, so every other response is a 200), how
the tiles were served, the largest RSS sampled, open slides, slides ingested so far, the
1-min load average.

Verdicts (rules printed with the results; the exit status is 1 if one fails):

- zero errors: no wrk error in any window, no server error response (``wsi_errors_total``
  in ``/metrics``), no probe error;
- RSS flat after warm-up: warm-up is the first quarter of the run; the largest tree RSS in
  the second half is at most 1.10x the largest in the last window of the warm-up;
- p99 stable: every window after the warm-up has p99 at most 2x the median p99 of those
  windows;
- ingest kept up: every dropped scan listed, ready, and no ingest failure;
- replacement served, as above; and the server still running at the end.

    python -m benchmarks.bench_soak [--minutes 10] [--window 30] [--concurrency 32]
        [--workers 1] [--slides 40] [--cache-size 256] [--ingest-every 20]
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from openslide import OpenSlide
from PIL import Image

from benchmarks.bench_http import WrkResult, tile_sources, wrk
from benchmarks.bench_load import rss_mb
from benchmarks.common import (
    OUT,
    ROOT,
    LiveServer,
    bench_slide,
    http_get,
    machine,
    markdown_table,
    percentile,
)
from sample_slides import write_svs_like

SRC = OUT / "soak-src"
SAMPLES = ("synthetic-aperio.svs", "synthetic-generic.tiff", "synthetic-odd-size.tiff")
REPLACED = "replaced.svs"
SETTLE = 2.0
THREADS = 2
PROBE_SECONDS = 10.0
HOT_PER_KIND = 400

# (key, what, percent of requests)
MIX: tuple[tuple[str, str, float], ...] = (
    ("native-cold", "native-grid tile, cold", 22.0),
    ("native-hot", "native-grid tile, cached", 27.0),
    ("default-cold", "default-geometry tile, cold", 13.0),
    ("default-hot", "default-geometry tile, cached", 20.0),
    ("dzi", "DZI descriptor (either geometry)", 5.0),
    ("meta", "slide metadata", 6.0),
    ("thumb-hot", "thumbnail, cached", 3.5),
    ("thumb-cold", "thumbnail, cold (random max_size)", 0.5),
    ("list", "slide list", 3.0),
)
KINDS = ("native", "default")


# -- sources -------------------------------------------------------------------------
def sources(scans: int) -> tuple[Path, Path, list[Path]]:
    """The replaced slide, its replacement (same size, other content) and the scans to
    drop, generated once into ``benchmarks/out/soak-src/``."""
    SRC.mkdir(parents=True, exist_ok=True)

    def once(path: Path, make: Callable[[Path], object]) -> Path:
        if not path.exists():
            tmp = path.with_name(f".{path.name}.partial")
            make(tmp)
            tmp.rename(path)
        return path

    def slide(seed: int) -> Callable[[Path], object]:
        return lambda p: write_svs_like(p, 6000, 4000, seed=seed, grain=14.0)

    def scan(i: int) -> Callable[[Path], object]:
        return lambda p: write_svs_like(p, 1600 + i, 1200, downsamples=(1, 4), seed=1000 + i,
                                        associated=False)

    if not (SRC / "replace-a.svs").exists():
        print("generating soak sources ...", file=sys.stderr, flush=True)
    old = once(SRC / "replace-a.svs", slide(11))
    new = once(SRC / "replace-b.svs", slide(12))
    drops = [once(SRC / f"scan-{i:03d}.svs", scan(i)) for i in range(scans)]
    return old, new, drops


def region(path: Path, col: int, row: int, size: int = 256) -> np.ndarray:
    """Full-resolution pixels of native tile (col, row), as OpenSlide reads them."""
    with OpenSlide(str(path)) as s:
        img = s.read_region((col * size, row * size), 0, (size, size)).convert("RGB")
    return np.asarray(img, np.float32)


def mean_diff(jpeg: bytes, ref: np.ndarray) -> float:
    px = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)
    return float(np.abs(px - ref).mean()) if px.shape == ref.shape else float("inf")


# -- addresses -------------------------------------------------------------------------
@dataclass
class Grid:
    """Every tile address of some slides in one geometry, numbered 0..total-1."""

    kind: str
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (sid, level, cols)
    offsets: list[int] = field(default_factory=list)
    total: int = 0

    def add(self, sid: str, xml: str) -> None:
        w, h, size = (int(re.search(rf'{k}="(\d+)"', xml).group(1))  # type: ignore[union-attr]
                      for k in ("Width", "Height", "TileSize"))
        dims = [(w, h)]
        while dims[-1] != (1, 1):
            dims.append(((dims[-1][0] + 1) // 2, (dims[-1][1] + 1) // 2))
        for level, (lw, lh) in enumerate(reversed(dims)):
            cols, rows = -(-lw // size), -(-lh // size)
            self.segments.append((sid, level, cols))
            self.offsets.append(self.total)
            self.total += cols * rows

    def url(self, i: int) -> str:
        k = bisect.bisect_right(self.offsets, i) - 1
        sid, level, cols = self.segments[k]
        row, col = divmod(i - self.offsets[k], cols)
        return tile_url(sid, self.kind, level, col, row)


def tile_url(sid: str, kind: str, level: int, col: int, row: int) -> str:
    if kind == "native":
        return f"/slides/{sid}/native_files/{level}/{col}_{row}.jpeg"
    return f"/slides/{sid}_files/{level}/{col}_{row}.jpeg"


class ColdStream:
    """A random permutation of a grid's addresses, less the cached set, read in order."""

    def __init__(self, grid: Grid, exclude: set[int], seed: int) -> None:
        self.grid = grid
        order = np.random.default_rng(seed).permutation(grid.total)
        if exclude:
            order = order[~np.isin(order, np.fromiter(exclude, np.int64))]
        self.order = order
        self.cursor = 0
        self.wrapped = False

    def peek(self, n: int) -> list[str]:
        idx = [int(self.order[(self.cursor + j) % len(self.order)]) for j in range(n)]
        return [self.grid.url(i) for i in idx]

    def advance(self, n: int) -> None:
        self.cursor += n
        if self.cursor >= len(self.order):
            self.cursor %= len(self.order)
            self.wrapped = True


@dataclass
class WindowList:
    paths: list[str]
    cold_positions: dict[str, list[int]]  # kind -> positions of its cold entries


def build_list(rng: random.Random, n: int, hot: dict[str, list[str]],
               cold: dict[str, ColdStream], slide_ids: Sequence[str]) -> WindowList:
    """``n`` requests drawn from ``MIX``."""
    cats = rng.choices([m[0] for m in MIX], [m[2] for m in MIX], k=n)
    counts = Counter(cats)
    fresh = {k: iter(cold[k].peek(counts[f"{k}-cold"])) for k in KINDS}
    positions: dict[str, list[int]] = {k: [] for k in KINDS}
    paths: list[str] = []
    for pos, cat in enumerate(cats):
        if cat in ("native-cold", "default-cold"):
            kind = cat.split("-")[0]
            paths.append(next(fresh[kind]))
            positions[kind].append(pos)
        elif cat in ("native-hot", "default-hot"):
            paths.append(rng.choice(hot[cat.split("-")[0]]))
        elif cat == "dzi":
            sid = rng.choice(slide_ids)
            paths.append(rng.choice((f"/slides/{sid}.dzi", f"/slides/{sid}/native.dzi")))
        elif cat == "meta":
            paths.append(f"/api/slides/{rng.choice(slide_ids)}")
        elif cat == "thumb-hot":
            paths.append(f"/api/slides/{rng.choice(slide_ids)}/thumbnail"
                         + rng.choice(("", "?max_size=256")))
        elif cat == "thumb-cold":
            paths.append(f"/api/slides/{rng.choice(slide_ids)}/thumbnail"
                         f"?max_size={rng.randrange(100, 1100)}")
        else:
            paths.append("/api/slides")
    return WindowList(paths, positions)


# -- the server's processes and metrics --------------------------------------------------
def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def is_validator(pid: int) -> bool:
    try:
        return b"wsi_server.ingest.validate" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_ERRORS = re.compile(r'^wsi_errors_total\{code="([^"]+)"\} ([0-9.e+]+)$', re.M)
_OPEN = re.compile(r"^wsi_open_slides (\S+)$", re.M)


def server_errors(srv: LiveServer) -> tuple[Counter[str], float]:
    """Error responses so far by code, and slides open in the reader pool."""
    status, body = http_get(srv.url("/metrics"))
    if status != 200:
        return Counter(), float("nan")
    text = body.decode()
    m = _OPEN.search(text)
    return (Counter({c: int(float(n)) for c, n in _ERRORS.findall(text)}),
            float(m.group(1)) if m else float("nan"))


def get(srv: LiveServer, path: str) -> tuple[int, str, bytes]:
    """Status, ETag and body of a GET (errors returned, not raised)."""
    try:
        with urllib.request.urlopen(srv.url(path), timeout=30) as resp:
            return int(resp.status), resp.headers.get("ETag", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", exc.read()
    except OSError as exc:
        return 0, "", repr(exc).encode()


# -- the run ------------------------------------------------------------------------------
@dataclass
class Sample:
    t: float
    tree_mb: float
    anon_mb: float
    serving_mb: float
    processes: int


@dataclass
class Drop:
    name: str
    last_byte: float
    listed: float | None = None
    status: str = ""
    sid: str = ""


@dataclass
class Window:
    start: float
    end: float
    res: WrkResult
    served: Counter[str]
    error_codes: Counter[str]
    open_slides: float
    load: float
    urls: int


@dataclass
class Replacement:
    done: bool = False
    swapped_at: float = float("nan")
    new_after: float | None = None  # seconds from the rename to the first new tile
    before_status: int = 0
    after_status: int = 0
    etag_changed: bool = False
    version_changed: bool = False
    before_vs_old: float = float("nan")  # mean |pixel difference| of the probe tile
    after_vs_new: float = float("nan")
    after_vs_old: float = float("nan")
    old_vs_new: float = float("nan")
    dzi: list[int] = field(default_factory=list)
    thumb_status: int = 0
    thumb_changed: bool = False

    def ok(self) -> bool:
        return (self.done and self.before_status == 200 and self.after_status == 200
                and self.etag_changed and self.version_changed and self.after_vs_new < 2.0
                and self.after_vs_old > 5.0 and self.dzi == [200, 200]
                and self.thumb_status == 200 and self.thumb_changed)


class Soak:
    def __init__(self, srv: LiveServer, args: argparse.Namespace, lib: Path, watch: Path,
                 scans: list[Path], replacement: Path, old: Path, probe: tuple[int, int],
                 replaced_sid: str, native_levels: int) -> None:
        self.srv, self.args, self.lib, self.watch = srv, args, lib, watch
        self.scans, self.replacement, self.old = scans, replacement, old
        self.probe_tile = probe
        self.replaced_sid = replaced_sid
        self.native_full = native_levels - 1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.drops: list[Drop] = []
        self.ingested_ids: list[str] = []
        self.swap_at = float("nan")
        self.replacement_report = Replacement()
        self.probe_errors: list[str] = []
        self.probe_requests = 0
        self.thread_errors: list[str] = []
        self.stop_time = float("inf")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wait_until(self, t: float) -> bool:
        """Sleep until run time ``t``; False if told to stop first."""
        return not self.stop.wait(max(0.0, t - self.now()))

    def start(self, swap_at: float) -> list[threading.Thread]:
        self.swap_at = swap_at
        threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                   for f in (self.sample_rss, self.drop_scans, self.watch_listing,
                             self.replace)]
        for t in threads:
            t.start()
        return threads

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # reported as a failed check, never a silent thread death
            with self.lock:
                self.thread_errors.append(f"{getattr(fn, '__name__', fn)}: {exc!r}")

    # memory
    def sample_rss(self) -> None:
        while not self.stop.is_set():
            pids = process_tree(self.srv.pid)
            tree = anon = serving = 0.0
            for pid in pids:
                try:
                    rss, an = rss_mb(pid)
                except OSError:
                    continue
                tree += rss
                anon += an
                if not is_validator(pid) and (pid != self.srv.pid or self.args.workers == 1):
                    serving += rss
            with self.lock:
                self.samples.append(Sample(self.now(), tree, anon, serving, len(pids)))
            self.stop.wait(self.args.rss_every)

    # ingest
    def drop_scans(self) -> None:
        for i, src in enumerate(self.scans):
            if not self.wait_until(10.0 + i * self.args.ingest_every):
                return
            data = src.read_bytes()
            step = len(data) // 8 + 1
            with open(self.watch / src.name, "wb") as fh:
                for j in range(0, len(data), step):
                    if j:
                        time.sleep(0.02)
                    fh.write(data[j:j + step])
                    fh.flush()
            with self.lock:
                self.drops.append(Drop(src.name, self.now()))

    def watch_listing(self) -> None:
        while True:
            with self.lock:
                waiting = [d for d in self.drops if d.listed is None]
            if waiting:
                status, body = http_get(self.srv.url("/api/slides"))
                if status == 200:
                    listed = {s["name"]: s for s in json.loads(body)["slides"]}
                    t = self.now()
                    with self.lock:
                        for d in waiting:
                            if d.name in listed:
                                d.listed, d.status = t, listed[d.name]["status"]
                                d.sid = listed[d.name]["id"]
                                if d.status == "ready":
                                    self.ingested_ids.append(d.sid)
            elif self.stop.is_set():
                return
            time.sleep(0.25)
            if self.stop.is_set() and self.now() > self.stop_time + 60:
                return

    # replacement
    def replace(self) -> None:
        col, row = self.probe_tile
        tile = tile_url(self.replaced_sid, "native", self.native_full, col, row)
        meta = f"/api/slides/{self.replaced_sid}"
        thumb = f"/api/slides/{self.replaced_sid}/thumbnail"
        if not self.wait_until(self.swap_at - 3):
            return
        old_pixels = region(self.old, col, row)
        new_pixels = region(self.replacement, col, row)
        rep = self.replacement_report
        rep.before_status, etag_old, before = get(self.srv, tile)
        thumb_etag_old = get(self.srv, thumb)[1]
        version_old = get(self.srv, meta)[2]
        rep.before_vs_old = mean_diff(before, old_pixels)
        rep.old_vs_new = float(np.abs(old_pixels - new_pixels).mean())
        if not self.wait_until(self.swap_at):
            return
        partial = self.lib / f".{REPLACED}.partial"  # a dot-name: the library skips it
        shutil.copyfile(self.replacement, partial)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, self.lib / REPLACED)
        swapped = rep.swapped_at = self.now()
        after = b""
        n = 0
        while self.now() < swapped + PROBE_SECONDS:
            for path in (tile, meta) if n % 5 == 0 else (tile,):
                status, etag, body = get(self.srv, path)
                self.probe_requests += 1
                if status != 200:
                    self.probe_errors.append(f"t={self.now():.2f}s {path}: {status} "
                                             f"{body[:160]!r}")
                elif path == tile and etag != etag_old and rep.new_after is None:
                    rep.new_after = self.now() - swapped
                    after = body
            n += 1
            time.sleep(0.05)
        rep.version_changed = get(self.srv, meta)[2] != version_old
        rep.after_status, etag, body = get(self.srv, tile)
        rep.etag_changed = bool(after) and etag != etag_old
        rep.after_vs_new = mean_diff(after or body, new_pixels)
        rep.after_vs_old = mean_diff(after or body, old_pixels)
        rep.dzi = [get(self.srv, p)[0] for p in (f"/slides/{self.replaced_sid}.dzi",
                                                 f"/slides/{self.replaced_sid}/native.dzi")]
        rep.thumb_status, etag, _ = get(self.srv, thumb)
        rep.thumb_changed = etag != thumb_etag_old
        rep.done = True


def run(args: argparse.Namespace) -> int:
    load0 = os.getloadavg()
    duration = args.minutes * 60.0
    n_scans = max(0, int((duration - 20) // args.ingest_every) + 1)
    big = bench_slide()
    old, new, scans = sources(n_scans)
    tmp = Path(tempfile.mkdtemp(prefix="soak-", dir=OUT))
    try:
        lib, watch, state = tmp / "lib", tmp / "watch", tmp / "state"
        for d in (lib, watch, state):
            d.mkdir()
        for i in range(args.slides):
            os.symlink(big, lib / f"bench-{i:02d}.svs")
        for name in SAMPLES:
            os.symlink(ROOT / "sample_slides" / name, lib / name)
        shutil.copyfile(old, lib / REPLACED)
        flags = ["--ingest", str(watch), "--ingest-settle-seconds", f"{SETTLE:g}",
                 "--state-dir", str(state), "--workers", str(args.workers),
                 "--cache-size", str(args.cache_size)]
        shown = [{str(watch): "WATCH", str(state): "STATE"}.get(f, f) for f in flags]
        with LiveServer([lib], *flags, log=OUT / "server-soak.log") as srv:
            return soak(srv, args, lib, watch, scans, old, new, shown, load0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def soak(srv: LiveServer, args: argparse.Namespace, lib: Path, watch: Path,
         scans: list[Path], old: Path, new: Path, flags: list[str],
         load0: tuple[float, float, float]) -> int:
    duration = args.minutes * 60.0
    body = srv.json("/api/slides")
    assert isinstance(body, dict)
    slides = {s["name"]: s for s in body["slides"]}
    not_ready = [n for n, s in slides.items() if s["status"] != "ready"]
    if not_ready:
        raise RuntimeError(f"slides not ready at start: {not_ready}")
    ids = [s["id"] for s in slides.values()]
    replaced_sid = slides[REPLACED]["id"]

    grids = {k: Grid(k) for k in KINDS}
    for sid in ids:
        grids["native"].add(sid, get(srv, f"/slides/{sid}/native.dzi")[2].decode())
        grids["default"].add(sid, get(srv, f"/slides/{sid}.dzi")[2].decode())

    # the probe tile: the interior full-resolution tile whose pixels differ most
    native_levels = sum(1 for s in grids["native"].segments if s[0] == replaced_sid)
    candidates = [(c, r) for c in range(2, 21, 3) for r in range(2, 14, 3)]
    probe = max(candidates, key=lambda cr: float(np.abs(region(old, *cr)
                                                        - region(new, *cr)).mean()))

    # the cached set: addresses on four slides, finest three levels, both geometries
    rng = random.Random(args.seed)
    hot_sids = [replaced_sid, slides[SAMPLES[0]]["id"], ids[0], ids[1]]
    hot: dict[str, list[str]] = {}
    hot_idx: dict[str, set[int]] = {}
    for kind, grid in grids.items():
        pool = [i for k, (sid, level, _cols) in enumerate(grid.segments)
                if sid in hot_sids and level >= native_levels - 3
                for i in range(grid.offsets[k],
                               grid.offsets[k + 1] if k + 1 < len(grid.offsets) else grid.total)]
        hot_idx[kind] = set(rng.sample(pool, HOT_PER_KIND))
        hot[kind] = [grid.url(i) for i in sorted(hot_idx[kind])]
    probe_url = tile_url(replaced_sid, "native", native_levels - 1, *probe)
    if probe_url not in hot["native"]:
        hot["native"].append(probe_url)
    cold = {k: ColdStream(grids[k], hot_idx[k], args.seed + j) for j, k in enumerate(KINDS)}

    n_windows = max(1, round(duration / args.window))
    swap_window = n_windows // 2
    swap_at = swap_window * args.window + args.window / 3
    print(f"{len(ids)} slides; cold addresses: native {len(cold['native'].order):,}, default "
          f"{len(cold['default'].order):,}; {n_windows} windows of {args.window:g} s; "
          f"replacement at ~{swap_at:.0f} s", file=sys.stderr, flush=True)

    run_ = Soak(srv, args, lib, watch, scans, new, old, probe, replaced_sid, native_levels)
    threads = run_.start(swap_at)
    windows: list[Window] = []
    rate = 3000.0
    errors_before, _ = server_errors(srv)
    for k in range(n_windows):
        # the windows keep to the schedule: window k starts at k * window seconds
        length = max(5.0, (k + 1) * args.window - run_.now())
        with run_.lock:
            slide_ids = ids + run_.ingested_ids
        n = int(min(400_000, max(20_000, 2 * rate * length)))
        wl = build_list(random.Random(args.seed * 1000 + k), n, hot, cold, slide_ids)
        served0 = tile_sources(srv)
        start = run_.now()
        res = wrk(srv.base, wl.paths, round(length), args.concurrency, THREADS)
        end = run_.now()
        up = alive(srv.pid)
        served = tile_sources(srv) - served0 if up else Counter()
        errs, open_slides = server_errors(srv) if up else (errors_before, float("nan"))
        rate = max(rate / 4, res.per_s)
        reached = min(n, int(res.requests * 1.25) + 64)
        for kind in KINDS:
            cold[kind].advance(bisect.bisect_left(wl.cold_positions[kind], reached))
        windows.append(Window(start, end, res, served, errs - errors_before, open_slides,
                              os.getloadavg()[0], n))
        errors_before = errs
        print(f"window {k + 1}/{n_windows}: {res.per_s:,.0f} req/s, p50 {res.p50_ms:.1f} ms, "
              f"p99 {res.p99_ms:.1f} ms, {res.errors} errors, "
              f"{res.requests:,} requests (list {n:,})", file=sys.stderr, flush=True)
        if not up:
            print("the server process is gone", file=sys.stderr)
            break
    run_.stop_time = run_.now()
    run_.stop.set()
    for t in threads:
        t.join(90)
    server_alive = alive(srv.pid)
    ingest_report = srv.json("/api/ingest") if server_alive else {}
    return report(args, run_, windows, cold, ingest_report, server_alive, flags, len(ids),
                  load0)


# -- the report ---------------------------------------------------------------------------
def report(args: argparse.Namespace, run_: Soak, windows: list[Window],
           cold: dict[str, ColdStream], ingest_report: object, server_alive: bool,
           flags: list[str], n_slides: int, load0: tuple[float, float, float]) -> int:
    duration = args.minutes * 60.0
    warm_end = duration / 4
    rows: list[list[object]] = []
    cum_ingested = 0
    for k, w in enumerate(windows):
        nxt = windows[k + 1].start if k + 1 < len(windows) else float("inf")
        samples = [s for s in run_.samples if w.start <= s.t < nxt] or \
            [min(run_.samples, key=lambda s: abs(s.t - w.end))]
        total = max(1, w.served.total())
        by = " / ".join(f"{100 * w.served.get(s, 0) / total:.0f}"
                        for s in ("memory", "passthrough", "rendered"))
        cum_ingested = sum(1 for d in run_.drops if d.listed is not None and d.listed < w.end)
        dropped = sum(1 for d in run_.drops if d.last_byte < w.end)
        notes = []
        if w.start <= run_.swap_at < nxt:
            notes.append(f"slide replaced at {run_.swap_at:.0f} s")
        if w.error_codes:
            notes.append("server errors: " + ", ".join(f"{c} {n}"
                                                       for c, n in w.error_codes.items()))
        if w.res.requests > w.urls:
            notes.append("list wrapped")
        rows.append([
            k + 1, f"{w.start:.0f}-{w.end:.0f}", f"{w.res.requests:,}", w.res.per_s, w.res.p50_ms,
            w.res.p99_ms, w.res.errors, by, max(s.tree_mb for s in samples),
            max(s.anon_mb for s in samples), max(s.serving_mb for s in samples),
            f"{w.open_slides:.0f}", f"{cum_ingested}/{dropped}", w.load, "; ".join(notes),
        ])

    # verdicts
    verdicts: list[tuple[bool, str]] = []
    wrk_errors = sum(w.res.errors for w in windows)
    codes: Counter[str] = Counter()
    for w in windows:
        codes += w.error_codes
    requests = sum(w.res.requests for w in windows)
    ok = wrk_errors == 0 and not codes and not run_.probe_errors
    verdicts.append((ok, (
        f"zero errors: {wrk_errors} wrk errors (non-2xx + socket) in {requests:,} requests; "
        f"server error responses {sum(codes.values())}"
        + (f" ({', '.join(f'{c} {n}' for c, n in codes.items())})" if codes else "")
        + f"; replacement probe {len(run_.probe_errors)} of {run_.probe_requests}")))

    ref_w = [w for w in windows if w.end <= warm_end + 1] or windows[:1]
    ref = max((s.tree_mb for s in run_.samples if ref_w[-1].start <= s.t <= ref_w[-1].end),
              default=float("nan"))
    late = [s for s in run_.samples if s.t >= duration / 2]
    late_max = max((s.tree_mb for s in late), default=float("nan"))
    post = [s for s in run_.samples if s.t >= warm_end]
    slope = float(np.polyfit([s.t / 60 for s in post], [s.tree_mb for s in post], 1)[0]) \
        if len(post) >= 3 else float("nan")
    anon_slope = float(np.polyfit([s.t / 60 for s in post], [s.anon_mb for s in post], 1)[0]) \
        if len(post) >= 3 else float("nan")
    ratio = late_max / ref
    verdicts.append((ratio <= 1.10, (
        f"RSS flat after warm-up (rule: largest tree RSS in the second half <= 1.10x the "
        f"largest in the last warm-up window, warm-up = first quarter): {late_max:.0f} MB vs "
        f"{ref:.0f} MB (window {len(ref_w)}) = {ratio:.2f}x; trend after warm-up "
        f"{slope:+.1f} MB/min (anonymous {anon_slope:+.1f} MB/min)")))

    steady = [w for w in windows if w.start >= warm_end - 1]
    p99s = [w.res.p99_ms for w in steady]
    med = statistics.median(p99s) if p99s else float("nan")
    worst = max(steady, key=lambda w: w.res.p99_ms) if steady else None
    over = [windows.index(w) + 1 for w in steady if w.res.p99_ms > 2 * med]
    verdicts.append((bool(steady) and not over, (
        f"p99 stable (rule: every window after warm-up has p99 <= 2x the median p99 of those "
        f"windows): median {med:.1f} ms, largest {worst.res.p99_ms if worst else 0:.1f} ms "
        f"(window {windows.index(worst) + 1 if worst else '-'})"
        + (f"; over 2x in window(s) {', '.join(map(str, over))}" if over else ""))))

    lat = [d.listed - d.last_byte for d in run_.drops if d.listed is not None]
    unlisted = [d.name for d in run_.drops if d.listed is None]
    bad = [f"{d.name} ({d.status})" for d in run_.drops if d.listed and d.status != "ready"]
    failures = ingest_report.get("failures", []) if isinstance(ingest_report, dict) else ["?"]
    ok = bool(run_.drops) and not unlisted and not bad and not failures
    verdicts.append((ok, (
        f"ingest kept up: {len(run_.drops)} scans dropped (one every "
        f"{args.ingest_every:g} s, settle {SETTLE:g} s), {len(lat)} listed"
        + (f", last byte to listed p50 {percentile(lat, 50):.2f} s, max {max(lat):.2f} s"
           if lat else "")
        + (f"; NOT listed: {', '.join(unlisted)}" if unlisted else "")
        + (f"; not ready: {', '.join(bad)}" if bad else "")
        + f"; ingest failures {len(failures)}")))

    rep = run_.replacement_report
    if rep.done:
        new_at = f"{rep.new_after:.2f} s" if rep.new_after is not None else "NEVER"
        text = (
            f"replacement served: {REPLACED} renamed over at {rep.swapped_at:.1f} s; new "
            f"content served {new_at} after; tile ETag changed {rep.etag_changed}, slide "
            f"version changed {rep.version_changed}; probe tile pixels vs the new file "
            f"{rep.after_vs_new:.2f}, vs the old {rep.after_vs_old:.1f} (mean |diff|; before "
            f"the swap vs the old file {rep.before_vs_old:.2f}; old vs new file "
            f"{rep.old_vs_new:.1f}); DZI {rep.dzi}, thumbnail {rep.thumb_status} (ETag "
            f"changed {rep.thumb_changed}); probe: {run_.probe_requests} GETs in "
            f"{PROBE_SECONDS:g} s after the rename, {len(run_.probe_errors)} not 200")
        ok = rep.ok() and not run_.probe_errors
    else:
        ok, text = False, "replacement served: the replacement did not run"
    verdicts.append((ok, text))

    log = OUT / "server-soak.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    tracebacks = sum("Traceback" in ln for ln in lines)
    notable = [ln for ln in lines if ln.startswith(("ERROR", "CRITICAL", "WARNING"))]
    ok = server_alive and tracebacks == 0 and not run_.thread_errors and \
        not any(ln.startswith(("ERROR", "CRITICAL")) for ln in notable)
    verdicts.append((ok, (
        f"server: {'running' if server_alive else 'GONE'} at the end; log "
        f"({log.relative_to(ROOT)}): {tracebacks} tracebacks, {len(notable)} warning/error "
        f"lines" + (f"; benchmark threads failed: {run_.thread_errors}"
                    if run_.thread_errors else ""))))

    load1 = os.getloadavg()
    print(f"\n## Soak: {args.minutes:g} min mixed load at concurrency {args.concurrency}\n")
    print(f"{machine()}; server and wrk share it. Load average before: {load0[0]:.2f} "
          f"{load0[1]:.2f} {load0[2]:.2f}; after: {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f}.\n")
    print(f"Server: python -m wsi_server serve LIB {' '.join(flags)}; "
          f"{n_slides} slides at the start ({args.slides} symlinks to "
          f"{bench_slide().name}, 3 samples, {REPLACED}). Load: wrk -t{THREADS} "
          f"-c{args.concurrency}, {len(windows)} windows of {args.window:g} s; mix: "
          + ", ".join(f"{what} {pct:g}%" for _, what, pct in MIX) + ". Cold addresses "
          f"used: native {cold['native'].cursor:,} of {len(cold['native'].order):,}, default "
          f"{cold['default'].cursor:,} of {len(cold['default'].order):,}"
          + (" (WRAPPED: some cold tiles were sent twice)"
             if any(c.wrapped for c in cold.values()) else "") + ".\n")
    print(markdown_table(
        ["window", "s", "requests", "req/s", "p50 ms", "p99 ms", "errors",
         "tiles % memory / passthrough / rendered", "RSS MB (tree, max)", "anon MB",
         "serving MB", "open slides", "ingested / dropped", "load 1m", "events"], rows))
    print()
    for ok, text in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'} {text}")
    for line in run_.probe_errors[:10]:
        print(f"  - probe: {line}")
    for line in list(dict.fromkeys(notable))[:8]:
        print(f"  - server log: {line[:300]}")
    return 0 if all(ok for ok, _ in verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per wrk run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="passed to serve")
    ap.add_argument("--slides", type=int, default=40,
                    help="symlinks to the benchmark slide in the library")
    ap.add_argument("--cache-size", type=int, default=256, help="MB, passed to serve")
    ap.add_argument("--ingest-every", type=float, default=20.0, help="seconds between scans")
    ap.add_argument("--rss-every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
