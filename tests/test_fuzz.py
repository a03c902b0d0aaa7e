"""Damaged slides against a real server process: zero 5xx, zero deaths, good slides served
throughout, every failure a JSON 4xx that names the slide unreadable.

The corpus (``sample_slides/fuzz.py``) is written once per session: real slides (SVS,
NDPI, a DICOM folder) and synthetic ones (SVS-like, generic TIFF, a zarr store converted
from the SVS) each damaged many times (bit flips, overwritten headers, random chunks,
truncations, swapped IFD offsets, huge declared dimensions, tile offsets past the end).
One ``python -m wsi_server serve`` process serves the corpus beside the undamaged seeds;
one keep-alive client asks, for every damaged slide, its metadata, both descriptors, tiles
at several levels of both geometries, a thumbnail and each associated image (a seeded
sample of tiles, to keep the run short), and re-checks the good slides' tiles between
batches. The server runs with ``--no-isolate-open``, the harder case: every damaged file
is opened in the server's own process.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sample_slides.fuzz import FuzzCase, Seed, synthetic_seeds, write_corpus
from tests.conftest import ROOT, real_slide

CORPUS_SEED = 0
PER_SEED = {
    "real-svs": 80, "real-ndpi": 60, "real-dicom": 90,
    "synth-svs": 90, "synth-tiff": 100, "synth-zarr": 100,
}
BATCH = 60
FAILURE_CODES = {"unreadable_slide", "unsupported_format"}
_DZI = re.compile(r'TileSize="(\d+)" Overlap="(\d+)".*?Width="(\d+)" Height="(\d+)"', re.S)


@dataclass
class Corpus:
    good: Path
    damaged: Path
    cases: list[FuzzCase]


@pytest.fixture(scope="session")
def fuzz_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("fuzz")
    seeds = synthetic_seeds(root / "seeds")
    seeds |= {
        "real-svs": Seed("svs", real_slide("svs")),
        "real-ndpi": Seed("ndpi", real_slide("ndpi")),
        "real-dicom": Seed("dicom", real_slide("dicom")),
    }
    good = root / "good"
    good.mkdir()
    for name, s in seeds.items():  # the undamaged seeds, served beside the corpus
        dest = good / f"{name}{s.path.suffix}"
        if s.path.is_dir():
            shutil.copytree(s.path, dest)
        else:
            shutil.copy(s.path, dest)
    cases = write_corpus(root / "corpus", seeds, PER_SEED, seed=CORPUS_SEED)
    return Corpus(good, root / "corpus", cases)


def test_corpus_is_deterministic_and_covers_every_family(
    fuzz_corpus: Corpus, tmp_path: Path
) -> None:
    cases = fuzz_corpus.cases
    assert len(cases) >= 500
    assert {c.family for c in cases} == {"svs", "ndpi", "tiff", "dicom", "zarr"}
    kinds = Counter(c.mutation for c in cases)
    for kind in ("bitflip", "header", "chunk", "truncate", "swap_ifd", "huge_dims",
                 "tile_offsets"):
        assert kinds[kind] >= 10, kinds
    # the same arguments give the same bytes
    seeds = {"synth-tiff": Seed("tiff", fuzz_corpus.good / "synth-tiff.tiff")}
    a = write_corpus(tmp_path / "a", seeds, 14, seed=CORPUS_SEED)
    b = write_corpus(tmp_path / "b", seeds, 14, seed=CORPUS_SEED)
    assert [x.path.read_bytes() for x in a] == [y.path.read_bytes() for y in b]
    c = write_corpus(tmp_path / "c", seeds, 14, seed=CORPUS_SEED + 1)
    assert [x.path.read_bytes() for x in a] != [y.path.read_bytes() for y in c]


# -- the live server ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture
def fuzz_server(fuzz_corpus: Corpus, tmp_path: Path) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "wsi_server", "serve", str(fuzz_corpus.good),
            str(fuzz_corpus.damaged), "--port", str(port), "--rescan-seconds", "0",
            "--no-isolate-open", "--state-dir", str(tmp_path / "state"),
            "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the server died at start:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not get ready in 120 s"
            try:
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- the requests -------------------------------------------------------------------------------
def dz_levels(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of each Deep Zoom level, level 0 first (1x1)."""
    dims = [(width, height)]
    while dims[-1] != (1, 1):
        w, h = dims[-1]
        dims.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return dims[::-1]


def tile_urls(sid: str, kind: str, dzi: str, rng: random.Random) -> list[str]:
    """A sample of tile URLs of a descriptor: the finest level, two below it, a coarse one,
    a corner and a random tile of each; one PNG."""
    m = _DZI.search(dzi)
    assert m is not None, dzi
    tile, _, width, height = (int(g) for g in m.groups())
    levels = dz_levels(width, height)
    top = len(levels) - 1
    prefix = f"/slides/{sid}_files" if kind == "default" else f"/slides/{sid}/native_files"
    urls = []
    for level in sorted({top, max(top - 1, 0), max(top - 3, 0), min(8, top)}):
        w, h = levels[level]
        cols, rows = math.ceil(w / tile), math.ceil(h / tile)
        picks = {(0, 0), (rng.randrange(cols), rng.randrange(rows)), (cols - 1, rows - 1)}
        urls += [f"{prefix}/{level}/{c}_{r}.jpeg" for c, r in sorted(picks)]
    return [*rng.sample(urls, min(len(urls), 6)), f"{prefix}/{top}/0_0.png"]


