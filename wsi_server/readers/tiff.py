"""tifffile backend for the TIFF family it reads well: Aperio SVS (JPEG, LZW, ...), generic
tiled pyramidal TIFF and OME-TIFF.

Stored tiles are read with ``os.pread`` on the backend's own descriptor (thread-safe, no
lock, one syscall) and JPEG tiles are completed with the page's JPEGTables so they can be
sent as they are. Decoding uses libjpeg-turbo (with DCT scaling for coarser reads) or
tifffile's codec for other compressions. Levels, downsamples and associated images follow
OpenSlide's rules for the same file, so both backends agree pixel for pixel.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile

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

_JPEG = 7
# none, LZW, JPEG, deflate (2), zstd, lzma, Aperio JPEG 2000 (YCbCr, RGB)
_SUPPORTED_COMPRESSION = {1, 5, 7, 8, 32946, 50000, 34925, 33003, 33005}
_APERIO_J2K_YCBCR = 33003
_RGB = 2
_YCBCR = 6
DECODED_CACHE_BYTES = 64 * 2**20
_DecodedKey = tuple[int, int, int, int]  # reader, level, tile index, scale factor


class DecodedTiles:
    """Byte-bounded LRU of decoded stored tiles, one per backend and so shared by every open
    slide (memory does not grow with the number of slides open). Neighbouring Deep Zoom
    tiles of the 254/overlap-1 grid share stored tiles, so most are decoded once, not four
    times."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._items: OrderedDict[_DecodedKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._tokens = itertools.count()

    def token(self) -> int:
        """A key prefix of one's own for each reader."""
        return next(self._tokens)

    def get(self, key: _DecodedKey) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: _DecodedKey, arr: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self._max and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


class _Level:
    """What reads of a level need, copied out of its TIFF page: the tile table as two
    arrays of 8-byte integers (tifffile holds it as tuples of Python ints, ~90 bytes a
    tile), and the page's decode function only when the tiles are not JPEG."""

    def __init__(self, page: tifffile.TiffPage) -> None:
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        if min(self.width, self.height, self.tile_w, self.tile_h) < 1:
            raise UnreadableSlide("a level declares an empty size or tile size")
        self.cols = math.ceil(self.width / self.tile_w)
        self.rows = math.ceil(self.height / self.tile_h)
        self.offsets = array.array("Q", page.dataoffsets)
        self.counts = array.array("Q", page.databytecounts)
        if min(len(self.offsets), len(self.counts)) < self.cols * self.rows:
            raise UnreadableSlide("a level's size, tile size and tile count disagree")
        self.compression = int(page.compression)
        self.photometric = int(page.photometric)
        self.jpegtables: bytes | None = page.jpegtables
        self.is_jpeg = self.compression == _JPEG and int(page.samplesperpixel) == 3
        self.rgb_jpeg = self.is_jpeg and self.photometric == _RGB
        # page.decode holds its page, and through it every object of the TiffFile
        self.decode: Any = None if self.is_jpeg else page.decode


def _check_page(page: tifffile.TiffPage) -> None:
    if not page.is_tiled:
        raise UnsupportedSlide("level is not tiled")
    if int(page.compression) not in _SUPPORTED_COMPRESSION:
        raise UnsupportedSlide(f"TIFF compression {int(page.compression)} is left to OpenSlide")
    if page.dtype is None or np.dtype(page.dtype) != np.uint8:
        raise UnsupportedSlide("only 8-bit samples are read by the tifffile backend")
    if int(page.planarconfig) != 1 and int(page.samplesperpixel) > 1:
        raise UnsupportedSlide("planar TIFF is left to OpenSlide")


