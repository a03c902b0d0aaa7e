"""TileService: (slide, geometry, level, col, row, format) to encoded bytes.

Cache lookup, then passthrough when the Deep Zoom tile is exactly one stored tile, else
read, resample and encode in the thread pool. A client on a slow link may ask for stored
tiles ``reencoded``: JPEG 4:2:0 at the server's quality, or the stored bytes when those
are smaller. Concurrent misses for the same tile share
one render. Keys carry the slide's fingerprint, so a replaced file never serves stale
tiles.

Images that are not tiles of a Deep Zoom grid (a IIIF region at any size, rotated,
grey...) take the same path (``locate_image`` / ``fetch_image``): cache, one render per
key, the same read and resample (``read_resized``), then rotation, quality and encoding.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from wsi_server import codecs
from wsi_server.cache import TileCache
from wsi_server.errors import (
    BadRequest,
    NotFound,
    TileNotFound,
    Unimplemented,
    UnreadableSlide,
)
from wsi_server.geometry import (
    DeepZoomGeometry,
    GeometryParams,
    Pyramid,
    Size,
    TileRegion,
    deep_zoom,
    native_tile_size,
    thumbnail_size,
)
from wsi_server.library import Library, SlideEntry
from wsi_server.metrics import Metrics
from wsi_server.readers import SlideMetadata, SlideReader

GeometryKind = Literal["default", "native"]
FORMATS = ("jpeg", "png")
# How a tile of a stored level goes on the wire: the stored bytes, or re-encoded
ENCODINGS = ("stored", "reencoded")
IMAGE_FORMATS = ("jpeg", "png", "webp")
IMAGE_QUALITIES = ("color", "gray", "bitonal")
_T = TypeVar("_T")
_R = TypeVar("_R")
# 1/8 DCT scaling is visibly softer than Lanczos (MAD > 3 against DeepZoomGenerator):
# stop at 1/4 and let Lanczos do the rest.
_SCALE_FACTORS = (4, 2)
_MAX_THUMBNAIL_SOURCE_PIXELS = 64 * 2**20
_MAX_FULL_DECODE_PIXELS = 16 * 2**20
# An image (not a tile) decodes at most this many source pixels: a larger read means no
# pyramid level is small enough for the requested size (a 501, not minutes of decoding).
MAX_IMAGE_SOURCE_PIXELS = 64 * 2**20


@dataclass(frozen=True, slots=True)
class TileRef:
    entry: SlideEntry
    geometry: DeepZoomGeometry
    level: int
    col: int
    row: int
    fmt: str
    key: str
    etag: str
    reencode: bool = False


@dataclass(frozen=True, slots=True)
class Tile:
    data: bytes
    media_type: str
    source: str


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image that is not a Deep Zoom tile: a region of level 0 at a size, rotated,
    mirrored, in a quality and format; with its cache key and ETag."""

    entry: SlideEntry
    region: TileRegion
    quarter_turns: int | None
    degrees: float
    mirror: bool
    quality: str
    fmt: str
    key: str
    etag: str


def etag_for(key: str) -> str:
    return '"' + hashlib.blake2b(key.encode(), digest_size=10).hexdigest() + '"'


def _dct_factor(region: TileRegion) -> int:
    """The JPEG DCT scale factor a read of ``region`` decodes at (1 for none)."""
    factor = next((f for f in _SCALE_FACTORS if f <= region.l_z_downsample + 1e-9), 1)
    # DCT scaling shifts the colour of the few-pixel tiles at the top of the pyramid by a
    # few levels; it is only worth it for real tiles or for regions too big to decode.
    w, h = region.l_size
    if factor > 1 and (min(region.out_size) >= 32 or w * h > _MAX_FULL_DECODE_PIXELS):
        return factor
    return 1


