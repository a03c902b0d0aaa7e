"""The server with ingest on: a dropped scan appears in /api/slides without a restart."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sample_slides import write_svs_like


def _wait_listed(client: Any, name: str, timeout: float = 20.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for s in client.get("/api/slides").json()["slides"]:
            if s["name"] == name:
                return dict(s)
        time.sleep(0.05)
    raise AssertionError(f"{name} never listed")


def test_dropped_scan_is_served_and_reported(make_client: Any, tmp_path: Path) -> None:
    watch, lib = tmp_path / "watch", tmp_path / "library"
    lib.mkdir()
    client = make_client(paths=(lib,), ingest=watch, ingest_settle_seconds=0.3, ingest_poll=True)
    assert client.get("/api/slides").json()["slides"] == []
    src = write_svs_like(tmp_path / "new.svs", 800, 600, tile=256, downsamples=(1, 4))
    shutil.copy(src, watch / "new.svs")
    (watch / "broken.svs").write_bytes(b"II*\x00broken")
    slide = _wait_listed(client, "new.svs")
    assert slide["status"] == "ready" and slide["width"] == 800
    assert client.get(f"/slides/{slide['id']}_files/0/0_0.jpeg").status_code == 200
    end = time.monotonic() + 20
    while time.monotonic() < end:
        report = client.get("/api/ingest").json()
        if report["failures"] and report["recent"]:
            break
        time.sleep(0.05)
    assert report["enabled"] is True
    assert [r["slide_id"] for r in report["recent"]] == [slide["id"]]
    assert [f["name"] for f in report["failures"]] == ["broken.svs"]
    assert report["failures"][0]["error"]["error"] == "unreadable_slide"
    assert report["queue"] == {"waiting": [], "in_progress": [], "urgent": []}
    assert {e["kind"] for e in report["events"]} >= {"seen", "settled", "valid", "ingested"}
    assert (watch / "quarantine" / "broken.svs.error.json").exists()
    # both outcomes are in the audit trail, without the file names
    events = client.get("/api/audit", params={"action": "ingest."}).json()["events"]
    by_action = {e["action"]: e for e in events}
    assert set(by_action) == {"ingest.done", "ingest.quarantined"}
    assert by_action["ingest.done"]["slide"] == slide["id"]
    assert by_action["ingest.done"]["outcome"] == "success"
    failed = by_action["ingest.quarantined"]
    assert failed["outcome"] == "failure" and failed["slide"] is None
    assert failed["detail"]["reason"]["error"] == "unreadable_slide"
    assert "broken.svs" not in str(events)


def test_ingest_report_when_off(make_client: Any, tmp_path: Path) -> None:
    client = make_client(paths=(tmp_path,))
    body = client.get("/api/ingest").json()
    assert body["enabled"] is False and body["queue"]["waiting"] == []


def test_ingested_slide_is_warmed_into_the_cache(make_client: Any, tmp_path: Path) -> None:
    watch, lib = tmp_path / "watch", tmp_path / "library"
    lib.mkdir()
    client = make_client(
        paths=(lib,), ingest=watch, ingest_settle_seconds=0.3, ingest_poll=True,
        ingest_warm_levels=10,
    )
    src = write_svs_like(tmp_path / "new.svs", 800, 600, tile=256, downsamples=(1, 4))
    shutil.copy(src, watch / "new.svs")
    sid = _wait_listed(client, "new.svs")["id"]
    # the warm-up fills the cache by itself: wait for it without requesting tiles
    service = client.app.state.service  # type: ignore[attr-defined]
    cache = client.app.state.cache  # type: ignore[attr-defined]
    addresses = [(kind, lv) for kind in ("default", "native") for lv in range(10)]

    async def cached() -> bool:
        refs = [await service.locate(sid, kind, lv, 0, 0, "jpeg") for kind, lv in addresses]
        return all(ref.key in cache._items for ref in refs)

    end = time.monotonic() + 20
    while not client.portal.call(cached) and time.monotonic() < end:  # type: ignore[attr-defined]
        time.sleep(0.1)
    # and the first request of each is a cache hit, not a render
    for kind, lv in addresses:
        base = f"/slides/{sid}_files" if kind == "default" else f"/slides/{sid}/native_files"
        assert client.get(f"{base}/{lv}/0_0.jpeg").headers["x-tile-source"] == "memory"
