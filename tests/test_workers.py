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


@pytest.fixture
def two_workers(
    tmp_path: Path, synthetic_slides: dict[str, Path], redis_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(synthetic_slides["aperio-rgb"], lib / "slide.svs")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_server", "serve", str(lib), "--port", str(port),
         "--workers", "2", "--redis-url", redis_url, "--redis-timeout", "1.0",
         "--rescan-seconds", "0",
         "--render-threads", "2"],
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
    yield base, proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
