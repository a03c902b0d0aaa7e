"""OpenSlide backend: every format OpenSlide 4 reads (NDPI, MRXS, SCN, BIF, Philips, VMS,
Aperio JPEG 2000, DICOM-WSI pixels...). OpenSlide handles are thread-safe and ctypes
releases the GIL during reads."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_server.errors import UnreadableSlide, UnsupportedSlide
from wsi_server.readers.base import LevelInfo, RawTile, SlideMetadata

_DICOM_SUFFIX = ".dcm"
OPENSLIDE_CACHE_BYTES = 64 * 2**20


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _hex_rgb(value: str | None) -> tuple[int, int, int]:
    if value and len(value) == 6:
        try:
            return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))
        except ValueError:
            pass
    return (255, 255, 255)


def openslide_cache(capacity: int = OPENSLIDE_CACHE_BYTES) -> openslide.OpenSlideCache | None:
    """One tile cache for OpenSlide handles to share. Without it each handle keeps a private
    cache of 32 MiB, so a pool of 32 open slides may hold 1 GiB of decoded tiles. None when
    the OpenSlide library is older than 4.0 (no shareable caches)."""
    try:
        return openslide.OpenSlideCache(capacity)
    except openslide.OpenSlideError:  # OpenSlideVersionError
        return None


def openslide_target(path: Path) -> Path:
    """The file OpenSlide must be given: a DICOM folder is opened through one instance."""
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.suffix.lower() == _DICOM_SUFFIX and child.is_file():
                return child
    return path


def metadata_from_openslide(osr: openslide.OpenSlide) -> SlideMetadata:
    props = dict(osr.properties)
    levels = []
    for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples, strict=True)):
        tw = props.get(f"openslide.level[{i}].tile-width")
        th = props.get(f"openslide.level[{i}].tile-height")
        tile = (int(tw), int(th)) if tw and th else None
        levels.append(LevelInfo(w, h, float(ds), tile))
    mx, my = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    bounds = None
    if "openslide.bounds-x" in props:
        w0, h0 = osr.dimensions
        bounds = (
            int(props.get("openslide.bounds-x", 0)),
            int(props.get("openslide.bounds-y", 0)),
            int(props.get("openslide.bounds-width", w0)),
            int(props.get("openslide.bounds-height", h0)),
        )
    vendor = props.get("openslide.vendor")
    return SlideMetadata(
        format=vendor or "unknown",
        vendor=vendor,
        levels=tuple(levels),
        mpp=(mx, my) if mx and my else None,
        objective_power=_float(props.get("openslide.objective-power")),
        associated=tuple(sorted(osr.associated_images.keys())),
        bounds=bounds,
        background=_hex_rgb(props.get("openslide.background-color")),
        properties=props,
    )


class OpenSlideReader:
    """An OpenSlide handle. OpenSlide's errors are sticky (after one failed read every
    later call on the handle fails), so a failed read replaces the handle, and associated
    images are read through a handle of their own: one damaged tile or label does not
    make the rest of the slide unreadable."""

    def __init__(self, path: Path, cache: openslide.OpenSlideCache | None = None) -> None:
        self.path = path
        self._target = openslide_target(path)
        self._cache = cache
        self._lock = threading.Lock()
        try:
            self._osr = self._open_handle()
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedSlide("no reader supports this file format") from exc
        except openslide.OpenSlideError as exc:
            raise UnreadableSlide(f"OpenSlide cannot read this slide: {exc}") from exc
        self.metadata = metadata_from_openslide(self._osr)
        self._bg = "#%02x%02x%02x" % self.metadata.background

    def _open_handle(self) -> openslide.OpenSlide:
        osr = openslide.OpenSlide(self._target)
        if self._cache is not None:
            osr.set_cache(self._cache)
        return osr

    def _replace_handle(self, broken: openslide.OpenSlide) -> None:
        """A fresh handle for the next reads; the broken one is released (not closed:
        another thread may still be in a call on it) when its last reference goes."""
        with self._lock:
            if self._osr is broken:
                with contextlib.suppress(openslide.OpenSlideError):
                    self._osr = self._open_handle()

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        osr = self._osr
        try:
            tile = osr.read_region((l0_x, l0_y), level, (l_w, l_h))
        except (openslide.OpenSlideError, MemoryError, ValueError) as exc:
            if isinstance(exc, openslide.OpenSlideError):
                self._replace_handle(osr)
            raise UnreadableSlide(f"OpenSlide read failed: {exc}") from exc
        bg = Image.new("RGB", tile.size, self._bg)
        return np.asarray(Image.composite(tile, bg, tile))

    def read_scaled(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray | None:
        return None

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        return None

    def associated_image(self, name: str) -> np.ndarray:
        try:
            with openslide.OpenSlide(self._target) as osr:
                img = osr.associated_images[name]
        except openslide.OpenSlideError as exc:
            raise UnreadableSlide(f"OpenSlide cannot read the {name} image: {exc}") from exc
        bg = Image.new("RGB", img.size, self._bg)
        return np.asarray(Image.composite(img, bg, img))

    def close(self) -> None:
        self._osr.close()


class OpenSlideBackend:
    name = "openslide"
    priority = 50

    def __init__(self, cache: openslide.OpenSlideCache | None = None) -> None:
        self.cache = cache if cache is not None else openslide_cache()

    def can_open(self, path: Path) -> bool:
        try:
            return openslide.OpenSlide.detect_format(str(openslide_target(path))) is not None
        except Exception:
            return False

    def open(self, path: Path) -> OpenSlideReader:
        return OpenSlideReader(path, self.cache)
