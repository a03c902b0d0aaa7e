"""ZarrReader: the SlideReader contract on converted stores, chunk passthrough, one read."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sample_slides import write_svs_like
from wsi_server.convert import ConvertOptions, convert_slide, temp_path
from wsi_server.errors import UnreadableSlide
from wsi_server.readers import SlideReader, default_registry
from wsi_server.readers.zarr_backend import ZarrBackend, ZarrReader, shard_path


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zarr-reader")
    src = d / "src.svs"
    write_svs_like(src, 1300, 1100, tile=256, downsamples=(1, 4))
    convert_slide(src, d / "jpeg.zarr", ConvertOptions(shard_tiles=2))
    convert_slide(src, d / "zstd.zarr", ConvertOptions(codec="zstd"))
    return {"src": src, "jpeg": d / "jpeg.zarr", "zstd": d / "zstd.zarr"}


@pytest.fixture(params=["jpeg", "zstd"])
def reader(request: pytest.FixtureRequest, stores: dict[str, Path]) -> ZarrReader:
    r = ZarrBackend().open(stores[request.param])
    assert isinstance(r, SlideReader)
    return r


def test_registry_picks_the_zarr_backend(stores: dict[str, Path]) -> None:
    reader = default_registry().open(stores["jpeg"])
    assert isinstance(reader, ZarrReader)
    assert reader.metadata.format == "zarr"


def test_metadata_follows_the_source(reader: ZarrReader, stores: dict[str, Path]) -> None:
    src = default_registry().open(stores["src"]).metadata
    meta = reader.metadata
    assert (meta.width, meta.height) == (src.width, src.height)
    assert meta.mpp == src.mpp and meta.objective_power == src.objective_power
    assert meta.properties == src.properties and meta.associated == src.associated
    assert all(lv.tile_size == (256, 256) for lv in meta.levels)
    assert meta.levels[-1].width <= 256 and meta.levels[-1].height <= 256


def test_regions_match_the_source(reader: ZarrReader, stores: dict[str, Path]) -> None:
    src = default_registry().open(stores["src"])
    for x, y, w, h in [(0, 0, 300, 200), (1000, 900, 300, 200), (255, 255, 2, 2)]:
        assert _mad(reader.read_region(0, x, y, w, h), src.read_region(0, x, y, w, h)) <= 2.0


def test_region_past_the_edge_is_background(reader: ZarrReader) -> None:
    meta = reader.metadata
    out = reader.read_region(0, meta.width - 10, meta.height - 10, 40, 40)
    assert (out[20:, :] == 255).all() and (out[:, 20:] == 255).all()
    level = len(meta.levels) - 1
    ds = meta.levels[level].downsample
    far = reader.read_region(level, int(10_000 * ds), 0, 8, 8)
    assert (far == 255).all()


def test_raw_tiles_are_the_stored_jpeg_chunks_including_edges(stores: dict[str, Path]) -> None:
    reader = ZarrBackend().open(stores["jpeg"])
    for level, lv in enumerate(reader.metadata.levels):
        cols, rows = -(-lv.width // 256), -(-lv.height // 256)
        for col, row in {(0, 0), (cols - 1, rows - 1), (cols - 1, 0)}:
            raw = reader.read_raw_tile(level, col, row)
            assert raw is not None and raw.media_type == "image/jpeg"
            assert raw.data == reader.chunk_bytes(level, col, row)
            img = np.asarray(Image.open(io.BytesIO(raw.data)).convert("RGB"))
            assert (img.shape[1], img.shape[0]) == raw.size
            assert raw.size == (min(256, lv.width - col * 256), min(256, lv.height - row * 256))
            ds = lv.downsample
            region = reader.read_region(level, round(col * 256 * ds), round(row * 256 * ds),
                                        *raw.size)
            assert np.array_equal(img, region)
        assert reader.read_raw_tile(level, cols, 0) is None


def test_lossless_store_has_no_passthrough(stores: dict[str, Path]) -> None:
    assert ZarrBackend().open(stores["zstd"]).read_raw_tile(0, 0, 0) is None


def test_a_tile_is_one_ranged_read_once_its_shard_is_known(
    stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = ZarrBackend().open(stores["jpeg"])
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert reader.read_raw_tile(0, 0, 0) is not None
    assert len(reads) == 2  # the shard index (2x2 chunks), then the chunk
    reads.clear()
    for col, row in [(1, 0), (0, 1), (1, 1)]:  # same shard (2x2 tiles)
        raw = reader.read_raw_tile(0, col, row)
        assert raw is not None
    assert len(reads) == 3 and all(offset > 0 for _, offset in reads)


def test_scaled_reads_approximate_full_reads(stores: dict[str, Path]) -> None:
    reader = ZarrBackend().open(stores["jpeg"])
    full = reader.read_region(0, 0, 0, 512, 512)
    scaled = reader.read_scaled(0, 0, 0, 512, 512, 2)
    assert scaled is not None and scaled.shape == (256, 256, 3)
    box = full.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert _mad(scaled, box) <= 3.0
    assert ZarrBackend().open(stores["zstd"]).read_scaled(0, 0, 0, 512, 512, 2) is None


def test_associated_images_are_kept(reader: ZarrReader, stores: dict[str, Path]) -> None:
    src = default_registry().open(stores["src"])
    for name in src.metadata.associated:
        assert np.array_equal(reader.associated_image(name), src.associated_image(name))


def test_reads_are_thread_safe(reader: ZarrReader) -> None:
    expected = reader.read_region(0, 0, 0, 1300, 1100)
    errors: list[Any] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                x, y = (i * 97) % 1000, (i * 53) % 800
                got = reader.read_region(0, x, y, 300, 300)
                assert np.array_equal(got, expected[y : y + 300, x : x + 300])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_incomplete_or_foreign_stores_are_not_opened(tmp_path: Path) -> None:
    backend = ZarrBackend()
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                   "attributes": {}}))
    assert not backend.can_open(foreign)
    partial = temp_path(tmp_path / "x.zarr")
    partial.mkdir()
    (partial / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"wsi_server": {}}}))
    assert not backend.can_open(partial)
    assert not backend.can_open(tmp_path / "missing.zarr")


def test_a_damaged_shard_index_is_an_unreadable_slide(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["jpeg"], copy)
    shard = shard_path(copy, 0, 0, 0)
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = ZarrBackend().open(copy)
    with pytest.raises(UnreadableSlide):
        reader.read_raw_tile(0, 0, 0)
