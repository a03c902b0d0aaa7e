"""``wsi-server convert SRC DEST.zarr``: a slide to a multiscale zarr pyramid whose chunks
are the served tiles (see ``wsi_server.readers.zarr_backend`` for the store layout).

Levels are the Deep Zoom levels of the native grid from full resolution down to the first
level that fits in one tile: each halves the one above with ceil (so every level of
``/native.dzi`` down to one tile is a stored level and passes through). A coarser level is
the 2x2 area average of the level above (edge pixels of an odd size average what exists).

How it streams. Level 0 is cut into square blocks of ``B x B`` tiles (``B*T`` about 2048
px) visited in Z-order (a quadtree walk). Worker threads each take one block: read its
region from the source (``read_region``), encode its level-0 tiles, and average it down
``log2(B)`` levels, encoding those tiles as well. The main thread consumes the blocks in
order and builds the levels above the blocks from the top tiles of four neighbours. A
quadtree walk finishes every aligned power-of-two square before the next, so each level
has exactly one shard open at a time: chunks are appended to its shard file as they come
and the index is written when the walk leaves the shard. Memory is a few blocks of pixels
plus four tiles per level, whatever the slide's size (width included).

Level-0 tiles that the source stores as complete JPEGs of the chunk size (SVS, DICOM) are
copied as they are, with no generation loss (``copy_source_tiles``); others are encoded.

Atomic and restartable. Everything is written under ``.DEST.partial`` beside ``DEST``
(the library skips hidden and ``.partial`` names) holding a manifest of the source's
fingerprint and the options; a shard file is written as ``0.partial`` and renamed when its
index is in place. The root ``zarr.json`` (with ``"complete": true``) is written last and
the folder renamed to ``DEST``. Running again resumes: the walk skips the subtrees whose
shards are complete (reading back their pixels where a coarser level needs them). A
manifest that no longer matches (other options or a changed source) restarts from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import imagecodecs
import numpy as np

from wsi_server.codecs import JPEG
from wsi_server.errors import BadRequest, WsiServerError
from wsi_server.geometry import halvings, native_tile_size
from wsi_server.library import fingerprint
from wsi_server.progress import LineProgress, clock, eta
from wsi_server.readers import ReaderRegistry, SlideReader, default_registry
from wsi_server.readers.zarr_backend import (
    ATTRS_KEY,
    EMPTY,
    STORE_VERSION,
    StoreLevel,
    decode_chunk,
    encode_index,
    index_nbytes,
    parse_index,
    shard_path,
)
from wsi_server.zarr_codecs import CODEC_NAME, encode_jpeg

Codec = Literal["jpeg", "zstd"]
NGFF_VERSION = "0.5"
SHARD_PX = 8192
"""A shard covers about this many pixels a side (S = SHARD_PX / T tiles, a power of two)."""
BLOCK_PX = 2048
"""A worker's block of level 0 covers about this many pixels a side."""
_MANIFEST = "convert.json"
_LOCK = "convert.lock"
_ZSTD_LEVEL = 3


class ConversionError(WsiServerError):
    code = "conversion_failed"


@dataclass(frozen=True)
class ConvertOptions:
    tile_size: int | None = None
    """Chunk (= tile) size; default: the source's native tile size, else 256."""
    codec: Codec = "jpeg"
    quality: int = 90
    workers: int = 0
    """Worker threads (0: one per core)."""
    copy_source_tiles: bool = True
    """Copy level-0 JPEG tiles of the source that are exactly chunks, instead of re-encoding."""
    shard_tiles: int | None = None
    """Tiles per shard side, a power of two (default: a shard covers about 8192 px)."""


@dataclass(frozen=True)
class Progress:
    tiles_done: int
    tiles_total: int
    l0_pixels_done: int
    l0_pixels_total: int
    levels: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.tiles_done / self.tiles_total if self.tiles_total else 1.0

    @property
    def mpx_per_s(self) -> float:
        return self.l0_pixels_done / 1e6 / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return eta(self.tiles_done, self.tiles_total, self.elapsed)


