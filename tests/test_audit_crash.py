"""kill -9 during a burst of audited requests: every audit record whose request got its
response is in the store afterwards, on SQLite and PostgreSQL.

A real ``wsi-server serve`` process (``--auth none`` on loopback) gets two bursts at once:
share creations (each answered with the new share's id, audited as ``share.create``) and
first views of slides from many client addresses (127.0.0.x: each (client, slide) is a new
viewing session, audited as ``slide.view``). Each burst notes a request only once its whole
response has arrived. The server is SIGKILLed mid-burst; then the store is opened and every
noted request must have its record.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.plugins.redis_server import free_port
from wsi_server.store import AuditLog, Store

CLIENT_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 42)]
ENOUGH = 40  # answered requests of each burst before the kill
DEADLINE = 30.0


def start_server(lib: Path, state: Path, database_url: str, log: Path) -> tuple[
        subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_")}
    cmd = [sys.executable, "-m", "wsi_server", "serve", str(lib), "--host", "127.0.0.1",
           "--port", str(port), "--state-dir", str(state), "--database-url", database_url,
           "--rescan-seconds", "0", "--log-level", "warning"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_kill_9_loses_no_answered_audit_record(
    tmp_path: Path, synthetic_slides: dict[str, Path], store_url: str
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("aperio-rgb", "generic", "odd", "aperio-ycbcr"):
        shutil.copy(synthetic_slides[name], lib / synthetic_slides[name].name)
    log = tmp_path / "server.log"
    proc, base = start_server(lib, tmp_path / "state", store_url, log)
    try:
        slides = [s["id"] for s in httpx.get(base + "/api/slides", timeout=10).json()["slides"]]
        assert len(slides) == 4

        created: list[str] = []  # share ids whose 201 arrived
        viewed: list[tuple[str, str]] = []  # (client address, slide) answered 200
        stop = threading.Event()

        def share_burst() -> None:
            with httpx.Client(base_url=base, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    try:
                        r = client.post(f"/api/slides/{slides[i % 4]}/shares",
                                        json={"note": f"burst {i}"})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 201:
                        created.append(r.json()["id"])
                    i += 1

        def view_burst(addresses: list[str]) -> None:
            for address in addresses:
                transport = httpx.HTTPTransport(local_address=address)
                with httpx.Client(base_url=base, timeout=10, transport=transport) as client:
                    for sid in slides:
                        if stop.is_set():
                            return
                        try:
                            r = client.get(f"/api/slides/{sid}")
                        except httpx.HTTPError:
                            return
                        if r.status_code == 200:
                            viewed.append((address, sid))

        threads = [threading.Thread(target=share_burst) for _ in range(3)]
        threads += [threading.Thread(target=view_burst, args=(CLIENT_ADDRESSES[i::2],))
                    for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + DEADLINE
        while (len(created) < ENOUGH or len(viewed) < ENOUGH) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(created) >= ENOUGH and len(viewed) >= ENOUGH, log.read_text()[-3000:]

    with Store.open(store_url) as store:
        audit = AuditLog(store)
        creates = audit.query(action="share.create", limit=100_000)
        views = audit.query(action="slide.view", limit=100_000)
    recorded_shares = {r.detail["share"] for r in creates if r.detail}
    missing_shares = set(created) - recorded_shares
    assert not missing_shares, f"{len(missing_shares)} of {len(created)} answered shares lost"
    recorded_views = {(r.client, r.slide) for r in views}
    missing_views = set(viewed) - recorded_views
    assert not missing_views, f"{len(missing_views)} of {len(viewed)} answered views lost"
    # every view was a first view of its session, so each is its own record
    assert len({(c, s) for c, s in viewed}) == len(viewed)
