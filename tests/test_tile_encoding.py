"""Tiles of stored levels on the wire: the scanner's bytes as they are (``stored``), or
re-encoded as JPEG 4:2:0 at the server's quality for slow links (``reencoded``), never
larger than the stored tile; and the viewer asking for either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import simplejpeg

from sample_slides import write_svs_like
from tests.test_viewer import PINK, open_viewer, osd_installed, slides_of
from wsi_server.settings import Settings, validate

# 2048×1536, 256-px JPEG tiles, levels at downsample 1/4/16: Deep Zoom level 11 (2048 =
# 2**11) is level 0.
LEVEL0 = 11


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tissue scanned at q90 with pixel grain (tiles as heavy as a scanner's) and
    at q30 (tiles already lighter than a q75 re-encode)."""
    d = tmp_path_factory.mktemp("encoding")
    return {
        "q90": write_svs_like(d / "q90.svs", 2048, 1536, quality=90, grain=14.0),
        "q30": write_svs_like(d / "q30.svs", 2048, 1536, quality=30, grain=14.0),
    }


def decode(data: bytes) -> np.ndarray:
    return np.asarray(simplejpeg.decode_jpeg(data, colorspace="RGB"), dtype=np.int16)


def block_means(pixels: np.ndarray, n: int = 8) -> np.ndarray:
    h, w, c = pixels.shape
    return pixels.reshape(h // n, n, w // n, n, c).mean(axis=(1, 3))


def test_reencoded_tiles_are_lighter_4_2_0_and_close_to_the_stored_ones(
    make_client: Any, scans: dict[str, Path]
) -> None:
    client = make_client(paths=(scans["q90"],), jpeg_quality=75)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    url = f"/slides/{sid}/native_files/{LEVEL0}/3_2.jpeg"
    stored = client.get(url)
    assert stored.status_code == 200
    assert stored.headers["x-tile-source"] == "passthrough"
    again = client.get(url + "?encoding=stored")
    assert again.content == stored.content and again.headers["etag"] == stored.headers["etag"]

    lighter = client.get(url + "?encoding=reencoded")
    assert lighter.status_code == 200
    assert lighter.headers["content-type"] == "image/jpeg"
    assert lighter.headers["x-tile-source"] == "rendered"
    assert lighter.headers["etag"] != stored.headers["etag"]
    assert len(lighter.content) < 0.7 * len(stored.content), (
        len(lighter.content), len(stored.content))
    height, width, _, subsampling = simplejpeg.decode_jpeg_header(lighter.content)
    assert (width, height) == (256, 256) and subsampling == "420"
    # the same picture: a q75 re-encode smooths the pixel grain (a few levels per pixel)
    # and keeps the tissue (8×8 block means within a level or two)
    a, b = decode(lighter.content), decode(stored.content)
    assert np.abs(a - b).mean() < 8.0
    blocks = np.abs(block_means(a) - block_means(b))
    assert blocks.mean() < 1.5 and blocks.max() < 12, (blocks.mean(), blocks.max())
    # cached under its own key: the next request is a memory hit of the same bytes
    cached = client.get(url + "?encoding=reencoded")
    assert cached.headers["x-tile-source"] == "memory" and cached.content == lighter.content
    assert client.get(url).content == stored.content  # the stored variant is untouched


def test_a_tile_stored_lighter_than_a_reencode_is_sent_as_stored(
    make_client: Any, scans: dict[str, Path]
) -> None:
    client = make_client(paths=(scans["q30"],), jpeg_quality=75)
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    url = f"/slides/{sid}/native_files/{LEVEL0}/3_2.jpeg"
    stored = client.get(url)
    lighter = client.get(url + "?encoding=reencoded")
    assert lighter.status_code == 200
    assert lighter.headers["x-tile-source"] == "passthrough"
    assert lighter.content == stored.content


def test_tiles_that_are_rendered_anyway_are_one_variant(
    make_client: Any, scans: dict[str, Path]
) -> None:
    """A level the file does not store (and every tile of the 254/1 geometry) is rendered
    at the server's quality either way: one cache entry, one ETag."""
    client = make_client(paths=(scans["q90"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    for url in (f"/slides/{sid}/native_files/{LEVEL0 - 1}/1_1.jpeg",
                f"/slides/{sid}_files/{LEVEL0}/2_2.jpeg"):
        first = client.get(url)
        second = client.get(url + "?encoding=reencoded")
        assert first.headers["x-tile-source"] == "rendered"
        assert second.headers["x-tile-source"] == "memory"
        assert second.headers["etag"] == first.headers["etag"]
        assert second.content == first.content


def test_a_bad_encoding_is_a_400_naming_the_parameter(
    make_client: Any, scans: dict[str, Path]
) -> None:
    client = make_client(paths=(scans["q90"],))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    for url in (f"/slides/{sid}/native_files/{LEVEL0}/0_0.jpeg?encoding=webp",
                f"/slides/{sid}/native.dzi?encoding=",
                f"/slides/{sid}.dzi?encoding=../../etc"):
        r = client.get(url)
        assert r.status_code == 400, url
        assert "encoding" in r.json()["detail"]
    dzi = client.get(f"/slides/{sid}/native.dzi").text
    assert client.get(f"/slides/{sid}/native.dzi?encoding=reencoded").text == dzi


def test_the_server_setting_is_carried_by_the_descriptors_it_lists(
    make_client: Any, scans: dict[str, Path]
) -> None:
    plain = make_client(paths=(scans["q90"],))
    sid = plain.get("/api/slides").json()["slides"][0]["id"]
    detail = plain.get(f"/api/slides/{sid}").json()
    assert detail["tile_encoding"] == "stored"
    assert "encoding" not in detail["native_dzi"]

    light = make_client(paths=(scans["q90"],), tile_encoding="reencoded")
    detail = light.get(f"/api/slides/{sid}").json()
    assert detail["tile_encoding"] == "reencoded"
    for name in ("native_dzi", "dzi"):
        url = httpx.URL(detail[name])
        assert url.params["encoding"] == "reencoded", detail[name]
        assert light.get(detail[name]).status_code == 200
    with pytest.raises(ValueError, match="tile_encoding"):
        validate(Settings(tile_encoding="webp"))


@pytest.mark.browser
def test_the_viewer_asks_for_the_encoding_it_is_given(
    page: Any, live_server: Any, scans: dict[str, Path]
) -> None:
    """The server's choice by default, the page's ?encoding= over it, and the side panel's
    link switches while keeping the view."""
    osd_installed()
    base = live_server(scans["q90"].parent, tile_encoding="reencoded")
    sid = slides_of(base)["q90.svs"]["id"]
    tiles: list[str] = []
    page.on("request", lambda r: tiles.append(r.url) if "_files/" in r.url else None)

    open_viewer(page, f"{base}/view/{sid}?x=1024&y=768&z=1")
    assert tiles and all("encoding=reencoded" in u for u in tiles), tiles[:3]
    assert page.evaluate(PINK)["pink"] > 0.05  # tissue drawn from re-encoded tiles
    assert "re-encoded" in page.inner_text("#tile-encoding")

    tiles.clear()
    with page.expect_navigation():
        page.click("#encoding-switch")
    page.wait_for_function("() => window.wsiViewer && wsiViewer.world.getItemCount() > 0"
                           " && wsiViewer.world.getItemAt(0).getFullyLoaded()")
    assert "encoding=stored" in page.url and "x=1024" in page.url
    assert tiles and all("encoding=stored" in u for u in tiles), tiles[:3]
    assert "as scanned" in page.inner_text("#tile-encoding")
    assert page.evaluate(PINK)["pink"] > 0.05


def test_warming_fills_the_encoding_the_viewer_asks_for(
    make_client: Any, scans: dict[str, Path]
) -> None:
    client = make_client(paths=(scans["q90"],), tile_encoding="reencoded")
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    report = client.post(f"/api/slides/{sid}/warm?levels={LEVEL0 + 1}")
    assert report.status_code == 200, report.text
    assert report.json()["sources"].get("rendered", 0) > 0
    url = f"/slides/{sid}/native_files/{LEVEL0}/3_2.jpeg"
    assert client.get(url + "?encoding=reencoded").headers["x-tile-source"] == "memory"