def read_resized(reader: SlideReader, region: TileRegion) -> np.ndarray:
    """Read ``region`` and resample it to its ``out_size`` (runs in a worker thread)."""
    meta = reader.metadata
    w, h = region.l_size
    if w <= 0 or h <= 0:
        out_w, out_h = max(region.out_size[0], 1), max(region.out_size[1], 1)
        blank = np.empty((out_h, out_w, 3), np.uint8)
        blank[...] = meta.background
        return blank
    pixels: np.ndarray | None = None
    factor = _dct_factor(region)
    if factor > 1:
        ds = meta.levels[region.slide_level].downsample
        l_x = round(region.l0_location[0] / ds)
        l_y = round(region.l0_location[1] / ds)
        pixels = reader.read_scaled(region.slide_level, l_x, l_y, w, h, factor)
    if pixels is None:
        pixels = reader.read_region(region.slide_level, *region.l0_location, w, h)
    return codecs.resize(pixels, region.out_size)


def render_region(
    reader: SlideReader, region: TileRegion, fmt: str, quality: int
) -> bytes:
    """Read, resample and encode one Deep Zoom tile (runs in a worker thread)."""
    return codecs.encode(read_resized(reader, region), fmt, quality)


def plan_read(pyramid: Pyramid, l0_region: tuple[int, int, int, int], out_size: Size
              ) -> TileRegion:
    """Where an image of ``out_size`` pixels of the level-0 rectangle ``l0_region`` (x, y,
    w, h) comes from: the coarsest stored level at least as fine as the finer of the two
    axis scales (as a Deep Zoom tile's source level), and the region of it to read."""
    x, y, w, h = l0_region
    out_w, out_h = out_size
    l0_z = min(w / out_w, h / out_h)
    level = pyramid.best_level_for_downsample(l0_z)
    l0_l = pyramid.l0_l_downsamples[level]
    l_lim_w, l_lim_h = pyramid.l_dimensions[level]
    l_w = max(1, min(math.ceil(w / l0_l), l_lim_w - math.ceil(x / l0_l)))
    l_h = max(1, min(math.ceil(h / l0_l), l_lim_h - math.ceil(y / l0_l)))
    return TileRegion(
        slide_level=level,
        l0_location=(x, y),
        l_size=(l_w, l_h),
        z_size=out_size,
        out_size=out_size,
        l_z_downsample=l0_z / l0_l,
    )


def source_pixels(region: TileRegion) -> int:
    """Pixels a read of ``region`` decodes (after DCT scaling)."""
    factor = _dct_factor(region)
    return math.ceil(region.l_size[0] / factor) * math.ceil(region.l_size[1] / factor)


def render_image(
    reader: SlideReader,
    region: TileRegion,
    quarter_turns: int | None,
    degrees: float,
    mirror: bool,
    quality: str,
    fmt: str,
    jpeg_quality: int,
) -> bytes:
    """Read and resample ``region``, mirror, rotate (quarter turns, or any angle on a
    transparent or background corner fill), convert to grey or black and white, encode
    (runs in a worker thread)."""
    pixels = read_resized(reader, region)
    if mirror:
        pixels = pixels[:, ::-1]
    if quarter_turns:
        pixels = np.rot90(pixels, -quarter_turns)
    elif quarter_turns is None:
        pixels = codecs.rotate(pixels, degrees, reader.metadata.background,
                               transparent=fmt != "jpeg")
    if quality == "gray":
        pixels = codecs.to_gray(pixels)
    elif quality == "bitonal":
        pixels = codecs.to_bitonal(pixels)
    return codecs.encode(pixels, fmt, jpeg_quality)


def passthrough_levels(meta: SlideMetadata, geom: DeepZoomGeometry) -> dict[int, int]:
    """Deep Zoom levels whose tiles are exactly the stored tiles of a slide level (same
    pixel grid, same tile size, no overlap), mapped to that slide level."""
    if geom.overlap != 0 or geom.l0_offset != (0, 0):
        return {}
    out = {}
    for dz_level, slide_level in enumerate(geom.slide_from_dz_level):
        info = meta.levels[slide_level]
        if info.tile_size == (geom.tile_size, geom.tile_size) and geom.z_dimensions[
            dz_level
        ] == (info.width, info.height):
            out[dz_level] = slide_level
    return out