class Checker:
    """One keep-alive client; every response must be < 500 and every error JSON."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)
        self.sockets: set[int] = set()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.requests = 0

    def get(self, path: str) -> httpx.Response:
        self.requests += 1
        try:
            r = self.client.get(path)
        except httpx.TransportError as exc:  # reset: record it, go on with a new connection
            self.failures.append(f"{path}: {exc!r}")
            return httpx.Response(599, json={"error": "transport", "detail": repr(exc)})
        self.statuses[r.status_code] += 1
        sock = r.extensions["network_stream"].get_extra_info("socket")
        self.sockets.add(id(sock))
        if r.headers.get("connection", "").lower() == "close":
            self.failures.append(f"{path}: the server closed the connection")
        if r.status_code >= 500:
            self.failures.append(f"{path}: {r.status_code} {r.text[:200]}")
        elif r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                self.failures.append(f"{path}: {r.status_code} without a JSON body")
                return r
            if set(body) != {"error", "detail"}:
                self.failures.append(f"{path}: error body {body}")
        return r

    def expect_unreadable(self, r: httpx.Response, what: str) -> None:
        if r.status_code == 200:
            return
        code = r.json().get("error") if r.status_code >= 400 else None
        if code not in FAILURE_CODES:
            self.failures.append(f"{what}: {r.status_code} {code} is not an unreadable slide")


def probe_slide(check: Checker, sid: str, name: str) -> None:
    rng = random.Random(name)
    detail = check.get(f"/api/slides/{sid}")
    if detail.status_code != 200:
        check.failures.append(f"{name}: metadata {detail.status_code}")
        return
    body = detail.json()
    if body["status"] == "error":
        assert body["error"]["error"] in FAILURE_CODES, body
        for path in (f"/slides/{sid}.dzi", f"/slides/{sid}_files/0/0_0.jpeg",
                     f"/api/slides/{sid}/thumbnail"):
            r = check.get(path)
            if r.status_code < 400 or r.json()["error"] != body["error"]["error"]:
                check.failures.append(f"{name}: {path} gave {r.status_code} for a slide "
                                      f"listed as {body['error']['error']}")
        return
    for kind, path in (("default", f"/slides/{sid}.dzi"),
                       ("native", f"/slides/{sid}/native.dzi")):
        dzi = check.get(path)
        check.expect_unreadable(dzi, f"{name} {path}")
        if dzi.status_code != 200:
            continue
        for url in tile_urls(sid, kind, dzi.text, rng):
            check.expect_unreadable(check.get(url), f"{name} {url}")
    check.expect_unreadable(check.get(f"/api/slides/{sid}/thumbnail?max_size=256"),
                            f"{name} thumbnail")
    for assoc in body.get("associated", []):
        check.expect_unreadable(check.get(f"/api/slides/{sid}/associated/{assoc}"),
                                f"{name} associated {assoc}")


def good_tiles(check: Checker, slides: list[dict[str, Any]]) -> dict[str, bytes]:
    """A native tile of every good slide at its finest level and the 254/1 tile (0, 0) one
    level coarser: URL to bytes."""
    out: dict[str, bytes] = {}
    for s in slides:
        sid = s["id"]
        for kind, dzi_path in (("native", f"/slides/{sid}/native.dzi"),
                               ("default", f"/slides/{sid}.dzi")):
            dzi = check.get(dzi_path)
            assert dzi.status_code == 200, (s["name"], dzi.text)
            url = tile_urls(sid, kind, dzi.text, random.Random(0))[0]
            r = check.get(url)
            assert r.status_code == 200, (s["name"], url, r.text)
            out[url] = r.content
    return out


def test_damaged_slides_never_take_the_server_down(
    fuzz_corpus: Corpus, fuzz_server: Server
) -> None:
    started = time.monotonic()
    check = Checker(fuzz_server.url)
    slides = check.get("/api/slides").json()["slides"]
    good_names = {p.name for p in fuzz_corpus.good.iterdir()}
    good = [s for s in slides if s["name"] in good_names]
    assert len(good) == len(good_names)
    assert all(s["status"] == "ready" for s in good), good
    damaged = [s for s in slides if s["name"] not in good_names]
    assert len(damaged) == len(fuzz_corpus.cases)
    reference = good_tiles(check, good)
    for start in range(0, len(damaged), BATCH):
        for s in damaged[start:start + BATCH]:
            probe_slide(check, s["id"], s["name"])
        for url, data in reference.items():  # the good slides are served throughout
            r = check.get(url)
            assert r.status_code == 200 and r.content == data, url
        assert fuzz_server.proc.poll() is None, fuzz_server.log.read_text()[-3000:]
    for s in good:
        assert check.get(f"/api/slides/{s['id']}/thumbnail").status_code == 200
    elapsed = time.monotonic() - started
    listed_bad = sum(1 for s in damaged if s["status"] == "error")
    print(f"\nfuzz: {len(damaged)} damaged slides ({listed_bad} listed unreadable), "
          f"{check.requests} requests in {elapsed:.1f} s, statuses "
          f"{dict(sorted(check.statuses.items()))}")
    assert not check.failures, "\n".join(check.failures[:40])
    assert fuzz_server.proc.poll() is None, "the server process died"
    assert len(check.sockets) == 1, "the keep-alive connection was not kept"
    assert "Traceback" not in fuzz_server.log.read_text()

