"""The HTTP contract: listing, metadata, descriptors, caching headers, errors, bad input."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import real_slide
from wsi_server.library import slide_id


@pytest.fixture
def library_dir(tmp_path: Path, synthetic_slides: dict[str, Path]) -> Path:
    """A library with good slides next to corrupt, truncated, empty, unsupported and
    non-slide files."""
    lib = tmp_path / "library"
    (lib / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(synthetic_slides["aperio-rgb"], lib / "good.svs")
    shutil.copy(synthetic_slides["generic"], lib / "nested" / "deeper" / "patient (1).tiff")
    data = synthetic_slides["aperio-rgb"].read_bytes()
    (lib / "truncated.svs").write_bytes(data[: len(data) // 2])
    (lib / "header-only.svs").write_bytes(data[:2048])
    (lib / "empty.ndpi").write_bytes(b"")
    (lib / "olympus.vsi").write_bytes(b"II*\x00" + os.urandom(4000))
    (lib / "notes.txt").write_text("not a slide")
    (lib / "report.pdf").write_bytes(b"%PDF-1.4\n")
    return lib


def _by_name(client: Any) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in client.get("/api/slides").json()["slides"]}


def test_library_serves_good_slides_and_lists_bad_ones_with_reasons(
    make_client: Any, library_dir: Path
) -> None:
    client = make_client(paths=(library_dir,))
    slides = _by_name(client)
    assert set(slides) == {
        "good.svs", "patient (1).tiff", "truncated.svs", "header-only.svs", "empty.ndpi",
        "olympus.vsi",
    }
    assert slides["good.svs"]["status"] == "ready"
    assert slides["good.svs"]["format"] == "aperio"
    assert slides["good.svs"]["mpp"] == [0.25, 0.25]
    assert slides["patient (1).tiff"]["status"] == "ready"
    for bad in ("header-only.svs", "empty.ndpi", "olympus.vsi"):
        entry = slides[bad]
        assert entry["status"] == "error"
        assert entry["error"]["error"] in ("unsupported_format", "unreadable_slide")
        r = client.get(f"/slides/{entry['id']}.dzi")
        assert r.status_code in (415, 422)
        assert r.json()["error"] == entry["error"]["error"]
        assert str(library_dir) not in r.text
        tile = client.get(f"/slides/{entry['id']}_files/0/0_0.jpeg")
        assert tile.status_code in (415, 422)
    assert client.get("/readyz").status_code == 200


def test_truncated_slide_never_crashes_the_server(make_client: Any, library_dir: Path) -> None:
    client = make_client(paths=(library_dir,))
    entry = _by_name(client)["truncated.svs"]
    if entry["status"] == "error":
        assert client.get(f"/slides/{entry['id']}.dzi").status_code == 422
        return
    # Its directory survived: tiles whose data is missing are a clean 422 or background.
    for level in (8, 10, 12):
        for col, row in ((0, 0), (5, 5), (11, 8)):
            r = client.get(f"/slides/{entry['id']}/native_files/{level}/{col}_{row}.jpeg")
            assert r.status_code in (200, 404, 422)
            if r.status_code != 200:
                assert set(r.json()) == {"error", "detail"}
    assert client.get("/healthz").status_code == 200


def test_slide_ids_are_opaque_stable_and_url_safe(
    make_client: Any, library_dir: Path
) -> None:
    first = _by_name(make_client(paths=(library_dir,)))
    again = _by_name(make_client(paths=(library_dir,)))
    for name, entry in first.items():
        sid = entry["id"]
        assert sid == again[name]["id"]
        assert all(c.isalnum() or c in "-_" for c in sid)
        assert name.split(".")[0].split(" ")[0] not in sid
    # the id depends on the path within the library, not on where the library is mounted
    moved = library_dir.parent / "mounted-elsewhere"
    shutil.copytree(library_dir, moved)
    assert _by_name(make_client(paths=(moved,)))["good.svs"]["id"] == first["good.svs"]["id"]
    assert first["good.svs"]["id"] == slide_id("good.svs")


def test_slide_metadata(make_client: Any, synthetic_slides: dict[str, Path]) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    body = client.get(f"/api/slides/{sid}").json()
    assert body["width"] == 3000 and body["height"] == 2100
    assert [(lv["width"], lv["height"]) for lv in body["levels"]] == [
        (3000, 2100), (750, 525), (187, 131)
    ]
    assert body["tile_size"] == [256, 256]
    assert body["native_tile_size"] == 256
    assert body["objective_power"] == 40.0
    assert set(body["associated"]) == {"label", "macro", "thumbnail"}
    assert body["properties"]["aperio.AppMag"] == "40"
    assert body["native_dzi"].startswith(f"/slides/{sid}/native.dzi?v=")


def test_native_dzi_uses_stored_tile_size(make_client: Any) -> None:
    client = make_client(paths=(real_slide("svs"), real_slide("ndpi")))
    dzis = {
        s["name"]: client.get(f"/slides/{s['id']}/native.dzi").text
        for s in client.get("/api/slides").json()["slides"]
    }
    assert 'TileSize="240" Overlap="0"' in dzis["CMU-1-Small-Region.svs"]
    assert 'TileSize="256" Overlap="0"' in dzis["test3-DAPI-2-(387).ndpi"]


def test_configured_geometry(make_client: Any, synthetic_slides: dict[str, Path]) -> None:
    client = make_client(paths=(synthetic_slides["generic"],), tile_size=510, overlap=1)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    assert 'TileSize="510" Overlap="1"' in client.get(f"/slides/{sid}.dzi").text
    import io

    from PIL import Image

    r = client.get(f"/slides/{sid}_files/11/0_0.png")
    assert Image.open(io.BytesIO(r.content)).size == (511, 511)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/slides/{id}_files/99/0_0.jpeg", 404, "tile_not_found"),
        ("/slides/{id}_files/12/999_0.jpeg", 404, "tile_not_found"),
        ("/slides/{id}_files/12/0_999.jpeg", 404, "tile_not_found"),
        ("/slides/{id}_files/12/-1_0.jpeg", 400, "bad_request"),
        ("/slides/{id}_files/-3/0_0.jpeg", 400, "bad_request"),
        ("/slides/{id}_files/12/0_0.gif", 400, "bad_request"),
        ("/slides/{id}_files/12/0_0", 400, "bad_request"),
        ("/slides/{id}_files/99999999999/0_0.jpeg", 400, "bad_request"),
        ("/slides/{id}_files/12/1e3_0.jpeg", 400, "bad_request"),
        ("/slides/{id}/native_files/12/0_0.webp", 400, "bad_request"),
        ("/slides/nosuchslide.dzi", 404, "slide_not_found"),
        ("/slides/nosuchslide_files/0/0_0.jpeg", 404, "slide_not_found"),
        ("/slides/..%2F..%2Fetc%2Fpasswd.dzi", 404, None),
        ("/slides/..\\..\\etc.dzi", 404, "slide_not_found"),
        ("/slides/%2Fetc%2Fpasswd/native.dzi", 404, None),
        ("/api/slides/..%2Fgood.svs", 404, None),
        ("/api/slides/{id}/thumbnail?max_size=abc", 400, "bad_request"),
        ("/api/slides/{id}/thumbnail?max_size=0", 400, "bad_request"),
        ("/api/slides/{id}/thumbnail?max_size=100000", 400, "bad_request"),
        ("/api/slides/{id}/associated/nonexistent", 404, "not_found"),
        ("/no/such/route", 404, "not_found"),
    ],
)
def test_bad_requests_get_json_errors(
    make_client: Any, synthetic_slides: dict[str, Path], path: str, status: int,
    code: str | None,
) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    r = client.get(path.replace("{id}", sid))
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error", "detail"}
    if code:
        assert body["error"] == code
    assert "Traceback" not in r.text and "/tmp" not in r.text


def test_etag_and_conditional_requests(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    detail = client.get(f"/api/slides/{sid}").json()
    url = f"/slides/{sid}/native_files/12/3_3.jpeg"
    r = client.get(url)
    assert r.status_code == 200 and r.headers["etag"]
    assert "no-cache" in r.headers["cache-control"]
    again = client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    versioned = client.get(f"{url}?v={detail['version']}")
    assert "immutable" in versioned.headers["cache-control"]
    assert "max-age=31536000" in versioned.headers["cache-control"]
    assert client.get(f"{url}?v=stale").headers["cache-control"] == r.headers["cache-control"]


def test_replaced_file_is_never_served_stale(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    target = lib / "case.svs"
    shutil.copy(synthetic_slides["aperio-rgb"], target)
    client = make_client(paths=(lib,))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    url = f"/slides/{sid}_files/10/0_0.jpeg"
    before = client.get(url)
    # a rescan replaces the file in place (same name, different slide)
    tmp = lib / "case.svs.tmp"
    shutil.copy(synthetic_slides["aperio-ycbcr"], tmp)
    os.replace(tmp, target)
    time.sleep(1.1)  # past the fingerprint re-check interval
    after = client.get(url)
    assert after.status_code == 200
    assert after.headers["etag"] != before.headers["etag"]
    assert after.content != before.content
    assert client.get(f"/api/slides/{sid}").json()["width"] == 1333


def test_thumbnail_and_associated_images(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    import io

    from PIL import Image

    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    thumb = client.get(f"/api/slides/{sid}/thumbnail?max_size=300")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (300, 210)
    label = client.get(f"/api/slides/{sid}/associated/label")
    assert label.status_code == 200
    assert Image.open(io.BytesIO(label.content)).size == (400, 400)
    assert "private" in label.headers["cache-control"]


def test_hide_associated_withholds_label_and_macro(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],), hide_associated=True)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    assert client.get(f"/api/slides/{sid}").json()["associated"] == ["thumbnail"]
    assert client.get(f"/api/slides/{sid}/associated/label").status_code in (403, 404)
    assert client.get(f"/api/slides/{sid}/associated/macro").status_code in (403, 404)


def test_cors(make_client: Any, synthetic_slides: dict[str, Path]) -> None:
    client = make_client(
        paths=(synthetic_slides["generic"],), cors_origins=("https://viewer.example",)
    )
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    r = client.get(f"/slides/{sid}.dzi", headers={"Origin": "https://viewer.example"})
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"
    other = client.get(f"/slides/{sid}.dzi", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = make_client(paths=(synthetic_slides["generic"],))
    r = plain.get(f"/slides/{sid}.dzi", headers={"Origin": "https://viewer.example"})
    assert "access-control-allow-origin" not in r.headers


def test_concurrent_misses_for_one_tile_render_once(
    make_client: Any, synthetic_slides: dict[str, Path]
) -> None:
    import asyncio

    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    service = client.app.state.service  # type: ignore[attr-defined]
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    calls = 0
    produce = service._produce

    async def counting(ref: Any) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return await produce(ref)

    service._produce = counting

    async def burst() -> list[bytes]:
        tiles = await asyncio.gather(
            *(service.tile(sid, "default", 11, 2, 2, "jpeg") for _ in range(20))
        )
        return [t.data for t in tiles]

    datas = client.portal.call(burst)  # type: ignore[attr-defined]
    assert calls == 1
    assert len(set(datas)) == 1


def test_metrics_and_health(make_client: Any, synthetic_slides: dict[str, Path]) -> None:
    client = make_client(paths=(synthetic_slides["aperio-rgb"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    client.get(f"/slides/{sid}/native_files/12/1_1.jpeg")
    client.get(f"/slides/{sid}/native_files/12/1_1.jpeg")
    client.get(f"/slides/{sid}_files/11/1_1.jpeg")
    client.get("/slides/nope.dzi")
    text = client.get("/metrics").text
    assert 'wsi_tile_seconds_count{source="passthrough"} 1.0' in text
    assert 'wsi_tile_seconds_count{source="rendered"} 1.0' in text
    assert 'wsi_tile_seconds_count{source="memory"} 1.0' in text
    assert 'wsi_errors_total{code="slide_not_found"} 1.0' in text
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["slides"] == 1


def test_slide_added_during_a_rescan_is_kept(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    import threading

    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(synthetic_slides["generic"], lib / "a.tiff")
    client = make_client(paths=(lib,))
    library = client.app.state.library  # type: ignore[attr-defined]
    # the rescan walks the folder while the new slide is moved in and added
    walked = threading.Event()
    proceed = threading.Event()
    real_load = library._load

    def slow_load(sid: str, path: Path, *rest: Any) -> Any:
        walked.set()
        proceed.wait(5)
        return real_load(sid, path, *rest)

    library._load = slow_load
    scan = threading.Thread(target=library.scan)
    scan.start()
    assert walked.wait(5)
    shutil.copy(synthetic_slides["odd"], lib / "b.tiff")
    library._load = real_load
    library.add(lib / "b.tiff")
    proceed.set()
    scan.join(10)
    assert {s["name"] for s in client.get("/api/slides").json()["slides"]} == {"a.tiff", "b.tiff"}


def test_isolate_open_keeps_a_crashing_or_hanging_file_out_of_the_server(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--isolate-open: a file on which the decoder crashes (abort) or hangs is checked in
    the validator's process, listed as unreadable, and the server goes on serving."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("good.svs", "crashes.svs", "hangs.svs"):
        shutil.copy(synthetic_slides["aperio-rgb"], lib / name)
    # the validator process aborts / hangs on these names, as a bad C decoder would
    monkeypatch.setenv("WSI_INGEST_FAULT", "validate-crash:crashes,validate-hang:hangs")
    client = make_client(paths=(lib,), isolate_open=True, ingest_validate_timeout=3)
    slides = _by_name(client)
    assert slides["good.svs"]["status"] == "ready"
    for name, why in (("crashes.svs", "died"), ("hangs.svs", "did not answer")):
        assert slides[name]["status"] == "error"
        assert slides[name]["error"]["error"] == "unreadable_slide"
        assert why in slides[name]["error"]["detail"]
        assert client.get(f"/slides/{slides[name]['id']}.dzi").status_code == 422
    good = slides["good.svs"]["id"]
    assert client.get(f"/slides/{good}_files/10/0_0.jpeg").status_code == 200
