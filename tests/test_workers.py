"""``wsi-server serve --workers 2``: two real uvicorn worker processes on one port,
sharing rendered tiles through a real Redis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.plugins.redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis


def _workers(pid: int) -> set[int]:
    """Worker processes uvicorn spawned under ``pid`` (not multiprocessing's tracker)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def start_workers(*args: str) -> tuple[str, subprocess.Popen[bytes]]:
    """``wsi-server serve ARGS --workers 2`` on a free port, once both workers are up."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_server", "serve", *args, "--port", str(port),
         "--workers", "2", "--rescan-seconds", "0", "--render-threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        time.sleep(0.1)
    # both workers must be up, not just the first to answer
    while len(_workers(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return base, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def two_workers(
    tmp_path: Path, synthetic_slides: dict[str, Path], redis_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(synthetic_slides["aperio-rgb"], lib / "slide.svs")
    base, proc = start_workers(str(lib), "--redis-url", redis_url, "--redis-timeout", "1.0")
    yield base, proc
    stop(proc)


def test_two_workers_share_tiles_through_redis(
    two_workers: tuple[str, subprocess.Popen[bytes]], redis_server: RedisServer
) -> None:
    base, proc = two_workers
    assert len(_workers(proc.pid)) == 2
    sid = httpx.get(base + "/api/slides").json()["slides"][0]["id"]
    url = f"{base}/slides/{sid}_files/11/2_1.jpeg"
    sources: list[str] = []
    bodies = set()
    # Fresh connections land on either worker: the first renders, the other worker finds
    # the tile in Redis, and each then serves it from its own memory tier.
    for _ in range(60):
        with httpx.Client() as client:
            r = client.get(url)
        assert r.status_code == 200
        sources.append(r.headers["x-tile-source"])
        bodies.add(r.content)
        if "redis" in sources:
            break
    assert sources[0] == "rendered"
    assert sources.count("rendered") == 1
    assert "redis" in sources, sources
    assert len(bodies) == 1
    assert redis_server.client().dbsize() >= 1


def test_a_slide_ingested_by_one_worker_is_served_by_both(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    """One worker ingests (it holds the library's lock); the other follows the ingest
    journal, so a new slide is never listed by one worker and 404 on the other. No
    rescans: only following can tell the second worker."""
    lib, watch, state = tmp_path / "lib", tmp_path / "watch", tmp_path / "state"
    lib.mkdir()
    base, proc = start_workers(str(lib), "--ingest", str(watch), "--ingest-settle-seconds",
                               "0.5", "--state-dir", str(state))
    try:
        assert len(_workers(proc.pid)) == 2
        shutil.copy(synthetic_slides["aperio-rgb"], watch / "new.svs")
        deadline = time.monotonic() + 60
        sid = None
        while sid is None and time.monotonic() < deadline:
            slides = httpx.get(base + "/api/slides", timeout=10).json()["slides"]
            sid = next((s["id"] for s in slides if s["name"] == "new.svs"), None)
            time.sleep(0.1)
        assert sid is not None, "the scan was never listed"
        # The standby worker follows the journal every second; without following it would
        # answer 404 for good (no rescans). Fresh connections land on either worker
        # (2**-29 that 30 all land on one).
        deadline = time.monotonic() + 15
        while True:
            codes = [httpx.get(f"{base}/api/slides/{sid}", timeout=10).status_code
                     for _ in range(30)]
            if codes == [200] * 30 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert codes == [200] * 30, codes
        listed = [len(httpx.get(base + "/api/slides", timeout=10).json()["slides"])
                  for _ in range(20)]
        assert listed == [1] * 20, listed
    finally:
        stop(proc)