@dataclass(frozen=True)
class ConvertResult:
    dest: Path
    seconds: float
    store_bytes: int
    source_bytes: int
    levels: tuple[tuple[int, int], ...]
    tiles: int
    tiles_resumed: int
    tiles_copied: int

    @property
    def mpx_per_s(self) -> float:
        w, h = self.levels[0]
        return w * h / 1e6 / self.seconds if self.seconds > 0 else float("inf")


# -- the plan (pure) -------------------------------------------------------------
def pyramid_dims(width: int, height: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Level sizes: the Deep Zoom levels, finest first, down to the first that fits one
    tile."""
    dims = halvings((width, height))
    fits = next(i for i, (w, h) in enumerate(dims) if w <= tile and h <= tile)
    return dims[: fits + 1]


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


@dataclass(frozen=True)
class Plan:
    tile: int
    dims: tuple[tuple[int, int], ...]
    shard_tiles: tuple[int, ...]
    """Tiles per shard side of each level (a power of two)."""
    block_level: int
    """log2(B): workers build levels 0..block_level of a block; the main thread the rest."""

    @classmethod
    def of(cls, width: int, height: int, tile: int, shard_tiles: int | None = None) -> Plan:
        dims = pyramid_dims(width, height, tile)
        s = _pow2_floor(shard_tiles or max(1, SHARD_PX // tile))
        shards = []
        for w, h in dims:
            n = max(math.ceil(w / tile), math.ceil(h / tile))
            shards.append(min(s, 1 << max(0, (n - 1).bit_length())))
        b = _pow2_floor(max(1, BLOCK_PX // tile)).bit_length() - 1
        b = min(b, len(dims) - 1, shards[0].bit_length() - 1)
        return cls(tile, dims, tuple(shards), b)

    def grid(self, level: int) -> tuple[int, int]:
        w, h = self.dims[level]
        return math.ceil(w / self.tile), math.ceil(h / self.tile)

    def exists(self, level: int, col: int, row: int) -> bool:
        cols, rows = self.grid(level)
        return col < cols and row < rows

    def shard_of(self, level: int, col: int, row: int) -> tuple[int, int, int]:
        s = self.shard_tiles[level]
        return (level, row // s, col // s)

    def tile_count(self) -> int:
        return sum(c * r for c, r in (self.grid(k) for k in range(len(self.dims))))

    def store_level(self, level: int, codec: Codec) -> StoreLevel:
        w, h = self.dims[level]
        return StoreLevel(w, h, self.tile, self.shard_tiles[level], codec, 255)


def children(col: int, row: int) -> tuple[tuple[int, int], ...]:
    """The four tiles of the level below, in Z-order."""
    return ((2 * col, 2 * row), (2 * col + 1, 2 * row), (2 * col, 2 * row + 1),
            (2 * col + 1, 2 * row + 1))


def downsample2(pixels: np.ndarray) -> np.ndarray:
    """2x2 area average (rounded); an odd last row or column averages what exists."""
    h, w = pixels.shape[:2]
    a = pixels.astype(np.uint16)
    if h % 2:
        a = np.concatenate((a, a[-1:]), axis=0)
    if w % 2:
        a = np.concatenate((a, a[:, -1:]), axis=1)
    s = a[0::2, 0::2] + a[1::2, 0::2]
    s += a[0::2, 1::2]
    s += a[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


# -- metadata --------------------------------------------------------------------
def level_json(plan: Plan, level: int, codec: Codec, quality: int) -> dict[str, Any]:
    t, s = plan.tile, plan.shard_tiles[level]
    w, h = plan.dims[level]
    inner: list[dict[str, Any]]
    if codec == "jpeg":
        inner = [{"name": CODEC_NAME, "configuration": {"quality": quality}}]
    else:
        inner = [{"name": "bytes"},
                 {"name": "zstd", "configuration": {"level": _ZSTD_LEVEL, "checksum": False}}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [h, w, 3],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [s * t, s * t, 3]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 255,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [t, t, 3],
                "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "start",
            },
        }],
        "attributes": {},
        "dimension_names": ["y", "x", "c"],
    }


def ngff_multiscales(plan: Plan, mpp: tuple[float, float] | None, name: str) -> dict[str, Any]:
    """OME-NGFF 0.5 ``multiscales`` (axes y, x, c: see the README for the deviation)."""
    unit = {"unit": "micrometer"} if mpp else {}
    my, mx = (mpp[1], mpp[0]) if mpp else (1.0, 1.0)
    datasets = []
    for k in range(len(plan.dims)):
        f = float(2**k)
        datasets.append({
            "path": str(k),
            "coordinateTransformations": [{"type": "scale", "scale": [my * f, mx * f, 1.0]}],
        })
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space", **unit},
                     {"name": "x", "type": "space", **unit},
                     {"name": "c", "type": "channel"}],
            "datasets": datasets,
            "type": "mean",
            "metadata": {"method": "2x2 area average", "tile_size": plan.tile},
        }],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _write_associated(folder: Path, pixels: np.ndarray) -> None:
    """An RGB image as a one-chunk zarr array (bytes + zstd: lossless for barcodes)."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    h, w = pixels.shape[:2]
    _write_json(folder / "zarr.json", {
        "zarr_format": 3, "node_type": "array", "shape": [h, w, 3], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [h, w, 3]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 255,
        "codecs": [{"name": "bytes"},
                   {"name": "zstd", "configuration": {"level": _ZSTD_LEVEL, "checksum": False}}],
        "attributes": {}, "dimension_names": ["y", "x", "c"],
    })
    chunk = folder / "c" / "0" / "0" / "0"
    chunk.parent.mkdir(parents=True, exist_ok=True)
    chunk.write_bytes(imagecodecs.zstd_encode(pixels.tobytes(), level=_ZSTD_LEVEL))


# -- shard files -------------------------------------------------------------------
class ShardWriter:
    """One open shard per level; chunks are appended, the index goes in when it closes."""

    def __init__(self, store: Path, plan: Plan, done: set[tuple[int, int, int]]) -> None:
        self.store = store
        self.plan = plan
        self.done = done
        self._open: dict[int, tuple[tuple[int, int, int], IO[bytes], np.ndarray, int]] = {}

    def write(self, level: int, col: int, row: int, data: bytes) -> None:
        key = self.plan.shard_of(level, col, row)
        if key in self.done:
            return
        current = self._open.get(level)
        if current is not None and current[0] != key:
            self._close(level)
            current = None
        if current is None:
            s = self.plan.shard_tiles[level]
            path = shard_path(self.store, *key)
            path.parent.mkdir(parents=True, exist_ok=True)
            f: IO[bytes] = open(path.with_name("0.partial"), "wb")  # noqa: SIM115
            index = np.full((s, s, 2), EMPTY, np.uint64)
            start = index_nbytes(s)
            f.seek(start)
            current = (key, f, index, start)
        key_, f, index, offset = current
        s = self.plan.shard_tiles[level]
        f.write(data)
        index[row % s, col % s] = (offset, len(data))
        self._open[level] = (key_, f, index, offset + len(data))

    def _close(self, level: int) -> None:
        key, f, index, _ = self._open.pop(level)
        f.seek(0)
        f.write(encode_index(index))
        f.close()
        path = shard_path(self.store, *key)
        os.replace(path.with_name("0.partial"), path)
        self.done.add(key)

    def close_all(self) -> None:
        for level in sorted(self._open):
            self._close(level)

    def abandon(self) -> None:
        for _, f, _, _ in self._open.values():
            with contextlib.suppress(OSError):
                f.close()
        self._open.clear()


def complete_shards(store: Path, plan: Plan) -> set[tuple[int, int, int]]:
    """Shards a previous run finished (their index is readable)."""
    done: set[tuple[int, int, int]] = set()
    for level in range(len(plan.dims)):
        top = store / str(level) / "c"
        if not top.is_dir():
            continue
        s = plan.shard_tiles[level]
        for path in top.glob("*/*/0"):
            try:
                sy, sx = int(path.parent.parent.name), int(path.parent.name)
                with open(path, "rb") as f:
                    parse_index(f.read(index_nbytes(s)), s)
            except (ValueError, OSError, WsiServerError):
                continue
            done.add((level, sy, sx))
    return done


# -- the conversion ------------------------------------------------------------------
@dataclass
class _Block:
    col: int
    row: int
    chunks: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    top: np.ndarray | None = None
    copied: int = 0
    encoded: int = 0
    resumed: int = 0


class _Converter:
    def __init__(
        self,
        reader: SlideReader,
        store: Path,
        plan: Plan,
        options: ConvertOptions,
        done: set[tuple[int, int, int]],
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.reader = reader
        self.store = store
        self.plan = plan
        self.options = options
        self.done = set(done)
        self.writer = ShardWriter(store, plan, done)
        self.progress = progress
        self.started = time.perf_counter()
        self.tiles_total = plan.tile_count()
        self.tiles_done = 0
        self.resumed = 0
        self.copied = 0
        self.l0_done = 0
        self.levels = [plan.store_level(k, options.codec) for k in range(len(plan.dims))]
        src_tile = reader.metadata.tile_size
        self.copy_l0 = (
            options.codec == "jpeg" and options.copy_source_tiles
            and src_tile == (plan.tile, plan.tile)
        )
        self._count_lock = threading.Lock()

    # encoding and reading back
    def encode(self, pixels: np.ndarray) -> bytes:
        if self.options.codec == "jpeg":
            return encode_jpeg(pixels, self.options.quality)
        t = self.plan.tile
        full = pixels
        if pixels.shape[:2] != (t, t):
            full = np.full((t, t, 3), 255, np.uint8)
            full[: pixels.shape[0], : pixels.shape[1]] = pixels
        return bytes(imagecodecs.zstd_encode(np.ascontiguousarray(full).tobytes(),
                                             level=_ZSTD_LEVEL))

    def stored_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Pixels of a chunk a previous run wrote (its shard is complete)."""
        s = self.plan.shard_tiles[level]
        path = shard_path(self.store, *self.plan.shard_of(level, col, row))
        with open(path, "rb") as f:
            index = parse_index(f.read(index_nbytes(s)), s)
            offset, length = (int(v) for v in index[row % s, col % s])
            f.seek(offset)
            data = f.read(length)
        return decode_chunk(self.levels[level], data, col, row)

    def _count(self, tiles: int, resumed: int, copied: int, l0_px: int) -> None:
        with self._count_lock:
            self.tiles_done += tiles
            self.resumed += resumed
            self.copied += copied
            self.l0_done += l0_px

    def report(self) -> None:
        if self.progress is not None:
            w, h = self.plan.dims[0]
            self.progress(Progress(self.tiles_done, self.tiles_total, self.l0_done, w * h,
                                   len(self.plan.dims), time.perf_counter() - self.started))

    # a worker's block
    def block(self, bcol: int, brow: int) -> _Block:
        plan, t, b = self.plan, self.plan.tile, self.plan.block_level
        n = 1 << b
        out = _Block(bcol, brow)
        w0, h0 = plan.dims[0]
        x0, y0 = bcol * n * t, brow * n * t
        w, h = min(n * t, w0 - x0), min(n * t, h0 - y0)
        from_store = plan.shard_of(0, bcol * n, brow * n) in self.done
        if from_store:
            pixels = np.empty((h, w, 3), np.uint8)
            for row in range(math.ceil(h / t)):
                for col in range(math.ceil(w / t)):
                    tile = self.stored_tile(0, bcol * n + col, brow * n + row)
                    th, tw = tile.shape[:2]
                    pixels[row * t : row * t + th, col * t : col * t + tw] = tile
        else:
            pixels = self.reader.read_region(0, x0, y0, w, h)
        for level in range(b + 1):
            lh, lw = pixels.shape[:2]
            m = n >> level
            first_col, first_row = bcol * m, brow * m
            write = plan.shard_of(level, first_col, first_row) not in self.done
            for row in range(math.ceil(lh / t)):
                for col in range(math.ceil(lw / t)):
                    c, r = first_col + col, first_row + row
                    if not write:
                        out.resumed += 1
                        continue
                    data = None
                    if level == 0 and self.copy_l0:
                        raw = self.reader.read_raw_tile(0, c, r)
                        if raw is not None and raw.size == (t, t) and raw.media_type == JPEG:
                            data = raw.data
                            out.copied += 1
                    if data is None:
                        data = self.encode(pixels[row * t : (row + 1) * t, col * t : (col + 1) * t])
                        out.encoded += 1
                    out.chunks.append((level, c, r, data))
            if level < b:
                pixels = downsample2(pixels)
        out.top = pixels
        return out

    def blocks_in_order(self, level: int, col: int, row: int) -> Iterator[tuple[int, int]]:
        """The blocks ``node`` will ask for, in the same order."""
        if self.plan.shard_of(level, col, row) in self.done:
            return
        if level == self.plan.block_level:
            yield (col, row)
            return
        for c, r in children(col, row):
            if self.plan.exists(level - 1, c, r):
                yield from self.blocks_in_order(level - 1, c, r)

    def run(self) -> None:
        workers = self.options.workers or os.cpu_count() or 1
        top = len(self.plan.dims) - 1
        order = self.blocks_in_order(top, 0, 0)
        pending: deque[Future[_Block]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:

            def top_up() -> None:
                while len(pending) < workers + 1:
                    nxt = next(order, None)
                    if nxt is None:
                        return
                    pending.append(pool.submit(self.block, *nxt))

            def next_block(col: int, row: int) -> np.ndarray:
                top_up()
                blk = pending.popleft().result()
                top_up()
                if (blk.col, blk.row) != (col, row):
                    raise AssertionError("block order out of step")
                for level, c, r, data in blk.chunks:
                    self.writer.write(level, c, r, data)
                n = 1 << self.plan.block_level
                w0, h0 = self.plan.dims[0]
                px = min(n * self.plan.tile, w0 - col * n * self.plan.tile) * min(
                    n * self.plan.tile, h0 - row * n * self.plan.tile)
                self._count(len(blk.chunks) + blk.resumed, blk.resumed, blk.copied, px)
                self.report()
                assert blk.top is not None
                return blk.top

            def node(level: int, col: int, row: int) -> np.ndarray:
                if self.plan.shard_of(level, col, row) in self.done:
                    return self.stored_tile(level, col, row)
                if level == self.plan.block_level:
                    return next_block(col, row)
                t = self.plan.tile
                parts = [(c, r, node(level - 1, c, r)) for c, r in children(col, row)
                         if self.plan.exists(level - 1, c, r)]
                w = sum(p.shape[1] for c, r, p in parts if r == 2 * row)
                h = sum(p.shape[0] for c, r, p in parts if c == 2 * col)
                canvas = np.empty((h, w, 3), np.uint8)
                for c, r, p in parts:
                    y, x = (r - 2 * row) * t, (c - 2 * col) * t
                    canvas[y : y + p.shape[0], x : x + p.shape[1]] = p
                pixels = downsample2(canvas)
                self.writer.write(level, col, row, self.encode(pixels))
                self._count(1, 0, 0, 0)
                return pixels

            try:
                node(top, 0, 0)
                self.writer.close_all()
            except BaseException:
                self.writer.abandon()
                for fut in pending:
                    fut.cancel()
                raise
        self.report()


def _manifest(src: Path, plan: Plan, options: ConvertOptions) -> dict[str, Any]:
    fp, size = fingerprint(src)
    return {"version": STORE_VERSION, "source_fingerprint": fp, "source_bytes": size,
            "tile": plan.tile, "dims": [list(d) for d in plan.dims],
            "shard_tiles": list(plan.shard_tiles), "codec": options.codec,
            "quality": options.quality, "copy_source_tiles": options.copy_source_tiles}


def temp_path(dest: Path) -> Path:
    """Where a conversion to ``dest`` is written until it is complete."""
    return dest.with_name(f".{dest.name}.partial")


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_slide(
    src: Path,
    dest: Path,
    options: ConvertOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
    registry: ReaderRegistry | None = None,
) -> ConvertResult:
    """Convert ``src`` (any slide a reader backend opens) to the zarr store ``dest``.

    Raises ``BadRequest`` for bad options or an existing ``dest`` (never overwritten),
    ``ConversionError`` when another conversion to ``dest`` is running, and the reader's
    errors for an unreadable source. An interrupted call leaves only the hidden temporary
    folder, which the next call resumes.
    """
    options = options or ConvertOptions()
    src, dest = Path(src), Path(dest)
    if options.codec not in ("jpeg", "zstd"):
        raise BadRequest("codec must be jpeg or zstd")
    if not 1 <= options.quality <= 100:
        raise BadRequest("quality must be between 1 and 100")
    if dest.exists():
        raise BadRequest(f"{dest.name} already exists; it is never overwritten")
    started = time.perf_counter()
    reader = (registry or default_registry()).open(src)
    try:
        meta = reader.metadata
        tile = options.tile_size or native_tile_size(meta.tile_size)
        if not 128 <= tile <= 2048:
            raise BadRequest("tile size must be between 128 and 2048")
        plan = Plan.of(meta.width, meta.height, tile, options.shard_tiles)
        manifest = _manifest(src, plan, options)
        tmp = temp_path(dest)
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / _LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ConversionError(f"another conversion to {dest.name} is running") from exc
            done: set[tuple[int, int, int]] = set()
            previous = None
            with contextlib.suppress(OSError, ValueError):
                previous = json.loads((tmp / _MANIFEST).read_text())
            if previous == manifest:
                done = complete_shards(tmp, plan)
            else:  # our own temporary folder from other options or another source version
                for child in tmp.iterdir():
                    if child.name != _LOCK:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                _write_json(tmp / _MANIFEST, manifest)
            for k in range(len(plan.dims)):
                _write_json(tmp / str(k) / "zarr.json",
                            level_json(plan, k, options.codec, options.quality))
            conv = _Converter(reader, tmp, plan, options, done, progress)
            conv.run()
            associated = []
            for name in meta.associated:
                try:
                    _write_associated(tmp / "associated" / name, reader.associated_image(name))
                    associated.append(name)
                except (WsiServerError, ValueError, OSError, KeyError):
                    continue
            if associated:
                _write_json(tmp / "associated" / "zarr.json",
                            {"zarr_format": 3, "node_type": "group", "attributes": {}})
            for stray in tmp.rglob("*.partial"):
                stray.unlink()
            attrs = {
                "version": STORE_VERSION, "complete": True, "level_count": len(plan.dims),
                "tile_size": tile, "codec": options.codec, "quality": options.quality,
                "source_format": meta.format, "vendor": meta.vendor,
                "mpp": list(meta.mpp) if meta.mpp else None,
                "objective_power": meta.objective_power, "associated": associated,
                "bounds": list(meta.bounds) if meta.bounds else None,
                "background": list(meta.background), "properties": meta.properties,
            }
            (tmp / _MANIFEST).unlink()
            _write_json(tmp / "zarr.json", {
                "zarr_format": 3, "node_type": "group",
                "attributes": {"ome": ngff_multiscales(plan, meta.mpp, dest.stem),
                               ATTRS_KEY: attrs},
            })
            (tmp / _LOCK).unlink()
        os.rename(tmp, dest)  # fails rather than replace a folder created meanwhile
    finally:
        reader.close()
    return ConvertResult(
        dest=dest, seconds=time.perf_counter() - started, store_bytes=_store_bytes(dest),
        source_bytes=manifest["source_bytes"], levels=plan.dims, tiles=plan.tile_count(),
        tiles_resumed=conv.resumed, tiles_copied=conv.copied,
    )


# -- progress on a terminal or in a log --------------------------------------------------
class ProgressPrinter(LineProgress):
    """A bar redrawn in place on a terminal; plain lines every ``interval`` s otherwise."""

    def __init__(self, stream: Any = None, interval: float = 5.0) -> None:
        super().__init__("convert", stream, interval)

    def line(self, p: Progress) -> str:
        return (f"{p.fraction * 100:5.1f}%  tiles {p.tiles_done}/{p.tiles_total}  "
                f"levels {p.levels}  {p.mpx_per_s:6.1f} Mpx/s  ETA {clock(p.eta)}")

    def __call__(self, p: Progress) -> None:
        self.show(p.fraction, self.line(p), p.tiles_done >= p.tiles_total)


def summary(result: ConvertResult) -> str:
    w, h = result.levels[0]
    ratio = result.store_bytes / result.source_bytes if result.source_bytes else float("nan")
    return (f"converted {w}x{h} px, {len(result.levels)} levels, {result.tiles} tiles "
            f"({result.tiles_copied} copied, {result.tiles_resumed} resumed) in "
            f"{result.seconds:.1f} s ({result.mpx_per_s:.1f} Mpx/s); store "
            f"{result.store_bytes / 2**20:.1f} MiB = {ratio:.2f}x the source")


def options_dict(options: ConvertOptions) -> dict[str, Any]:
    return asdict(options)


# -- command line ----------------------------------------------------------------------
_CLI_ENV = {
    "tile_size": "WSI_CONVERT_TILE_SIZE",
    "codec": "WSI_CONVERT_CODEC",
    "quality": "WSI_CONVERT_QUALITY",
    "workers": "WSI_CONVERT_WORKERS",
}


def add_convert_command(sub: Any) -> None:
    """Register ``wsi-server convert SRC DEST`` on the CLI's subparsers."""
    p = sub.add_parser(
        "convert",
        help="convert a slide to a multiscale zarr pyramid (chunks = served tiles)",
        description="Convert a slide to a zarr v3 / OME-NGFF multiscale pyramid whose chunks "
        "are the tiles of the native grid. Written under a hidden temporary name and "
        "renamed when complete; run again to resume an interrupted conversion.",
    )
    p.add_argument("src", type=Path, help="slide file, or DICOM-WSI folder")
    p.add_argument("dest", type=Path, help="store to create, e.g. SLIDE.zarr (never overwritten)")
    env = os.environ
    p.add_argument("--tile-size", type=int, default=env.get(_CLI_ENV["tile_size"]),
                   metavar="N", help="chunk = tile size, 128-2048 (default: the source's "
                   f"native tile size, else 256) [env {_CLI_ENV['tile_size']}]")
    p.add_argument("--codec", choices=("jpeg", "zstd"),
                   default=env.get(_CLI_ENV["codec"], "jpeg"),
                   help="jpeg chunks (served as they are) or lossless zstd "
                   f"[env {_CLI_ENV['codec']}; default jpeg]")
    p.add_argument("--quality", type=int, default=env.get(_CLI_ENV["quality"], 90), metavar="Q",
                   help=f"JPEG quality [env {_CLI_ENV['quality']}; default 90]")
    p.add_argument("--workers", type=int, default=env.get(_CLI_ENV["workers"], 0), metavar="K",
                   help=f"worker threads (0: one per core) [env {_CLI_ENV['workers']}; default 0]")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode level-0 JPEG tiles instead of copying the source's")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: Any) -> int:
    options = ConvertOptions(
        tile_size=int(args.tile_size) if args.tile_size else None,
        codec=args.codec,
        quality=int(args.quality),
        workers=int(args.workers),
        copy_source_tiles=not args.reencode,
    )
    try:
        result = convert_slide(args.src, args.dest, options, progress=ProgressPrinter())
    except WsiServerError as exc:
        print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(summary(result))
    return 0