def _aperio_properties(description: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            props[f"aperio.{key.strip()}"] = value.strip()
    return props


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class TiffReader:
    """An open SVS / generic TIFF / OME-TIFF slide."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        decoded: DecodedTiles | None = None,
        decode_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.path = path
        self._decode_pool = decode_pool
        tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()
        try:
            self.metadata, self._levels, self._associated = self._inspect(tif, fmt)
            self._fd = os.open(path, os.O_RDONLY)
            self._size = os.fstat(self._fd).st_size
        except Exception:
            tif.close()
            raise
        # A TiffFile is a web of reference cycles (pages and tags point back to it): once
        # dropped it waits for a full run of the cyclic GC, which its tile tables (untracked
        # ints) do not hasten, so evicted readers' tables pile up. JPEG levels need nothing
        # of it after this; other compressions keep it for their pages' decode functions.
        self._tif: tifffile.TiffFile | None = tif
        if all(lv.decode is None for lv in self._levels):
            tif.close()
            self._tif = None
        self._decoded = decoded or DecodedTiles(DECODED_CACHE_BYTES // 4)
        self._token = self._decoded.token()

    @contextlib.contextmanager
    def _pages(self) -> Iterator[list[tifffile.TiffPage]]:
        """The file's pages, read anew through the reader's descriptor (the file it serves,
        even once another is renamed over its path), for the rare reads that need them."""
        with os.fdopen(os.dup(self._fd), "rb") as fh, \
                tifffile.TiffFile(fh, name=self.path.name, offset=0) as tif:
            yield [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]

    # -- opening ---------------------------------------------------------------
    def _inspect(
        self, tif: tifffile.TiffFile, fmt: str
    ) -> tuple[SlideMetadata, list[_Level], dict[str, int]]:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        if not pages:
            raise UnsupportedSlide("no TIFF pages")
        associated: dict[str, int] = {}  # name: index in ``pages``
        props: dict[str, str] = {}
        if tif.is_ome:
            level_pages = [lv.keyframe for lv in tif.series[0].levels]
            fmt = "ome-tiff"
        else:
            level_pages = [p for p in pages if p.is_tiled]
            level_pages.sort(key=lambda p: -int(p.imagewidth))
        if not level_pages:
            raise UnsupportedSlide("no tiled levels")
        for page in level_pages:
            _check_page(page)
        mpp: tuple[float, float] | None = None
        objective: float | None = None
        first = pages[0]
        desc = first.description or ""
        props["tiff.ImageDescription"] = desc
        if fmt == "aperio":
            props.update(_aperio_properties(desc))
            m = _float(props.get("aperio.MPP"))
            mpp = (m, m) if m else None
            objective = _float(props.get("aperio.AppMag"))
            for i, page in enumerate(pages[1:], start=1):
                if page.is_tiled:
                    continue
                text = (page.description or "").lower()
                if i == 1:
                    associated["thumbnail"] = i
                elif "label" in text:
                    associated["label"] = i
                elif "macro" in text:
                    associated["macro"] = i
        else:
            mpp = self._resolution_mpp(first)
        dims = [(int(p.imagewidth), int(p.imagelength)) for p in level_pages]
        downs = level_downsamples(dims)
        levels = [_Level(p) for p in level_pages]
        infos = tuple(
            LevelInfo(lv.width, lv.height, d, (lv.tile_w, lv.tile_h))
            for lv, d in zip(levels, downs, strict=True)
        )
        if mpp:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = str(mpp[0]), str(mpp[1])
        if objective:
            props["openslide.objective-power"] = f"{objective:g}"
        meta = SlideMetadata(
            format=fmt,
            vendor="aperio" if fmt == "aperio" else None,
            levels=infos,
            mpp=mpp,
            objective_power=objective,
            associated=tuple(sorted(associated)),
            bounds=None,
            properties=props,
        )
        return meta, levels, associated

    @staticmethod
    def _resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
        tags = page.tags
        unit = tags.get("ResolutionUnit")
        xres, yres = tags.get("XResolution"), tags.get("YResolution")
        if unit is None or xres is None or yres is None:
            return None
        per = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        try:
            x = xres.value[0] / xres.value[1]
            y = yres.value[0] / yres.value[1]
        except (TypeError, ZeroDivisionError, IndexError):
            return None
        if not per or x <= 0 or y <= 0:
            return None
        return (per / x, per / y)

    # -- reads -----------------------------------------------------------------
    def _raw(self, lv: _Level, index: int) -> bytes:
        count = lv.counts[index]
        if count == 0:
            return b""
        if lv.offsets[index] + count > self._size:
            raise UnreadableSlide("a stored tile lies past the end of the file")
        data = os.pread(self._fd, count, lv.offsets[index])
        if len(data) != count:
            raise UnreadableSlide("slide file is truncated")
        return data

    def _decode_tile(self, level: int, col: int, row: int, factor: int) -> np.ndarray | None:
        index = row * self._levels[level].cols + col
        key = (self._token, level, index, factor)
        cached = self._decoded.get(key)
        if cached is not None:
            return cached
        lv = self._levels[level]
        data = self._raw(lv, index)
        if not data:
            return None
        try:
            if lv.is_jpeg:
                arr = codecs.decode_jpeg(
                    codecs.complete_jpeg(data, lv.jpegtables, lv.rgb_jpeg),
                    factor,
                    (lv.tile_w, lv.tile_h),
                )
            else:
                decoded: Any = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
                arr = codecs.to_rgb(np.asarray(decoded).reshape(decoded.shape[-3:]))
                if lv.compression == _APERIO_J2K_YCBCR:
                    arr = codecs.ycbcr_to_rgb(arr)
        except DECODE_ERRORS as exc:
            raise UnreadableSlide(f"a stored tile cannot be decoded ({exc})") from exc
        self._decoded.put(key, arr)
        return arr

    def _decode_tiles(
        self, level: int, addresses: list[tuple[int, int]], factor: int
    ) -> list[np.ndarray | None]:
        """Decode several stored tiles, the uncached ones side by side on the backend's
        decode threads (libjpeg-turbo runs without the GIL) and one in this thread."""
        if self._decode_pool is None or len(addresses) < 2:
            return [self._decode_tile(level, c, r, factor) for c, r in addresses]
        cols = self._levels[level].cols
        missing = [
            i for i, (c, r) in enumerate(addresses)
            if self._decoded.get((self._token, level, r * cols + c, factor)) is None
        ]
        futures = {
            i: self._decode_pool.submit(self._decode_tile, level, *addresses[i], factor)
            for i in missing[1:]
        }
        out = []
        for i, (c, r) in enumerate(addresses):
            future = futures.get(i)
            out.append(future.result() if future else self._decode_tile(level, c, r, factor))
        return out

    def _paint(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray:
        """Region in units of the level decoded at 1/factor; (l_x, l_y, l_w, l_h) are in
        those scaled units."""
        lv = self._levels[level]
        return grid.paint(
            (l_x, l_y, l_w, l_h),
            grid.scaled_size((lv.width, lv.height), factor),
            (lv.tile_w // factor, lv.tile_h // factor),
            lambda addresses: self._decode_tiles(level, addresses, factor),
            self.metadata.background,
        )

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        ds = self.metadata.levels[level].downsample
        return self._paint(level, round(l0_x / ds), round(l0_y / ds), l_w, l_h, 1)

    def read_scaled(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray | None:
        lv = self._levels[level]
        if not lv.is_jpeg or lv.tile_w % factor or lv.tile_h % factor:
            return None
        return self._paint(
            level,
            l_x // factor,
            l_y // factor,
            math.ceil(l_w / factor),
            math.ceil(l_h / factor),
            factor,
        )

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        lv = self._levels[level]
        if not lv.is_jpeg or not (0 <= col < lv.cols and 0 <= row < lv.rows):
            return None
        if (col + 1) * lv.tile_w > lv.width or (row + 1) * lv.tile_h > lv.height:
            return None
        data = self._raw(lv, row * lv.cols + col)
        if not data:
            return None
        if not data.startswith(codecs.SOI):  # never send a browser bytes that are no JPEG
            raise UnreadableSlide("a stored tile is damaged (no JPEG start marker)")
        jpeg = codecs.complete_jpeg(data, lv.jpegtables, lv.rgb_jpeg)
        return RawTile(jpeg, codecs.JPEG, (lv.tile_w, lv.tile_h))

    def read_stored_tile(self, level: int, col: int, row: int) -> RawTile | None:
        """Like ``read_raw_tile`` but also at the right and bottom edges, where the stored
        tile is full size and padded past the level (as a DICOM TILED_FULL frame is)."""
        lv = self._levels[level]
        if not lv.is_jpeg or not (0 <= col < lv.cols and 0 <= row < lv.rows):
            return None
        data = self._raw(lv, row * lv.cols + col)
        if not data:
            return None
        jpeg = codecs.complete_jpeg(data, lv.jpegtables, lv.rgb_jpeg)
        return RawTile(jpeg, codecs.JPEG, (lv.tile_w, lv.tile_h))

    def associated_image(self, name: str) -> np.ndarray:
        index = self._associated[name]
        try:
            with self._lock, self._pages() as pages:
                page = pages[index]
                if int(page.imagewidth) * int(page.imagelength) > MAX_DECODE_PIXELS:
                    raise UnreadableSlide(f"the {name} image declares an impossible size")
                arr = page.asarray()
            return codecs.to_rgb(arr)
        except DECODE_ERRORS as exc:
            raise UnreadableSlide(f"the {name} image cannot be decoded ({exc})") from exc

    def close(self) -> None:
        fd = self.__dict__.pop("_fd", None)  # once: __del__ must not close a reused number
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._tif is not None:
            self._tif.close()

    def __del__(self) -> None:
        if hasattr(self, "_fd"):
            with contextlib.suppress(OSError):
                os.close(self._fd)


class TiffBackend:
    name = "tifffile"
    priority = 10

    def __init__(self, decoded_cache_bytes: int = DECODED_CACHE_BYTES) -> None:
        self.decoded = DecodedTiles(decoded_cache_bytes)
        # its own threads: callers already run in the app's render pool, and waiting on
        # that pool from inside it could deadlock
        self.decode_pool = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2, thread_name_prefix="wsi-decode"
        )

    def can_open(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except Exception:
            return False
        if fmt in ("aperio", "generic-tiff"):
            return True
        return path.name.lower().endswith((".ome.tif", ".ome.tiff"))

    def open(self, path: Path) -> TiffReader:
        fmt = openslide.OpenSlide.detect_format(str(path)) or "generic-tiff"
        try:
            return TiffReader(path, fmt, self.decoded, self.decode_pool)
        except (UnsupportedSlide, UnreadableSlide):
            raise
        except Exception as exc:
            raise UnreadableSlide(f"cannot read TIFF structure ({type(exc).__name__})") from exc
