"""Zarr backend: serves the multiscale stores that ``wsi-server convert`` writes.

Store layout (zarr v3, OME-NGFF 0.5 ``multiscales`` in the root group's ``ome`` attribute)::

    slide.zarr/zarr.json             group; attributes "ome" (NGFF) and "wsi_server"
    slide.zarr/{k}/zarr.json         level k: uint8 array (height, width, 3), dims y, x, c
    slide.zarr/{k}/c/{sy}/{sx}/0     one shard: S x S chunks of (T, T, 3) = the served tiles
    slide.zarr/associated/{name}/    label, macro, thumbnail: one zstd chunk each

Each level is sharded (``sharding_indexed``, index at the start of the shard file, index
codecs ``bytes`` + ``crc32c``); an inner chunk is one tile, stored as a complete JPEG
(codec ``wsi_server.jpeg``) or, when converted losslessly, as ``bytes`` + ``zstd``.

This reader does not go through zarr-python: it reads each level's ``zarr.json``, then a
tile is one ``os.pread`` of the chunk's byte range inside its shard file. The shard index
(``S*S*16 + 4`` bytes) is read once per shard and kept in a small LRU, so a tile costs one
ranged read once its shard has been touched. JPEG chunks pass through as they are stored:
edge chunks are stored as JPEGs of only the pixels inside the level, so every tile of the
native grid passes through, including the right and bottom edges.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import imagecodecs
import numpy as np

from wsi_server import codecs
from wsi_server.errors import UnreadableSlide, UnsupportedSlide
from wsi_server.geometry import level_downsamples
from wsi_server.readers import grid
from wsi_server.readers.base import (
    DECODE_ERRORS,
    MAX_DECODE_PIXELS,
    LevelInfo,
    RawTile,
    SlideMetadata,
)
from wsi_server.readers.tiff import DECODED_CACHE_BYTES, DecodedTiles

ATTRS_KEY = "wsi_server"
"""Root-group attribute with the slide's metadata; ``complete`` is set when it is whole."""
STORE_VERSION = 1
EMPTY = 2**64 - 1
_INDEX_CACHE = 512


def read_json(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = json.loads(f.read())
    if not isinstance(data, dict):
        raise ValueError("zarr.json is not an object")
    return data


def store_attributes(path: Path) -> dict[str, Any] | None:
    """The ``wsi_server`` attributes of a complete converted store, else None (cheap)."""
    try:
        root = read_json(path / "zarr.json")
    except (OSError, ValueError):
        return None
    attrs = (root.get("attributes") or {}).get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("complete") is not True:
        return None
    return attrs


def is_complete_store(path: Path) -> bool:
    return path.is_dir() and store_attributes(path) is not None


def shard_path(store: Path, level: int, sy: int, sx: int) -> Path:
    """Path of a shard file (zarr v3 default chunk key encoding, separator '/')."""
    return store / str(level) / "c" / str(sy) / str(sx) / "0"


def index_nbytes(shard_tiles: int) -> int:
    return shard_tiles * shard_tiles * 16 + 4


def parse_index(data: bytes, shard_tiles: int) -> np.ndarray:
    """(S, S, 2) uint64 (offset, length) per chunk from an encoded shard index."""
    body, crc = data[:-4], data[-4:]
    if len(data) != index_nbytes(shard_tiles) or (
        google_crc32c.value(body).to_bytes(4, "little") != crc
    ):
        raise UnreadableSlide("a shard index of the zarr store is damaged")
    return np.frombuffer(body, "<u8").reshape(shard_tiles, shard_tiles, 2)


def encode_index(index: np.ndarray) -> bytes:
    body = np.ascontiguousarray(index, "<u8").tobytes()
    return body + google_crc32c.value(body).to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class StoreLevel:
    width: int
    height: int
    tile: int
    shard_tiles: int
    codec: str
    """``jpeg`` or ``zstd``."""
    fill: int

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile)

    def tile_size(self, col: int, row: int) -> tuple[int, int]:
        t = self.tile
        return (min(t, self.width - col * t), min(t, self.height - row * t))


