"""What the fuzzed corpus found (``tests/test_fuzz.py``), one damaged slide per finding:
each is served as a JSON 422 (``unreadable_slide``) at the reader boundary, never a 500,
and the rest of the slide stays served."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from starlette.testclient import TestClient

from sample_slides import write_generic_tiff, write_svs_like
from tests.conftest import real_slide
from wsi_server.app import create_app
from wsi_server.errors import UnreadableSlide
from wsi_server.readers import LevelInfo, ReaderRegistry, SlideMetadata, check_metadata
from wsi_server.settings import Settings


def _only_slide(client: Any) -> dict[str, Any]:
    (slide,) = client.get("/api/slides").json()["slides"]
    return dict(slide)


def _unreadable(r: Any) -> None:
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.json()["error"] == "unreadable_slide"


def _page_data(path: Path, match: str) -> tuple[int, int]:
    """(offset, byte count) of the first strip/tile of the page whose description has
    ``match`` (or of page ``int(match)``)."""
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        page = pages[int(match)] if match.isdigit() else next(
            p for p in pages if match in (p.description or ""))  # type: ignore[union-attr]
        return int(page.dataoffsets[0]), int(page.databytecounts[0])  # type: ignore[union-attr]


def _smash(path: Path, offset: int, length: int, fill: bytes = b"\x00") -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(fill * length)


def test_damaged_tiff_label_is_422_and_the_slide_is_still_served(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    path = tmp_path / "label.svs"
    shutil.copy(synthetic_slides["aperio-rgb"], path)
    offset, count = _page_data(path, "label")  # LZW: a damaged strip fails to decode
    _smash(path, offset + count // 4, count // 2, b"\xa5")
    client = make_client(paths=(path,))
    sid = _only_slide(client)["id"]
    _unreadable(client.get(f"/api/slides/{sid}/associated/label"))
    assert client.get(f"/api/slides/{sid}/associated/macro").status_code == 200
    assert client.get(f"/slides/{sid}_files/11/1_1.jpeg").status_code == 200


def test_damaged_openslide_macro_does_not_poison_the_slide(
    make_client: Any, tmp_path: Path
) -> None:
    """OpenSlide's errors are sticky: a failed read makes every later call on the handle
    fail. A damaged macro (or tile) must not make the slide's tiles unreadable."""
    path = tmp_path / "macro.ndpi"
    shutil.copy(real_slide("ndpi"), path)
    path.chmod(0o644)
    offset, count = _page_data(path, "4")  # the macro, JPEG
    _smash(path, offset + count // 2, 2000)
    client = make_client(paths=(path,))
    sid = _only_slide(client)["id"]
    tile = f"/slides/{sid}_files/12/1_1.jpeg"
    assert client.get(tile).status_code == 200
    _unreadable(client.get(f"/api/slides/{sid}/associated/macro"))
    assert client.get(f"/slides/{sid}_files/12/2_1.jpeg").status_code == 200
    assert client.get(f"/slides/{sid}/native_files/12/0_1.jpeg").status_code == 200


def test_damaged_openslide_tile_does_not_poison_the_slide(tmp_path: Path) -> None:
    """One damaged JPEG segment of an NDPI: the tiles over it are 422, the others (read
    after, on the same reader) still decode."""
    from wsi_server.readers.openslide_backend import OpenSlideReader

    path = tmp_path / "tile.ndpi"
    shutil.copy(real_slide("ndpi"), path)
    path.chmod(0o644)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]  # 608 restart-marker segments of 8 rows
        offset = int(page.dataoffsets[300])  # type: ignore[union-attr]
        count = int(page.databytecounts[300])  # type: ignore[union-attr]
    _smash(path, offset + 10, count - 20)
    reader = OpenSlideReader(path)
    try:
        with pytest.raises(UnreadableSlide):
            reader.read_region(0, 0, 2400, 256, 256)
        assert reader.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)
        assert reader.read_region(0, 3000, 4000, 256, 256).shape == (256, 256, 3)
    finally:
        reader.close()


