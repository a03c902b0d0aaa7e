"""One contract for every SlideReader backend, run on the same slides, with OpenSlide as
the reference for metadata and pixels."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from tests.conftest import real_slide
from wsi_server.errors import UnreadableSlide, UnsupportedSlide
from wsi_server.readers import SlideReader, default_registry
from wsi_server.readers.dicom import DicomBackend
from wsi_server.readers.openslide_backend import OpenSlideBackend, openslide_target
from wsi_server.readers.tiff import TiffBackend

BACKENDS: dict[str, Callable[[Path], SlideReader]] = {
    "tifffile": TiffBackend().open,
    "openslide": OpenSlideBackend().open,
    "dicom": DicomBackend().open,
}
# (slide, backend) pairs: every slide through OpenSlide, and through each native backend
CASES = [
    ("aperio-rgb", "tifffile"), ("aperio-rgb", "openslide"),
    ("aperio-ycbcr", "tifffile"), ("aperio-ycbcr", "openslide"),
    ("aperio-j2k-ycbcr", "tifffile"), ("aperio-j2k-ycbcr", "openslide"),
    ("aperio-j2k-rgb", "tifffile"), ("aperio-j2k-rgb", "openslide"),
    ("generic", "tifffile"), ("generic", "openslide"),
    ("odd", "tifffile"), ("odd", "openslide"),
    ("real:svs", "tifffile"), ("real:svs", "openslide"),
    ("real:ndpi", "openslide"),
    ("real:dicom", "dicom"), ("real:dicom", "openslide"),
]


def _path(name: str, synthetic_slides: dict[str, Path]) -> Path:
    return real_slide(name[5:]) if name.startswith("real:") else synthetic_slides[name]


def _reference_region(
    osr: openslide.OpenSlide, level: int, l0: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    tile = osr.read_region(l0, level, size)
    colour = "#" + osr.properties.get("openslide.background-color", "ffffff")
    bg = Image.new("RGB", tile.size, colour)
    return np.asarray(Image.composite(tile, bg, tile)).astype(np.int16)


def _stores_jpeg(path: Path) -> bool:
    if path.is_dir():  # the DICOM test series is JPEG baseline
        return True
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return int(tif.pages[0].compression) == 7  # type: ignore[union-attr]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(params=CASES, ids=[f"{s}-{b}" for s, b in CASES])
def case(
    request: pytest.FixtureRequest, synthetic_slides: dict[str, Path]
) -> tuple[SlideReader, openslide.OpenSlide]:
    slide, backend = request.param
    path = _path(slide, synthetic_slides)
    reader = BACKENDS[backend](path)
    osr = openslide.OpenSlide(openslide_target(path))
    request.addfinalizer(reader.close)
    request.addfinalizer(osr.close)
    return reader, osr


def test_metadata_matches_openslide(case: tuple[SlideReader, openslide.OpenSlide]) -> None:
    reader, osr = case
    meta = reader.metadata
    assert [(lv.width, lv.height) for lv in meta.levels] == list(osr.level_dimensions)
    assert [lv.downsample for lv in meta.levels] == pytest.approx(osr.level_downsamples)
    mpp_x = osr.properties.get("openslide.mpp-x")
    if mpp_x:
        assert meta.mpp is not None
        assert meta.mpp[0] == pytest.approx(float(mpp_x))
    else:
        assert meta.mpp is None
    power = osr.properties.get("openslide.objective-power")
    assert meta.objective_power == (pytest.approx(float(power)) if power else None)
    assert set(meta.associated) == set(osr.associated_images)
    tw = osr.properties.get("openslide.level[0].tile-width")
    assert meta.tile_size == ((int(tw), int(osr.properties["openslide.level[0].tile-height"]))
                              if tw else None)


def test_regions_match_openslide(case: tuple[SlideReader, openslide.OpenSlide]) -> None:
    reader, osr = case
    rng = np.random.default_rng(0)
    for level, (w, h) in enumerate(osr.level_dimensions):
        ds = osr.level_downsamples[level]
        for _ in range(4):
            size = (int(rng.integers(1, min(w, 700) + 1)), int(rng.integers(1, min(h, 700) + 1)))
            l_x = int(rng.integers(0, max(1, w - size[0] + 1)))
            l_y = int(rng.integers(0, max(1, h - size[1] + 1)))
            l0 = (int(l_x * ds), int(l_y * ds))
            ours = reader.read_region(level, *l0, *size)
            assert ours.dtype == np.uint8 and ours.shape == (size[1], size[0], 3)
            assert _mad(ours, _reference_region(osr, level, l0, size)) <= 1.0


def test_region_past_the_edge_is_background(
    case: tuple[SlideReader, openslide.OpenSlide],
) -> None:
    reader, osr = case
    w, h = osr.level_dimensions[0]
    ours = reader.read_region(0, w - 10, h - 10, 50, 40)
    ref = _reference_region(osr, 0, (w - 10, h - 10), (50, 40))
    assert _mad(ours, ref) <= 1.0
    assert (ours[20:, 20:] == reader.metadata.background).all()
    outside = reader.read_region(0, w + 100, h + 100, 8, 8)
    assert (outside == reader.metadata.background).all()


def test_raw_tiles_are_complete_jpegs_with_true_colour(
    case: tuple[SlideReader, openslide.OpenSlide],
) -> None:
    """A passthrough tile, decoded by an ordinary JPEG decoder (as a browser would),
    shows the same pixels as OpenSlide reads there."""
    reader, osr = case
    found = 0
    for level, info in enumerate(reader.metadata.levels):
        if info.tile_size is None:
            continue
        tw, th = info.tile_size
        for col, row in [(0, 0), (1, 1), (info.width // tw - 1, info.height // th - 1)]:
            raw = reader.read_raw_tile(level, col, row)
            if raw is None:
                continue
            found += 1
            assert raw.media_type == "image/jpeg"
            decoded = np.asarray(Image.open(io.BytesIO(raw.data)).convert("RGB"))
            ds = info.downsample
            l0 = (int(col * tw * ds), int(row * th * ds))
            assert _mad(decoded, _reference_region(osr, level, l0, raw.size)) <= 1.5
    passthrough_expected = type(reader).__name__ in ("TiffReader", "DicomReader")
    assert (found > 0) == (passthrough_expected and _stores_jpeg(reader.path))


def test_edge_tiles_are_not_passed_through(
    case: tuple[SlideReader, openslide.OpenSlide],
) -> None:
    reader, _ = case
    info = reader.metadata.levels[0]
    if info.tile_size is None:
        return
    tw, th = info.tile_size
    if info.width % tw:
        assert reader.read_raw_tile(0, info.width // tw, 0) is None
    if info.height % th:
        assert reader.read_raw_tile(0, 0, info.height // th) is None


def test_associated_images_match(case: tuple[SlideReader, openslide.OpenSlide]) -> None:
    reader, osr = case
    for name in reader.metadata.associated:
        ours = reader.associated_image(name)
        img = osr.associated_images[name]
        ref = np.asarray(Image.composite(img, Image.new("RGB", img.size, "white"), img))
        assert _mad(ours, ref) <= 1.0


def test_reads_are_thread_safe(case: tuple[SlideReader, openslide.OpenSlide]) -> None:
    reader, osr = case
    w, h = osr.level_dimensions[0]
    spots = [((i * 97) % max(1, w - 300), (i * 61) % max(1, h - 300)) for i in range(24)]
    serial = [reader.read_region(0, x, y, 300, 300) for x, y in spots]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = reader.read_region(0, *spots[i], 300, 300)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(spots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        assert np.array_equal(results[i], expected)


def test_scaled_reads_approximate_full_reads(synthetic_slides: dict[str, Path]) -> None:
    reader = TiffBackend().open(synthetic_slides["aperio-rgb"])
    full = reader.read_region(0, 512, 512, 1024, 1024)
    for factor in (2, 4, 8):
        scaled = reader.read_scaled(0, 512, 512, 1024, 1024, factor)
        assert scaled is not None and scaled.shape == (1024 // factor, 1024 // factor, 3)
        area_mean = full.reshape(1024 // factor, factor, 1024 // factor, factor, 3).mean((1, 3))
        assert _mad(scaled, area_mean) <= 3.0


# -- the registry and bad input -------------------------------------------------------------

def test_registry_prefers_tifffile_for_svs_and_openslide_for_ndpi(
    synthetic_slides: dict[str, Path],
) -> None:
    registry = default_registry()
    assert type(registry.open(synthetic_slides["aperio-rgb"])).__name__ == "TiffReader"
    assert type(registry.open(synthetic_slides["generic"])).__name__ == "TiffReader"
    assert type(registry.open(real_slide("ndpi"))).__name__ == "OpenSlideReader"
    assert type(registry.open(real_slide("dicom"))).__name__ == "DicomReader"


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "empty.svs": b"",
        "truncated.svs": data[: len(data) // 3],
        "header-only.svs": data[:4096],
        "garbage.svs": bytes(range(256)) * 64,
        "notes.tiff": b"this is not a tiff file\n" * 10,
        "fake.ndpi": b"II*\x00" + b"\x00" * 100,
    }
    out = {}
    for name, content in files.items():
        p = tmp_path / name
        p.write_bytes(content)
        out[name] = p
    return out


def test_bad_files_raise_clear_errors(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    registry = default_registry()
    for name, path in _bad_files(tmp_path, synthetic_slides["aperio-rgb"]).items():
        try:
            reader = registry.open(path)
        except (UnsupportedSlide, UnreadableSlide) as exc:
            assert exc.detail and str(path) not in exc.detail, name
            continue
        # A truncated file may still open (its directory is intact): reads must then fail
        # cleanly or give background where the data is missing, never crash.
        meta = reader.metadata
        try:
            reader.read_region(0, 0, 0, min(meta.width, 512), min(meta.height, 512))
            reader.read_region(
                0, meta.width - 256, meta.height - 256, 256, 256
            )
        except (UnreadableSlide, UnsupportedSlide):
            pass


def test_decoded_tile_memory_is_one_budget_for_all_open_slides(
    synthetic_slides: dict[str, Path],
) -> None:
    backend = TiffBackend(decoded_cache_bytes=2 * 2**20)
    readers = [backend.open(synthetic_slides[n]) for n in ("aperio-rgb", "generic", "odd")]
    for reader in readers * 2:
        w, h = reader.metadata.width, reader.metadata.height
        reader.read_region(0, 0, 0, w, h)
    assert 0 < backend.decoded._bytes <= 2 * 2**20
    # still correct after evictions: a re-read equals a read from a fresh backend
    again = readers[0].read_region(0, 100, 100, 600, 400)
    fresh = TiffBackend().open(synthetic_slides["aperio-rgb"]).read_region(0, 100, 100, 600, 400)
    assert np.array_equal(again, fresh)


def test_closed_tiff_readers_do_not_wait_for_a_full_collection(
    synthetic_slides: dict[str, Path],
) -> None:
    """The reader pool opens and evicts readers all day. tifffile's objects form reference
    cycles; a reader that kept its TiffFile for its life had it promoted to the oldest GC
    generation, so once evicted it waited for a rare full collection (~140 MB of them in
    the soak). A closed reader must go with the young collections that run all the time."""
    import gc

    import tifffile

    def files() -> int:
        return sum(isinstance(o, tifffile.TiffFile) for o in gc.get_objects())

    backend = TiffBackend()
    path = synthetic_slides["aperio-rgb"]
    gc.collect()
    before = files()
    for _ in range(10):
        reader = backend.open(path)
        assert reader.read_raw_tile(0, 1, 1) is not None
        assert reader.read_region(0, 0, 0, 300, 300).shape == (300, 300, 3)
        gc.collect()  # the reader has lived a while: what it holds is in the oldest generation
        reader.close()
        del reader
        gc.collect(1)  # the young collections
    assert files() - before == 0


def test_associated_images_come_from_the_file_the_reader_opened(
    tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    """A slide replaced in place (a new file renamed over the path): a reader still open
    on the old file reads the old file's label, never half of each."""
    import os
    import shutil

    from sample_slides import write_svs_like

    path = tmp_path / "slide.svs"
    shutil.copy(synthetic_slides["aperio-rgb"], path)
    reader = TiffBackend().open(path)
    try:
        label = reader.associated_image("label")
        other = write_svs_like(tmp_path / ".new.svs", 1500, 1000, seed=7)
        os.replace(other, path)
        assert np.array_equal(reader.associated_image("label"), label)
        assert reader.associated_image("macro").ndim == 3
    finally:
        reader.close()
