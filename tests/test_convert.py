"""``wsi-server convert``: levels, pixels, metadata, sharding, serving, interruption."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from sample_slides import write_generic_tiff, write_svs_like
from tests.conftest import real_slide
from wsi_server.cli import main
from wsi_server.convert import (
    ConvertOptions,
    Plan,
    convert_slide,
    downsample2,
    pyramid_dims,
    temp_path,
)
from wsi_server.errors import BadRequest, UnreadableSlide
from wsi_server.geometry import GeometryParams, deep_zoom
from wsi_server.library import find_slides
from wsi_server.readers import ReaderRegistry, SlideReader, default_registry
from wsi_server.readers.base import RawTile
from wsi_server.readers.zarr_backend import ZarrBackend, is_complete_store
from wsi_server.zarr_codecs import encode_jpeg


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _source_level0(path: Path) -> np.ndarray:
    reader = default_registry().open(path)
    try:
        return reader.read_region(0, 0, 0, reader.metadata.width, reader.metadata.height)
    finally:
        reader.close()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- pure parts ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1001, 517), (256, 256), (257, 3), (24000, 18000), (5, 4000)])
@pytest.mark.parametrize("tile", [128, 240, 256])
def test_levels_are_the_deep_zoom_levels_down_to_one_tile(size: tuple[int, int], tile: int) -> None:
    dims = pyramid_dims(*size, tile)
    geom = deep_zoom(
        default_pyramid(size), GeometryParams(tile_size=tile, overlap=0, limit_bounds=False)
    )
    z_from_full = list(reversed(geom.z_dimensions))
    assert list(dims) == z_from_full[: len(dims)]
    assert max(dims[-1]) <= tile
    assert len(dims) == 1 or max(dims[-2]) > tile


def default_pyramid(size: tuple[int, int]) -> Any:
    from wsi_server.geometry import Pyramid

    return Pyramid(l_dimensions=(size,), l0_l_downsamples=(1.0,))


def test_downsample_is_the_area_average_of_what_exists() -> None:
    rng = np.random.default_rng(4)
    for h, w in [(7, 9), (8, 8), (1, 5), (6, 1)]:
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = downsample2(src)
        assert out.shape == (math.ceil(h / 2), math.ceil(w / 2), 3)
        for y in range(out.shape[0]):
            for x in range(out.shape[1]):
                box = src[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].reshape(-1, 3).astype(float)
                expected = np.floor(box.mean(axis=0) + 0.5)
                assert np.array_equal(out[y, x], expected), (h, w, y, x)


def test_shards_hold_many_tiles() -> None:
    plan = Plan.of(100_000, 80_000, 256)
    level0 = math.ceil(391 / plan.shard_tiles[0]) * math.ceil(313 / plan.shard_tiles[0])
    total = sum(
        math.ceil(c / s) * math.ceil(r / s)
        for (c, r), s in zip((plan.grid(k) for k in range(len(plan.dims))), plan.shard_tiles,
                             strict=True)
    )
    assert plan.tile_count() > 160_000
    assert level0 <= 200 and total <= 300


# -- synthetic slides ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("convert-src")
    write_svs_like(d / "odd.svs", 1537, 1029, tile=256, downsamples=(1, 4))
    write_generic_tiff(d / "odd.tiff", 1001, 517, tile=128, downsamples=(1, 3),
                       compression="zlib", photometric="rgb")
    return {p.name: p for p in d.iterdir()}


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
@pytest.mark.parametrize("name", ["odd.svs", "odd.tiff"])
def test_pixels_levels_and_plain_zarr(
    odd_slides: dict[str, Path], tmp_path: Path, codec: str, name: str
) -> None:
    src = odd_slides[name]
    dest = tmp_path / "out.zarr"
    result = convert_slide(src, dest, ConvertOptions(codec=codec))  # type: ignore[arg-type]
    source = _source_level0(src)
    group = zarr.open_group(dest, mode="r")
    meta = default_registry().open(src).metadata
    tile = meta.levels[0].tile_size
    assert tile is not None
    assert result.levels == pyramid_dims(meta.width, meta.height, tile[0])
    arrays = [group[str(k)] for k in range(len(result.levels))]
    level0 = arrays[0][:]
    if codec == "zstd":
        assert np.array_equal(level0, source)
    else:
        assert _mad(level0, source) <= 2.0
    previous = level0
    for k, arr in enumerate(arrays[1:], start=1):
        assert arr.shape == (result.levels[k][1], result.levels[k][0], 3)
        assert arr.chunks == (tile[0], tile[0], 3)
        pixels = arr[:]
        expected = downsample2(previous)
        if codec == "zstd":
            assert np.array_equal(pixels, expected), k
        else:
            assert _mad(pixels, expected) <= 2.0, k
        previous = pixels


def test_metadata_associated_and_file_count(odd_slides: dict[str, Path], tmp_path: Path) -> None:
    src = odd_slides["odd.svs"]
    dest = tmp_path / "odd.zarr"
    result = convert_slide(src, dest)
    reader = default_registry().open(src)
    meta = reader.metadata
    group = zarr.open_group(dest, mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x", "c"]
    assert meta.mpp is not None
    for k, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(k)
        (scale,) = ds["coordinateTransformations"]
        assert scale["scale"] == pytest.approx([meta.mpp[1] * 2**k, meta.mpp[0] * 2**k, 1.0])
    attrs = group.attrs["wsi_server"]
    assert attrs["complete"] is True
    assert attrs["properties"] == meta.properties
    assert attrs["objective_power"] == meta.objective_power
    assert tuple(attrs["associated"]) == meta.associated and meta.associated
    for name in meta.associated:
        stored = group["associated"][name][:]  # type: ignore[index]
        assert np.array_equal(stored, reader.associated_image(name))
    shard_files = list(dest.glob("*/c/*/*/0"))
    assert len(shard_files) == len(result.levels)  # small levels: one shard each
    assert result.tiles > 2 * len(shard_files)


def test_plain_zarr_finds_the_codec_by_entry_point(
    odd_slides: dict[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "plain.zarr"
    convert_slide(odd_slides["odd.tiff"], dest)
    code = (
        "import sys, zarr; g = zarr.open_group(sys.argv[1], mode='r'); "
        "a = g['0'][:]; print(a.shape, int(a.mean()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("(517, 1001, 3)")


def test_existing_destination_is_never_touched(odd_slides: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "taken.zarr"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    with pytest.raises(BadRequest):
        convert_slide(odd_slides["odd.tiff"], dest)
    assert (dest / "mine.txt").read_text() == "user data"
    assert not temp_path(dest).exists()


# -- interruption --------------------------------------------------------------------------
class FailingReader:
    """A real reader whose ``read_region`` fails after ``budget`` calls (fault injection)."""

    def __init__(self, inner: SlideReader, budget: int) -> None:
        self.inner = inner
        self.path = inner.path
        self.metadata = inner.metadata
        self.budget = budget

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        self.budget -= 1
        if self.budget < 0:
            raise UnreadableSlide("injected fault: the source went away")
        return self.inner.read_region(level, l0_x, l0_y, l_w, l_h)

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        return self.inner.read_raw_tile(level, col, row)

    def read_scaled(self, *args: int) -> np.ndarray | None:
        return self.inner.read_scaled(*args)

    def associated_image(self, name: str) -> np.ndarray:
        return self.inner.associated_image(name)

    def close(self) -> None:
        self.inner.close()


class FailingBackend:
    name = "failing"
    priority = 0

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def can_open(self, path: Path) -> bool:
        return True

    def open(self, path: Path) -> SlideReader:
        return FailingReader(default_registry().open(path), self.budget)


def test_interrupted_conversion_is_never_served_and_resumes(
    odd_slides: dict[str, Path], tmp_path: Path, make_client: Any
) -> None:
    src = odd_slides["odd.svs"]
    options = ConvertOptions(tile_size=128, codec="zstd", shard_tiles=2, workers=1)
    reference = tmp_path / "ref" / "whole.zarr"
    reference.parent.mkdir()
    convert_slide(src, reference, options)

    library = tmp_path / "lib"
    library.mkdir()
    dest = library / "slide.zarr"
    with pytest.raises(UnreadableSlide):
        convert_slide(src, dest, options, registry=ReaderRegistry([FailingBackend(20)]))
    tmp = temp_path(dest)
    assert not dest.exists() and tmp.is_dir()
    assert list(tmp.glob("0/c/*/*/0")), "some shards were finished before the fault"
    assert not ZarrBackend().can_open(tmp) and not is_complete_store(tmp)
    assert list(find_slides(library)) == []
    client = make_client(paths=(library,))
    assert client.get("/api/slides").json()["slides"] == []

    result = convert_slide(src, dest, options)
    assert result.tiles_resumed > 0
    assert not tmp.exists() and is_complete_store(dest)
    assert not list(dest.rglob("*.partial")) and not (dest / "convert.json").exists()
    got, want = zarr.open_group(dest, mode="r"), zarr.open_group(reference, mode="r")
    for k in range(len(result.levels)):
        assert np.array_equal(got[str(k)][:], want[str(k)][:]), k  # type: ignore[index]


def test_rerun_with_other_options_restarts(odd_slides: dict[str, Path], tmp_path: Path) -> None:
    src = odd_slides["odd.svs"]
    dest = tmp_path / "slide.zarr"
    first = ConvertOptions(tile_size=128, codec="zstd", shard_tiles=2, workers=1)
    with pytest.raises(UnreadableSlide):
        convert_slide(src, dest, first, registry=ReaderRegistry([FailingBackend(20)]))
    result = convert_slide(src, dest, ConvertOptions(tile_size=256))
    assert result.tiles_resumed == 0
    assert _mad(zarr.open_group(dest, mode="r")["0"][:], _source_level0(src)) <= 2.0


# -- command line ----------------------------------------------------------------------------
def test_cli_converts_with_progress_and_summary(
    odd_slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "cli.zarr"
    assert main(["convert", str(odd_slides["odd.tiff"]), str(dest), "--codec", "zstd",
                 "--tile-size", "256", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "convert:" in err and "100.0%" in err and "Mpx/s" in err
    assert out.startswith("converted 1001x517 px")
    assert zarr.open_group(dest, mode="r").attrs["wsi_server"]["codec"] == "zstd"
    assert main(["convert", str(odd_slides["odd.tiff"]), str(dest)]) == 1
    assert json.loads(capsys.readouterr().err)["error"] == "bad_request"


# -- real slides, served -----------------------------------------------------------------------
def _native_levels(client: Any, sid: str) -> list[tuple[int, int, int]]:
    """(dz level, cols, rows) of the native grid."""
    dzi = client.get(f"/slides/{sid}/native.dzi").text
    tile = int(dzi.split('TileSize="')[1].split('"')[0])
    w = int(dzi.split('Width="')[1].split('"')[0])
    h = int(dzi.split('Height="')[1].split('"')[0])
    levels = []
    dims = [(w, h)]
    while dims[-1] != (1, 1):
        dims.append((max(1, -(-dims[-1][0] // 2)), max(1, -(-dims[-1][1] // 2))))
    for i, (lw, lh) in enumerate(dims):
        levels.append((len(dims) - 1 - i, -(-lw // tile), -(-lh // tile)))
    return levels


@pytest.mark.real_slides
@pytest.mark.parametrize("kind", ["svs", "ndpi", "dicom"])
def test_real_slides_convert_and_serve_like_the_source(
    kind: str, tmp_path: Path, make_client: Any
) -> None:
    src = real_slide(kind)
    dest = tmp_path / f"{kind}.zarr"
    result = convert_slide(src, dest)
    source_meta = default_registry().open(src).metadata
    reader = default_registry().open(dest)
    assert type(reader).__name__ == "ZarrReader"
    meta = reader.metadata
    assert (meta.width, meta.height) == (source_meta.width, source_meta.height)
    assert meta.mpp == source_meta.mpp and meta.objective_power == source_meta.objective_power
    assert meta.associated == source_meta.associated
    source0 = _source_level0(src)
    assert _mad(reader.read_region(0, 0, 0, meta.width, meta.height), source0) <= 2.0
    expected = [source0]  # the area-average pyramid of the source's own pixels
    while len(expected) < len(result.levels):
        expected.append(downsample2(expected[-1]))

    store_client = make_client(paths=(dest,))
    source_client = make_client(paths=(src,))
    (store_entry,) = store_client.get("/api/slides").json()["slides"]
    (source_entry,) = source_client.get("/api/slides").json()["slides"]
    assert store_entry["format"] == "zarr" and store_entry["width"] == source_entry["width"]
    levels = _native_levels(store_client, store_entry["id"])
    assert levels == _native_levels(source_client, source_entry["id"])
    sid, source_sid = store_entry["id"], source_entry["id"]
    t = meta.levels[0].tile_size[0]  # type: ignore[index]
    checked = 0
    for stored_level in range(len(result.levels)):
        dz, cols, rows = levels[stored_level]
        for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
            ours = store_client.get(f"/slides/{sid}/native_files/{dz}/{col}_{row}.jpeg")
            assert ours.status_code == 200
            raw = reader.read_raw_tile(stored_level, col, row)
            assert raw is not None and ours.content == raw.data  # the chunk, as stored
            theirs = source_client.get(f"/slides/{source_sid}/native_files/{dz}/{col}_{row}.png")
            a, b = _decode(ours.content), _decode(theirs.content)
            assert a.shape == b.shape, (dz, col, row)
            want = expected[stored_level][row * t : (row + 1) * t, col * t : (col + 1) * t]
            # as close to the area average as a q90 JPEG of it can be (copied level-0
            # tiles are exact; +1 for rounding carried through the levels)
            codec_error = _mad(_decode(encode_jpeg(want, 90)), want)
            assert _mad(a, want) <= min(codec_error + 1.0, 8.0), (dz, col, row)
            if stored_level == 0:
                assert _mad(a, b) <= 2.0, (dz, col, row)
            else:  # the source renders with Lanczos, we average: same colours and picture
                colour = np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0))
                assert colour.max() <= 2.0 and _mad(a, b) <= 16.0, (dz, col, row)
            checked += 1
    assert checked >= len(result.levels)


def test_convert_dir_serves_the_copy_under_the_original_id(
    odd_slides: dict[str, Path], tmp_path: Path, make_client: Any
) -> None:
    library = tmp_path / "lib"
    (library / "case").mkdir(parents=True)
    original = library / "case" / "odd.tiff"
    original.write_bytes(odd_slides["odd.tiff"].read_bytes())
    converted = tmp_path / "converted"
    before = make_client(paths=(library,), convert_dir=converted)
    (entry,) = before.get("/api/slides").json()["slides"]
    assert entry["format"] != "zarr"
    convert_slide(original, converted / "case" / "odd.tiff.zarr")
    after = make_client(paths=(library,), convert_dir=converted)
    (copy,) = after.get("/api/slides").json()["slides"]
    assert copy["id"] == entry["id"] and copy["name"] == "odd.tiff"
    assert copy["format"] == "zarr"
    tile = after.get(f"/slides/{copy['id']}/native_files/0/0_0.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