def level_from_json(meta: dict[str, Any]) -> StoreLevel:
    """The parameters of one level array, checked against what this reader handles."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise UnsupportedSlide("not a zarr v3 array")
    shape = meta["shape"]
    if meta.get("data_type") != "uint8" or len(shape) != 3 or shape[2] != 3:
        raise UnsupportedSlide("level is not an RGB uint8 array")
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    (codec,) = meta["codecs"]
    if codec["name"] != "sharding_indexed":
        raise UnsupportedSlide("level is not sharded")
    cfg = codec["configuration"]
    inner = cfg["chunk_shape"]
    if cfg.get("index_location") != "start" or inner[0] != inner[1] or outer[0] != outer[1]:
        raise UnsupportedSlide("unexpected shard layout")
    names = [c["name"] for c in cfg["codecs"]]
    if names == ["wsi_server.jpeg"]:
        kind = "jpeg"
    elif names == ["bytes", "zstd"]:
        kind = "zstd"
    else:
        raise UnsupportedSlide(f"chunk codecs {names} are not served")
    level = StoreLevel(
        width=int(shape[1]),
        height=int(shape[0]),
        tile=int(inner[0]),
        shard_tiles=int(outer[0]) // max(int(inner[0]), 1),
        codec=kind,
        fill=int(meta.get("fill_value", 255)),
    )
    if min(level.width, level.height, level.tile, level.shard_tiles) < 1:
        raise UnreadableSlide("a level of the zarr store declares an empty size or chunk")
    return level


def decode_chunk(lv: StoreLevel, data: bytes, col: int, row: int) -> np.ndarray:
    """Pixels of one chunk, cropped to the part inside the level."""
    w, h = lv.tile_size(col, row)
    if lv.codec == "jpeg":
        arr: np.ndarray = codecs.decode_jpeg(data)
        return arr[:h, :w]
    raw = imagecodecs.zstd_decode(data)
    full = np.frombuffer(raw, np.uint8).reshape(lv.tile, lv.tile, 3)
    return full[:h, :w]


class ZarrReader:
    """An open converted store. Thread-safe: reads are ``os.pread`` on fresh descriptors."""

    def __init__(self, path: Path, decoded: DecodedTiles | None = None) -> None:
        self.path = path
        attrs = store_attributes(path)
        if attrs is None:
            raise UnsupportedSlide("not a complete wsi-server zarr store")
        try:
            self._levels = [
                level_from_json(read_json(path / str(k) / "zarr.json"))
                for k in range(int(attrs["level_count"]))
            ]
            self.metadata = self._metadata(attrs)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise UnreadableSlide(f"the zarr store cannot be read ({type(exc).__name__})") from exc
        self._indexes: OrderedDict[tuple[int, int, int], np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()
        self._decoded = decoded or DecodedTiles(DECODED_CACHE_BYTES // 4)
        self._token = self._decoded.token()

    def _metadata(self, attrs: dict[str, Any]) -> SlideMetadata:
        dims = [(lv.width, lv.height) for lv in self._levels]
        infos = tuple(
            LevelInfo(lv.width, lv.height, d, (lv.tile, lv.tile))
            for lv, d in zip(self._levels, level_downsamples(dims), strict=True)
        )
        mpp = attrs.get("mpp")
        bounds = attrs.get("bounds")
        return SlideMetadata(
            format="zarr",
            vendor=attrs.get("vendor"),
            levels=infos,
            mpp=(float(mpp[0]), float(mpp[1])) if mpp else None,
            objective_power=attrs.get("objective_power"),
            associated=tuple(attrs.get("associated", ())),
            bounds=tuple(bounds) if bounds else None,
            background=tuple(attrs.get("background", (255, 255, 255))),
            properties=dict(attrs.get("properties", {})),
        )

    # -- chunks ----------------------------------------------------------------
    def _index(self, level: int, sy: int, sx: int) -> np.ndarray | None:
        key = (level, sy, sx)
        with self._lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
        n = index_nbytes(self._levels[level].shard_tiles)
        try:
            fd = os.open(shard_path(self.path, level, sy, sx), os.O_RDONLY)
        except FileNotFoundError:
            index = None
        else:
            try:
                index = parse_index(os.pread(fd, n, 0), self._levels[level].shard_tiles)
            finally:
                os.close(fd)
        with self._lock:
            self._indexes[key] = index
            while len(self._indexes) > _INDEX_CACHE:
                self._indexes.popitem(last=False)
        return index

    def chunk_bytes(self, level: int, col: int, row: int) -> bytes | None:
        """The stored bytes of one chunk (None when the store holds no such chunk)."""
        lv = self._levels[level]
        if not (0 <= col < lv.cols and 0 <= row < lv.rows):
            return None
        s = lv.shard_tiles
        index = self._index(level, row // s, col // s)
        if index is None:
            return None
        offset, length = (int(v) for v in index[row % s, col % s])
        if offset == EMPTY:
            return None
        try:
            fd = os.open(shard_path(self.path, level, row // s, col // s), os.O_RDONLY)
        except OSError as exc:
            raise UnreadableSlide("a shard of the zarr store cannot be opened") from exc
        try:
            if offset + length > os.fstat(fd).st_size:
                raise UnreadableSlide("a chunk of the zarr store lies past the end of its shard")
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise UnreadableSlide("a shard of the zarr store is truncated")
        return data

    def _decode(self, level: int, col: int, row: int, factor: int) -> np.ndarray | None:
        key = (self._token, level, row * self._levels[level].cols + col, factor)
        cached = self._decoded.get(key)
        if cached is not None:
            return cached
        data = self.chunk_bytes(level, col, row)
        if data is None:
            return None
        lv = self._levels[level]
        try:
            if factor == 1:
                arr = decode_chunk(lv, data, col, row)
            else:
                w, h = lv.tile_size(col, row)
                arr = codecs.decode_jpeg(data, factor, (w, h))
        except DECODE_ERRORS as exc:
            raise UnreadableSlide(f"a chunk of the zarr store cannot be decoded ({exc})") from exc
        self._decoded.put(key, arr)
        return arr

    def _paint(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray:
        lv = self._levels[level]
        t = lv.tile // factor
        return grid.paint(
            (l_x, l_y, l_w, l_h),
            grid.scaled_size((lv.width, lv.height), factor),
            (t, t),
            lambda addresses: [self._decode(level, c, r, factor) for c, r in addresses],
            self.metadata.background,
        )

    # -- SlideReader -------------------------------------------------------------
    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        ds = self.metadata.levels[level].downsample
        return self._paint(level, round(l0_x / ds), round(l0_y / ds), l_w, l_h, 1)

    def read_scaled(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray | None:
        lv = self._levels[level]
        if lv.codec != "jpeg" or lv.tile % factor:
            return None
        return self._paint(
            level, l_x // factor, l_y // factor, math.ceil(l_w / factor),
            math.ceil(l_h / factor), factor,
        )

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        lv = self._levels[level]
        if lv.codec != "jpeg":
            return None
        data = self.chunk_bytes(level, col, row)
        if data is None:
            return None
        return RawTile(data, codecs.JPEG, lv.tile_size(col, row))

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self.metadata.associated:
            raise KeyError(name)
        folder = self.path / "associated" / name
        try:
            meta = read_json(folder / "zarr.json")
            shape = tuple(int(v) for v in meta["shape"])
            if math.prod(shape[:2]) > MAX_DECODE_PIXELS:
                raise ValueError("impossible size")
            raw = imagecodecs.zstd_decode((folder / "c" / "0" / "0" / "0").read_bytes())
            return np.frombuffer(raw, np.uint8).reshape(shape)
        except DECODE_ERRORS as exc:
            raise UnreadableSlide(f"the {name} image of the zarr store cannot be read "
                                  f"({type(exc).__name__})") from exc

    def close(self) -> None:
        with self._lock:
            self._indexes.clear()


class ZarrBackend:
    name = "zarr"
    priority = 5

    def __init__(self, decoded_cache_bytes: int = DECODED_CACHE_BYTES) -> None:
        self.decoded = DecodedTiles(decoded_cache_bytes)

    def can_open(self, path: Path) -> bool:
        return is_complete_store(path)

    def open(self, path: Path) -> ZarrReader:
        with contextlib.suppress(AttributeError):
            path = path.resolve()
        return ZarrReader(path, self.decoded)
