"""Tiles served over HTTP against openslide-python's DeepZoomGenerator on the same file,
in the default geometry (254/1) and on the native grid, for real and synthetic slides."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from tests.conftest import real_slide
from wsi_server.geometry import native_tile_size
from wsi_server.readers.openslide_backend import openslide_target

SLIDES = [
    "real:svs", "real:ndpi", "real:dicom", "aperio-rgb", "aperio-ycbcr", "aperio-j2k-ycbcr",
    "generic", "odd",
]


def _path(name: str, synthetic_slides: dict[str, Path]) -> Path:
    return real_slide(name[5:]) if name.startswith("real:") else synthetic_slides[name]


def _addresses(tiles: tuple[int, int], rng: random.Random) -> list[tuple[int, int]]:
    cols, rows = tiles
    picks = {(0, 0), (cols - 1, rows - 1), (cols - 1, 0), (0, rows - 1)}
    picks |= {(rng.randrange(cols), rng.randrange(rows)) for _ in range(3)}
    return sorted(picks)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("slide", SLIDES)
@pytest.mark.parametrize("geometry", ["default", "native"])
def test_tiles_match_deepzoomgenerator(
    slide: str, geometry: str, synthetic_slides: dict[str, Path], make_client: Any
) -> None:
    path = _path(slide, synthetic_slides)
    client = make_client(paths=(path,))
    (summary,) = client.get("/api/slides").json()["slides"]
    sid = summary["id"]
    osr = openslide.OpenSlide(openslide_target(path))
    if geometry == "default":
        dzg = DeepZoomGenerator(osr, 254, 1, False)
        base = f"/slides/{sid}_files"
        dzi = client.get(f"/slides/{sid}.dzi").text
    else:
        tw = osr.properties.get("openslide.level[0].tile-width")
        th = osr.properties.get("openslide.level[0].tile-height")
        size = native_tile_size((int(tw), int(th)) if tw and th else None)
        dzg = DeepZoomGenerator(osr, size, 0, False)
        base = f"/slides/{sid}/native_files"
        dzi = client.get(f"/slides/{sid}/native.dzi").text
    assert dzi == dzg.get_dzi("jpeg")
    rng = random.Random(slide)
    for level in range(dzg.level_count):
        for col, row in _addresses(dzg.level_tiles[level], rng):
            ref = np.asarray(dzg.get_tile(level, (col, row))).astype(np.int16)
            png = client.get(f"{base}/{level}/{col}_{row}.png")
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            ours = _decode(png.content)
            assert ours.shape == ref.shape, (level, col, row)
            assert np.abs(ours - ref).mean() <= 3.0, (level, col, row)
            jpeg = client.get(f"{base}/{level}/{col}_{row}.jpeg")
            assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
            ours_jpeg = _decode(jpeg.content)
            assert ours_jpeg.shape == ref.shape
            # Within codec tolerance: our JPEG is no further from the true pixels than the
            # reference tile encoded as JPEG q75 (what OpenSlide's example server sends),
            # plus the PNG tolerance. Tiles of a few pixels are one chroma block: PNG only.
            if min(ref.shape[:2]) >= 16:
                buf = io.BytesIO()
                dzg.get_tile(level, (col, row)).save(buf, "jpeg", quality=75)
                ref_loss = np.abs(_decode(buf.getvalue()) - ref).mean()
                assert np.abs(ours_jpeg - ref).mean() <= ref_loss + 3.0, (level, col, row)
        past = dzg.level_tiles[level]
        assert client.get(f"{base}/{level}/{past[0]}_0.jpeg").status_code == 404
    assert client.get(f"{base}/{dzg.level_count}/0_0.jpeg").status_code == 404
    osr.close()


def _stored_tile_bytes(path: Path, index: int) -> bytes:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        with open(path, "rb") as f:
            f.seek(page.dataoffsets[index])
            return f.read(page.databytecounts[index])


@pytest.mark.parametrize("slide", ["real:svs", "aperio-rgb", "generic"])
def test_native_full_resolution_tiles_pass_through(
    slide: str, synthetic_slides: dict[str, Path], make_client: Any
) -> None:
    path = _path(slide, synthetic_slides)
    client = make_client(paths=(path,))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    detail = client.get(f"/api/slides/{sid}").json()
    tile = detail["native_tile_size"]
    cols = detail["width"] // tile
    dzi_levels = len(DeepZoomGenerator(openslide.OpenSlide(path), tile, 0).level_tiles)
    top = dzi_levels - 1
    r = client.get(f"/slides/{sid}/native_files/{top}/1_1.jpeg")
    assert r.headers["x-tile-source"] == "passthrough"
    stored = _stored_tile_bytes(path, 1 * cols + 1 + (detail["width"] % tile > 0))
    # the scan data of the stored tile is sent unchanged, after the merged tables
    assert r.content.endswith(stored[2:])
    # the partial tile at the right edge is cropped, hence rendered
    if detail["width"] % tile:
        edge = client.get(f"/slides/{sid}/native_files/{top}/{cols}_0.jpeg")
        assert edge.headers["x-tile-source"] == "rendered"
        assert _decode(edge.content).shape[1] == detail["width"] % tile


def test_dicom_frames_pass_through(make_client: Any) -> None:
    import pydicom
    from pydicom.encaps import generate_frames

    path = real_slide("dicom")
    client = make_client(paths=(path,))
    sid = client.get("/api/slides").json()["slides"][0]["id"]
    ds = pydicom.dcmread(next(path.glob("*.dcm")))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    top = DeepZoomGenerator(openslide.OpenSlide(next(path.glob("*.dcm"))), 256, 0).level_count - 1
    r = client.get(f"/slides/{sid}/native_files/{top}/1_1.jpeg")
    assert r.headers["x-tile-source"] == "passthrough"
    assert r.content == frames[cols + 1].rstrip(b"\x00")