def _tile_offsets(path: Path) -> tuple[int, str, list[int]]:
    """(file position of TileOffsets' values, struct format, the offsets) of page 0."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["TileOffsets"]  # type: ignore[union-attr]
        fmt = tif.byteorder + {4: "L", 16: "Q"}[int(tag.dtype)]
        return int(tag.valueoffset), fmt, [int(v) for v in tag.value]


def test_tile_offset_past_the_end_and_a_tile_that_is_no_jpeg_are_422(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    path = tmp_path / "tiles.svs"
    shutil.copy(synthetic_slides["aperio-rgb"], path)
    at, fmt, offsets = _tile_offsets(path)
    cols = -(-3000 // 256)
    with open(path, "r+b") as fh:
        fh.seek(at + (cols + 1) * struct.calcsize(fmt))  # tile (1, 1): far past the end
        fh.write(struct.pack(fmt, path.stat().st_size + 10**6))
        fh.seek(offsets[2])  # tile (2, 0): its bytes no longer start a JPEG
        fh.write(b"\x00" * 64)
    client = make_client(paths=(path,))
    sid = _only_slide(client)["id"]
    native = f"/slides/{sid}/native_files/12"
    _unreadable(client.get(f"{native}/1_1.jpeg"))  # passthrough read past the end
    _unreadable(client.get(f"{native}/2_0.jpeg"))  # passthrough of bytes that are no JPEG
    _unreadable(client.get(f"/slides/{sid}_files/12/1_1.jpeg"))  # rendered from it
    assert client.get(f"{native}/0_0.jpeg").status_code == 200
    assert client.get(f"{native}/3_3.jpeg").status_code == 200


def test_a_level_whose_tile_count_disagrees_with_its_size_is_refused(
    tmp_path: Path,
) -> None:
    from wsi_server.readers.tiff import TiffBackend

    path = write_generic_tiff(tmp_path / "dims.tiff", 600, 400, tile=128, downsamples=(1,),
                              compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["ImageWidth"]  # type: ignore[union-attr]
        at, fmt = int(tag.valueoffset), tif.byteorder + {3: "H", 4: "L"}[int(tag.dtype)]
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack(fmt, 60000))  # 469 tiles a row, with 5 stored
    with pytest.raises(UnreadableSlide):
        TiffBackend().open(path)


def test_zarr_chunk_past_its_shard_and_damaged_associated_image_are_422(
    make_client: Any, tmp_path: Path, synthetic_slides: dict[str, Path]
) -> None:
    import google_crc32c

    from wsi_server.convert import convert_slide

    store = tmp_path / "s.zarr"
    convert_slide(synthetic_slides["aperio-rgb"], store)
    shard = store / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    meta = json.loads((store / "0" / "zarr.json").read_text())
    s = (meta["chunk_grid"]["configuration"]["chunk_shape"][0]
         // meta["codecs"][0]["configuration"]["chunk_shape"][0])
    n = s * s * 16
    entries = np.frombuffer(bytes(data[:n]), "<u8").reshape(s, s, 2).copy()
    entries[1, 1, 1] = 2**62  # chunk (1, 1): a length past the end of the shard
    body = entries.astype("<u8").tobytes()
    data[:n + 4] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    label = store / "associated" / "label" / "c" / "0" / "0" / "0"
    label.write_bytes(label.read_bytes()[:100])
    client = make_client(paths=(store,))
    sid = _only_slide(client)["id"]
    _unreadable(client.get(f"/slides/{sid}/native_files/12/1_1.jpeg"))
    _unreadable(client.get(f"/api/slides/{sid}/associated/label"))
    assert client.get(f"/slides/{sid}/native_files/12/0_0.jpeg").status_code == 200
    assert client.get(f"/api/slides/{sid}/associated/macro").status_code == 200


class _HugeReader:
    """A slide that declares one enormous level and never expects to decode it."""

    def __init__(self, path: Path, levels: tuple[LevelInfo, ...]) -> None:
        self.path = path
        self.metadata = SlideMetadata("fake", None, levels, None, None, (), None)

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> Any:
        assert l_w * l_h <= 2**26, "a gigapixel read for one tile"
        return np.full((l_h, l_w, 3), 200, np.uint8)

    def read_scaled(self, *args: int) -> None:
        raise AssertionError("a gigapixel read for a thumbnail")

    def read_raw_tile(self, level: int, col: int, row: int) -> None:
        return None

    def associated_image(self, name: str) -> Any:
        raise KeyError(name)

    def close(self) -> None:
        pass


class _FakeBackend:
    name = "fake"
    priority = 1

    def __init__(self, levels: tuple[LevelInfo, ...]) -> None:
        self.levels = levels

    def can_open(self, path: Path) -> bool:
        return path.suffix == ".fake"

    def open(self, path: Path) -> _HugeReader:
        return _HugeReader(path, self.levels)


def _fake_client(tmp_path: Path, levels: tuple[LevelInfo, ...]) -> TestClient:
    (tmp_path / "x.fake").write_bytes(b"x")
    settings = Settings(paths=(tmp_path / "x.fake",), rescan_seconds=0,
                        state_dir=tmp_path / "state", isolate_open=False)  # the fake is ours
    return TestClient(create_app(settings, registry=ReaderRegistry([_FakeBackend(levels)])))


def test_huge_single_level_slide_is_422_not_a_gigapixel_decode(tmp_path: Path) -> None:
    with _fake_client(tmp_path, (LevelInfo(2**31 - 1, 715, 1.0, (256, 256)),)) as client:
        sid = _only_slide(client)["id"]
        assert client.get(f"/slides/{sid}_files/31/0_0.jpeg").status_code == 200  # fine
        _unreadable(client.get(f"/slides/{sid}_files/8/0_0.jpeg"))  # coarse: whole slide
        _unreadable(client.get(f"/api/slides/{sid}/thumbnail"))


def test_a_level_larger_than_the_one_before_is_no_pyramid(tmp_path: Path) -> None:
    bad = (LevelInfo(1000, 800, 1.0, None), LevelInfo(10**6, 400, 0.001, None))
    with pytest.raises(UnreadableSlide):
        check_metadata(SlideMetadata("fake", None, bad, None, None, (), None))
    with _fake_client(tmp_path, bad) as client:
        slide = _only_slide(client)
        assert slide["status"] == "error"
        assert slide["error"]["error"] == "unreadable_slide"
        _unreadable(client.get(f"/slides/{slide['id']}.dzi"))


def test_dicom_fragment_length_past_the_end_is_not_passed_through(tmp_path: Path) -> None:
    from wsi_server.readers.dicom import DicomReader

    folder = tmp_path / "dicom"
    shutil.copytree(real_slide("dicom"), folder)
    (inst,) = folder.iterdir()
    inst.chmod(0o644)
    reader = DicomReader(folder)  # libdicom refuses such a file: damage it once open
    item = reader._frames[0].offsets[0]  # the item header of frame (0, 0)
    with open(inst, "r+b") as fh:
        fh.seek(item + 4)
        fh.write(struct.pack("<L", 0xFFFFFFF0))
    try:
        assert reader.read_raw_tile(0, 0, 0) is None
        assert reader.read_raw_tile(0, 1, 0) is not None
    finally:
        reader.close()


def test_damaged_slides_with_a_jpeg_svs_seed(tmp_path: Path) -> None:
    """The corpus generator damages what it is told to: a header overwrite changes the
    first bytes or an IFD, a truncation shortens the file."""
    from sample_slides.fuzz import Seed, write_corpus

    seed = write_svs_like(tmp_path / "s.svs", 600, 400, downsamples=(1, 4))
    cases = write_corpus(tmp_path / "c", {"s": Seed("svs", seed)}, 7)
    sizes = {c.mutation: c.path.stat().st_size for c in cases}
    assert sizes["truncate"] < seed.stat().st_size
    assert all(c.path.read_bytes() != seed.read_bytes() for c in cases)
