"""``--dicomweb-source``: the slides of a DICOMweb archive (a real Orthanc, loaded with
DICOM WSI instances through its REST API: our own exports) served through the same tile
path: stored JPEG frames pass through, other tiles render like a local slide's, a cold tile
costs one WADO-RS round trip and a warm one none; an archive that is down or hangs costs
its slides a prompt 503 with a reason and never slows a local slide."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from starlette.testclient import TestClient

from wsi_server.dicom.export import export_slide

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path
             ) -> dict[str, list[Path]]:
    out = {}
    for name in ("aperio-ycbcr.svs", "aperio-rgb.svs"):
        dest = tmp_path_factory.mktemp("src") / name
        out[name] = list(export_slide(synthetic_dir / name, dest).files)
    return out


@pytest.fixture
def archive(orthanc_server: Any, exported: dict[str, list[Path]]) -> Any:
    orthanc = orthanc_server()
    for files in exported.values():
        for path in files:
            assert orthanc.upload(path)["Status"] == "Success"
    return orthanc


@pytest.fixture
def setup(make_client: Callable[..., TestClient], archive: Any, synthetic_dir: Path,
          tmp_path: Path) -> Iterator[tuple[TestClient, Any, dict[str, str]]]:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(synthetic_dir / "aperio-ycbcr.svs", lib / "local.svs")
    client = make_client(paths=(lib,), dicomweb_source=(archive.dicomweb,),
                         dicomweb_source_timeout=TIMEOUT)
    deadline = time.monotonic() + 30
    while True:
        slides = client.get("/api/slides").json()["slides"]
        if len(slides) == 3:
            break
        assert time.monotonic() < deadline, slides
        time.sleep(0.1)
    ids = {s["name"]: s["id"] for s in slides}
    yield client, archive, ids
    if archive.proc is not None and archive.proc.poll() is None:
        os.kill(archive.proc.pid, signal.SIGCONT)


def _remote_id(client: TestClient, ids: dict[str, str], width: int) -> str:
    for sid in ids.values():
        meta = client.get(f"/api/slides/{sid}").json()
        if meta["format"] == "dicomweb" and meta["width"] == width:
            return sid
    raise AssertionError("remote slide not listed")


def _source(client: TestClient) -> Any:
    return client.app.state.ctx.sources.sources[0]  # type: ignore[attr-defined]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_archive_slides_are_listed_with_their_metadata(
    setup: tuple[TestClient, Any, dict[str, str]],
) -> None:
    client, _, ids = setup
    local = client.get(f"/api/slides/{ids['local.svs']}").json()
    remote = client.get(f"/api/slides/{_remote_id(client, ids, local['width'])}").json()
    assert [lv["width"] for lv in remote["levels"]] == [lv["width"] for lv in local["levels"]]
    assert remote["mpp"] == pytest.approx(local["mpp"], rel=1e-3)
    assert set(remote["associated"]) == {"label", "macro", "thumbnail"}
    # the id is derived from the source and the series: stable across restarts
    again = client.get("/api/slides").json()["slides"]
    assert {s["id"] for s in again} == set(ids.values())


def test_stored_frames_pass_through_and_tiles_match_the_local_slide(
    setup: tuple[TestClient, Any, dict[str, str]], exported: dict[str, list[Path]],
) -> None:
    client, _, ids = setup
    local_id = ids["local.svs"]
    width = client.get(f"/api/slides/{local_id}").json()["width"]
    sid = _remote_id(client, ids, width)
    source = _source(client)
    base = next(p for p in exported["aperio-ycbcr.svs"]
                if pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns == width
                and "VOLUME" in pydicom.dcmread(p, stop_before_pixels=True).ImageType)
    ds = pydicom.dcmread(base)
    frame1 = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    deepest = _deepest(client, sid)  # full resolution of the native grid
    before = source.frame_requests
    r = client.get(f"/slides/{sid}/native_files/{deepest}/0_0.jpeg")
    assert r.status_code == 200, r.text
    assert r.headers["x-tile-source"] == "passthrough"
    assert r.content.rstrip(b"\x00") == frame1.rstrip(b"\x00")  # the archive's bytes
    assert source.frame_requests == before + 1  # one WADO-RS round trip
    # a rendered tile of the default geometry (several frames): one round trip too
    before = source.frame_requests
    dz = _deepest(client, sid, native=False)
    tile = f"{dz}/2_1.jpeg"
    remote = client.get(f"/slides/{sid}_files/{tile}")
    assert remote.status_code == 200 and remote.headers["x-tile-source"] == "rendered"
    assert source.frame_requests == before + 1
    local = client.get(f"/slides/{local_id}_files/{tile}")
    assert np.abs(_pixels(remote.content) - _pixels(local.content)).mean() <= 3
    # warm: from the cache, no request to the archive
    warm = client.get(f"/slides/{sid}_files/{tile}")
    assert warm.content == remote.content and source.frame_requests == before + 1
    thumb = client.get(f"/api/slides/{sid}/thumbnail", params={"max_size": 128})
    assert thumb.status_code == 200
    label = client.get(f"/api/slides/{sid}/associated/label")
    assert label.status_code == 200


def test_tiles_of_a_second_archive_slide_show_our_pixels(
    setup: tuple[TestClient, Any, dict[str, str]], synthetic_dir: Path,
) -> None:
    client, _, ids = setup
    sid = _remote_id(client, ids, 3000)  # aperio-rgb
    deepest = _deepest(client, sid)
    from wsi_server.readers import default_registry

    reader = default_registry().open(synthetic_dir / "aperio-rgb.svs")
    r = client.get(f"/slides/{sid}/native_files/{deepest}/1_1.jpeg")
    assert r.status_code == 200
    ours = reader.read_region(0, 256, 256, 256, 256).astype(int)
    assert np.abs(_pixels(r.content) - ours).mean() <= 3
    # the last column: a partial frame at the edge of the level, cropped
    edge = client.get(f"/slides/{sid}/native_files/{deepest}/11_8.jpeg")
    assert edge.status_code == 200 and edge.headers["x-tile-source"] == "rendered"
    ours = reader.read_region(0, 11 * 256, 8 * 256, 3000 - 11 * 256, 2100 - 8 * 256)
    assert np.abs(_pixels(edge.content) - ours.astype(int)).mean() <= 3


def _deepest(client: TestClient, sid: str, native: bool = True) -> int:
    url = f"/slides/{sid}/native.dzi" if native else f"/slides/{sid}.dzi"
    text = client.get(url).text
    w = int(re.search(r'Width="(\d+)"', text).group(1))  # type: ignore[union-attr]
    h = int(re.search(r'Height="(\d+)"', text).group(1))  # type: ignore[union-attr]
    return int(np.ceil(np.log2(max(w, h))))


def test_an_archive_that_hangs_or_is_down_costs_its_slides_a_prompt_503(
    setup: tuple[TestClient, Any, dict[str, str]],
) -> None:
    client, archive, ids = setup
    local_id = ids["local.svs"]
    width = client.get(f"/api/slides/{local_id}").json()["width"]
    sid = _remote_id(client, ids, width)
    deepest = _deepest(client, sid)
    os.kill(archive.proc.pid, signal.SIGSTOP)  # the archive hangs
    started = time.monotonic()
    r = client.get(f"/slides/{sid}/native_files/{deepest}/1_1.jpeg")
    took = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "backend_unavailable"
    assert "no answer within" in r.json()["detail"]
    assert took < TIMEOUT + 1.5
    # right after: answered at once, without waiting on the archive again
    started = time.monotonic()
    again = client.get(f"/slides/{sid}/native_files/{deepest}/2_1.jpeg")
    assert again.status_code == 503 and time.monotonic() - started < 0.5
    # local slides never wait on the archive
    started = time.monotonic()
    local = client.get(f"/slides/{local_id}/native_files/{deepest}/2_1.jpeg")
    assert local.status_code == 200 and time.monotonic() - started < 1.0
    assert sid in {s["id"] for s in client.get("/api/slides").json()["slides"]}
    os.kill(archive.proc.pid, signal.SIGCONT)
    archive.stop()  # now down: connection refused
    time.sleep(min(TIMEOUT, 5.0) + 0.1)  # past the cool-down
    r = client.get(f"/slides/{sid}/native_files/{deepest}/3_1.jpeg")
    assert r.status_code == 503 and "cannot connect" in r.json()["detail"]