class TileService:
    def __init__(
        self,
        library: Library,
        cache: TileCache,
        executor: ThreadPoolExecutor,
        default_params: GeometryParams,
        jpeg_quality: int = 75,
        metrics: Metrics | None = None,
    ) -> None:
        self.library = library
        self.cache = cache
        self.executor = executor
        self.default_params = default_params
        self.jpeg_quality = jpeg_quality
        self.metrics = metrics or Metrics()
        self._geometries: dict[tuple[str, GeometryParams], DeepZoomGeometry] = {}
        self._passthrough: dict[tuple[str, GeometryParams], dict[int, int]] = {}
        self._in_flight: dict[str, asyncio.Future[Tile]] = {}
        cache.bind_metrics(self.metrics)
        self._timers: dict[str, Any] = {}

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- slides and geometry -----------------------------------------------------
    async def entry(self, slide_id: str) -> SlideEntry:
        entry = self.library.entry(slide_id)
        if self.library.is_stale(entry):
            entry = await self.run(self.library.refresh, entry)
        if entry.error is not None:
            raise entry.error
        return entry

    def params_for(self, entry: SlideEntry, kind: GeometryKind) -> GeometryParams:
        if kind == "default":
            return self.default_params
        assert entry.metadata is not None
        return GeometryParams(native_tile_size(entry.metadata.tile_size), 0, False)

    def geometry(self, entry: SlideEntry, kind: GeometryKind) -> DeepZoomGeometry:
        params = self.params_for(entry, kind)
        key = (entry.fingerprint, params)
        geom = self._geometries.get(key)
        if geom is None:
            assert entry.metadata is not None
            geom = deep_zoom(entry.metadata.pyramid(), params)
            if len(self._geometries) > 4096:
                self._geometries.clear()
                self._passthrough.clear()
            self._passthrough[key] = passthrough_levels(entry.metadata, geom)
            self._geometries[key] = geom
        return geom

    # -- tiles -------------------------------------------------------------------
    async def locate(
        self, slide_id: str, kind: GeometryKind, level: int, col: int, row: int, fmt: str,
        encoding: str = "stored",
    ) -> TileRef:
        if fmt not in FORMATS:
            raise BadRequest("tile format must be jpeg or png")
        if encoding not in ENCODINGS:
            raise BadRequest("encoding must be 'stored' or 'reencoded'")
        entry = await self.entry(slide_id)
        return self.tile_ref(entry, self.geometry(entry, kind), level, col, row, fmt,
                             encoding == "reencoded")

    def tile_ref(
        self, entry: SlideEntry, geom: DeepZoomGeometry, level: int, col: int, row: int,
        fmt: str, reencode: bool = False,
    ) -> TileRef:
        """``locate`` for a caller that holds the slide's entry and geometry already (from
        ``geometry``; ``fmt`` one of ``FORMATS``). ``reencode`` matters only for JPEG
        tiles of stored levels: other tiles are rendered either way, under one key."""
        if not geom.contains(level, col, row):
            raise TileNotFound("no tile at this level and address")
        quality = self.jpeg_quality if fmt == "jpeg" else 0
        key = (
            f"tile:{entry.fingerprint}:{geom.params.key()}:{level}:{col}:{row}:{fmt}:{quality}"
        )
        reencode = reencode and fmt == "jpeg" and level in self._stored_levels(entry, geom)
        if reencode:
            key += ":reencoded"
        return TileRef(entry, geom, level, col, row, fmt, key, etag_for(key), reencode)

    def _stored_levels(self, entry: SlideEntry, geom: DeepZoomGeometry) -> dict[int, int]:
        """``passthrough_levels`` of this slide and geometry, remembered with it."""
        levels = self._passthrough.get((entry.fingerprint, geom.params))
        if levels is None:  # a geometry kept by a caller after this cache was cleared
            assert entry.metadata is not None
            levels = passthrough_levels(entry.metadata, geom)
        return levels

    async def fetch(self, ref: TileRef) -> Tile:
        return await self._fetch(ref.key, ref.fmt, self._produce, ref)

    async def _fetch(
        self, key: str, fmt: str, produce: Callable[[_R], Awaitable[Tile]], arg: _R
    ) -> Tile:
        """Cache, else ``produce(arg)`` once for all concurrent requests of ``key``."""
        start = time.perf_counter()
        data, source = await self.cache.lookup(key)
        if data is not None:
            tile = Tile(data, codecs.MEDIA_TYPES[fmt], source)
        else:
            pending = self._in_flight.get(key)
            if pending is not None:
                return await asyncio.shield(pending)
            future: asyncio.Future[Tile] = asyncio.get_running_loop().create_future()
            self._in_flight[key] = future
            try:
                tile = await produce(arg)
                await self.cache.set(key, tile.data)
                future.set_result(tile)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                del self._in_flight[key]
        timer = self._timers.get(tile.source)
        if timer is None:
            timer = self._timers[tile.source] = self.metrics.tile_seconds.labels(tile.source)
        timer.observe(time.perf_counter() - start)
        return tile

    async def tile(
        self, slide_id: str, kind: GeometryKind, level: int, col: int, row: int, fmt: str,
        encoding: str = "stored",
    ) -> Tile:
        return await self.fetch(
            await self.locate(slide_id, kind, level, col, row, fmt, encoding))

    async def _produce(self, ref: TileRef) -> Tile:
        reader = self.library.reader(ref.entry)
        prefetch = getattr(reader, "prefetch", None)
        if prefetch is not None:  # a reader over the network (DICOMweb): fetch on the loop
            ahead = ref.geometry.tile_region(ref.level, ref.col, ref.row)
            await prefetch(ahead.slide_level, ahead.l0_location, ahead.l_size)
        stored_level = self._stored_levels(ref.entry, ref.geometry).get(ref.level)
        raw = None
        if stored_level is not None and ref.fmt == "jpeg":
            # One pread of a few kB from the page cache: cheaper inline than a thread hop.
            raw = reader.read_raw_tile(stored_level, ref.col, ref.row)
            if raw is not None and not ref.reencode:
                return Tile(raw.data, raw.media_type, "passthrough")
        region = ref.geometry.tile_region(ref.level, ref.col, ref.row)
        if source_pixels(region) > MAX_IMAGE_SOURCE_PIXELS:
            # a level this coarse is missing (or a damaged header declares a huge one):
            # never decode gigapixels for one tile
            raise UnreadableSlide("no level of this slide is small enough to render this tile")
        self.metrics.renders_in_flight.inc()
        try:
            data = await self.run(render_region, reader, region, ref.fmt, self.jpeg_quality)
        finally:
            self.metrics.renders_in_flight.dec()
        if raw is not None and len(raw.data) <= len(data):
            # re-encoding a tile stored at a lower quality only adds bytes and loss
            return Tile(raw.data, raw.media_type, "passthrough")
        return Tile(data, codecs.MEDIA_TYPES[ref.fmt], "rendered")

    # -- images that are not tiles (IIIF) -------------------------------------------
    def locate_image(
        self,
        entry: SlideEntry,
        l0_region: tuple[int, int, int, int],
        out_size: Size,
        degrees: float = 0.0,
        mirror: bool = False,
        quality: str = "color",
        fmt: str = "jpeg",
    ) -> ImageRef:
        """The image of the level-0 rectangle ``l0_region`` (x, y, w, h) scaled to
        ``out_size``, mirrored, then rotated clockwise by ``degrees``, in ``quality``
        (color, gray, bitonal) and ``fmt`` (jpeg, png, webp). ``Unimplemented`` when no
        level of the slide is small enough to read it."""
        if fmt not in IMAGE_FORMATS or quality not in IMAGE_QUALITIES:
            raise BadRequest("image format must be jpeg, png or webp; quality color, gray "
                             "or bitonal")
        assert entry.metadata is not None
        region = plan_read(entry.metadata.pyramid(), l0_region, out_size)
        if source_pixels(region) > MAX_IMAGE_SOURCE_PIXELS:
            raise Unimplemented("no level of this slide is small enough to render this "
                                "region at this size; ask for a smaller region or size")
        degrees %= 360
        turns = degrees / 90
        quarter_turns = int(turns) if turns == int(turns) else None
        jpeg_quality = self.jpeg_quality if fmt in ("jpeg", "webp") else 0
        x, y, w, h = l0_region
        key = (f"image:{entry.fingerprint}:{x},{y},{w},{h}:{out_size[0]}x{out_size[1]}:"
               f"{'!' if mirror else ''}{degrees!r}:{quality}:{fmt}:{jpeg_quality}")
        return ImageRef(entry, region, quarter_turns, degrees, mirror, quality, fmt, key,
                        etag_for(key))

    async def fetch_image(self, ref: ImageRef) -> Tile:
        return await self._fetch(ref.key, ref.fmt, self._produce_image, ref)

    async def _produce_image(self, ref: ImageRef) -> Tile:
        reader = self.library.reader(ref.entry)
        self.metrics.renders_in_flight.inc()
        try:
            data = await self.run(
                render_image, reader, ref.region, ref.quarter_turns, ref.degrees, ref.mirror,
                ref.quality, ref.fmt, self.jpeg_quality,
            )
        finally:
            self.metrics.renders_in_flight.dec()
        return Tile(data, codecs.MEDIA_TYPES[ref.fmt], "rendered")

    # -- whole images ------------------------------------------------------------
    async def thumbnail(self, slide_id: str, max_size: int) -> tuple[bytes, str]:
        if not 1 <= max_size <= 4096:
            raise BadRequest("max_size must be between 1 and 4096")
        entry = await self.entry(slide_id)
        key = f"thumb:{entry.fingerprint}:{max_size}:{self.jpeg_quality}"
        data = await self.cache.get(key)
        if data is None:
            reader = self.library.reader(entry)
            data = await self.run(self._render_thumbnail, reader, max_size)
            await self.cache.set(key, data)
        return data, etag_for(key)

    def _render_thumbnail(self, reader: SlideReader, max_size: int) -> bytes:
        meta = reader.metadata
        level = len(meta.levels) - 1
        for i, lv in enumerate(meta.levels):
            if max(lv.width, lv.height) >= max_size:
                level = i
        lv = meta.levels[level]
        size = thumbnail_size((lv.width, lv.height), (max_size, max_size))
        pixels = None
        if lv.width * lv.height > _MAX_THUMBNAIL_SOURCE_PIXELS:
            if lv.width * lv.height > _MAX_THUMBNAIL_SOURCE_PIXELS * 16:
                raise UnreadableSlide("the slide has no level small enough for a thumbnail")
            pixels = reader.read_scaled(level, 0, 0, lv.width, lv.height, 8)
            if pixels is None:
                raise UnreadableSlide("the slide has no level small enough for a thumbnail")
        if pixels is None:
            pixels = reader.read_region(level, 0, 0, lv.width, lv.height)
        return codecs.encode(codecs.resize(pixels, size), "jpeg", 90)

    async def associated(self, slide_id: str, name: str) -> tuple[bytes, str]:
        entry = await self.entry(slide_id)
        assert entry.metadata is not None
        if name not in entry.metadata.associated:
            raise NotFound("the slide has no associated image of this name")
        key = f"assoc:{entry.fingerprint}:{name}"
        data = await self.cache.get(key)
        if data is None:
            reader = self.library.reader(entry)

            def work() -> bytes:
                pixels = reader.associated_image(name)
                if max(pixels.shape[:2]) > codecs.JPEG_MAX_SIDE:  # a damaged header's size
                    raise UnreadableSlide(f"the {name} image is too large to send as JPEG")
                return codecs.encode(pixels, "jpeg", 90)

            data = await self.run(work)
            await self.cache.set(key, data)
        return data, etag_for(key)
