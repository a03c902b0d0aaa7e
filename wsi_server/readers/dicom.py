"""DICOM-WSI backend: a slide is a folder holding the instances of one series.

Pixels come from OpenSlide (its DICOM reader assembles the series); the JPEG frames of a
TILED_FULL instance are located once with pydicom and then passed through with one
``os.pread`` each, since a DICOM JPEG frame is already a complete, browser-decodable JPEG.

A file whose Photometric Interpretation contradicts its JPEG codestream (some converters
write RGB over YCbCr (JFIF) data, or YBR_FULL_422 over RGB-component (Adobe APP14,
transform 0) data) is shown in the codestream's colours, as a browser shows its frames:
OpenSlide follows the attribute and gets the colours wrong, so the levels of such a file
are decoded here, frame by frame, by libjpeg-turbo (which follows the JFIF and Adobe
markers, as browsers do). A level whose frames cannot be located one by one (several
fragments per frame) keeps OpenSlide's pixels with the colour transform it omitted
applied (exact), or the one it wrongly applied inverted (approximate: OpenSlide clipped).
Frames are passed through as they are (the codestream is right; no marker is added).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pydicom
import simplejpeg
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.tag import Tag

from wsi_server import codecs
from wsi_server.dicom.frames import jpeg_photometric
from wsi_server.errors import UnreadableSlide
from wsi_server.readers import grid
from wsi_server.readers.base import DECODE_ERRORS, RawTile
from wsi_server.readers.openslide_backend import OpenSlideReader, openslide_cache

log = logging.getLogger(__name__)

_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_JPEG_BASELINE = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_PHOTOMETRIC = {"YBR_FULL_422", "YBR_FULL", "RGB"}
_PIXEL_DATA = Tag(0x7FE00010)
_DECODED_TILES = 64
"""Decoded frames kept per reader (of a file decoded here): a Deep Zoom tile with overlap
reads up to four frames, and its neighbours read the same ones."""


@dataclass(frozen=True)
class _Frames:
    path: Path
    cols: int
    rows: int
    tile_w: int
    tile_h: int
    width: int
    height: int
    offsets: tuple[int, ...]
    """File offset of each frame's item header (8 bytes before the JPEG)."""


@dataclass(frozen=True)
class _Instance:
    width: int
    height: int
    stated: str
    """The Photometric Interpretation the file states."""
    coded: str | None
    """The one its first frame's JPEG codestream implies (None when not known)."""
    frames: _Frames | None
    """Where each frame is, when every frame is one fragment of a TILED_FULL grid."""

    @property
    def contradicted(self) -> bool:
        """The codestream says RGB components where the file says YCbCr, or the reverse."""
        if self.coded is None or self.coded == self.stated:
            return False
        return self.coded.startswith("YBR") != self.stated.startswith("YBR")


def _first_fragment(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        header = f.read(8)
        if len(header) != 8:
            return b""
        length = struct.unpack("<I", header[4:])[0]
        return f.read(min(length, 1 << 16))  # the markers are in the first bytes


def _index_instance(path: Path) -> _Instance | None:
    ds = pydicom.dcmread(path, defer_size=1024)
    if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS:
        return None
    if "VOLUME" not in list(ds.get("ImageType", [])):
        return None
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in _JPEG_BASELINE:
        return None
    stated = str(ds.get("PhotometricInterpretation", ""))
    if stated not in _PHOTOMETRIC:
        return None
    if str(ds.get("DimensionOrganizationType", "TILED_FULL")) != "TILED_FULL":
        return None
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1:
        return None
    frames = int(ds.get("NumberOfFrames", 1))
    tile_w, tile_h = int(ds.Columns), int(ds.Rows)
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    cols, rows = -(-width // tile_w), -(-height // tile_h)
    raw = ds._dict.get(_PIXEL_DATA)
    value_tell = getattr(raw, "value_tell", None)
    if value_tell is None:
        return None
    with open(path, "rb") as f:
        f.seek(value_tell)
        parse_basic_offsets(f)
        count, offsets = parse_fragments(f)
    coded = jpeg_photometric(_first_fragment(path, offsets[0])) if offsets else None
    located = None
    # a frame split over several fragments: no single ranged read
    if cols * rows == frames and count == frames:
        located = _Frames(path, cols, rows, tile_w, tile_h, width, height, tuple(offsets))
    return _Instance(width, height, stated, coded, located)


def _undo_openslide_transform(pixels: np.ndarray, stated: str) -> np.ndarray:
    """OpenSlide's pixels of a contradicted level brought to the codestream's colours:
    over YCbCr data labelled RGB it skipped the YCbCr to RGB transform; over RGB data
    labelled YCbCr it applied one that the data did not need (inverted here; only
    approximately, as OpenSlide clipped its out-of-gamut results)."""
    if stated == "RGB":
        return codecs.ycbcr_to_rgb(pixels)
    rgb = pixels.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ycc = np.stack((
        0.299 * r + 0.587 * g + 0.114 * b,
        -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
        0.5 * r - 0.418688 * g - 0.081312 * b + 128.0,
    ), axis=-1)
    return np.clip(np.rint(ycc), 0, 255).astype(np.uint8)


class DicomReader(OpenSlideReader):
    def __init__(self, path: Path, cache: openslide.OpenSlideCache | None = None) -> None:
        super().__init__(path, cache)
        self.metadata = dataclasses.replace(self.metadata, format="dicom", vendor="dicom")
        self._frames: dict[int, _Frames] = {}
        self._fds: dict[Path, int] = {}
        self._contradicted: dict[int, str] = {}
        """Levels whose codestream contradicts the stated photometric: the stated one."""
        self._decoded: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._decoded_lock = threading.Lock()
        dims = {(lv.width, lv.height): i for i, lv in enumerate(self.metadata.levels)}
        seen: set[int] = set()
        for child in sorted(path.iterdir()) if path.is_dir() else [path]:
            if child.suffix.lower() != ".dcm":
                continue
            try:
                inst = _index_instance(child)
            except Exception:
                continue
            level = dims.get((inst.width, inst.height)) if inst else None
            if inst is None or level is None or level in seen:
                continue
            seen.add(level)
            if inst.contradicted:
                log.info("%s: Photometric Interpretation %s contradicts the JPEG "
                         "codestream (%s); shown in the codestream's colours",
                         child.name, inst.stated, inst.coded)
                self._contradicted[level] = inst.stated
            if inst.frames is not None and inst.coded in _PHOTOMETRIC:
                self._frames[level] = inst.frames
                self._fds[child] = os.open(child, os.O_RDONLY)

    # -- pixels of a file whose photometric contradicts its codestream ---------------
    def _frame(self, frames: _Frames, index: int) -> bytes | None:
        """The JPEG of one frame (also at the right and bottom edges), None if damaged."""
        fd = self._fds[frames.path]
        offset = frames.offsets[index]
        header = os.pread(fd, 8, offset)
        if len(header) != 8:
            return None
        length = struct.unpack("<I", header[4:])[0]
        if offset + 8 + length > os.fstat(fd).st_size:  # a damaged item length
            return None
        data = os.pread(fd, length, offset + 8)
        if len(data) != length or not data.startswith(codecs.SOI):
            return None
        end = data.rfind(b"\xff\xd9")  # fragments are padded to even length
        if end < 0:
            return None
        return data[: end + 2]

    def _decode_frames(self, level: int, addresses: list[tuple[int, int]], factor: int
                       ) -> list[np.ndarray | None]:
        frames = self._frames[level]
        out: list[np.ndarray | None] = []
        for col, row in addresses:
            key = (level, row * frames.cols + col, factor)
            with self._decoded_lock:
                pixels = self._decoded.get(key)
                if pixels is not None:
                    self._decoded.move_to_end(key)
            if pixels is None:
                try:
                    data = self._frame(frames, key[1])
                except OSError as exc:
                    raise UnreadableSlide("a frame of the DICOM file cannot be read") from exc
                if data is None:
                    raise UnreadableSlide("a frame of the DICOM file is damaged")
                try:
                    w, h, _, _ = simplejpeg.decode_jpeg_header(data)
                    if w > frames.tile_w or h > frames.tile_h:  # never a damaged SOF's size
                        raise ValueError(f"a {w}x{h} frame in a grid of "
                                         f"{frames.tile_w}x{frames.tile_h}")
                    pixels = codecs.decode_jpeg(data, factor, (frames.tile_w, frames.tile_h))
                except DECODE_ERRORS as exc:
                    raise UnreadableSlide("a frame of the DICOM file cannot be decoded"
                                          ) from exc
                with self._decoded_lock:
                    self._decoded[key] = pixels
                    if len(self._decoded) > _DECODED_TILES:
                        self._decoded.popitem(last=False)
            out.append(pixels)
        return out

    def _paint(self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
               ) -> np.ndarray:
        frames = self._frames[level]
        return grid.paint(
            (l_x, l_y, l_w, l_h),
            grid.scaled_size((frames.width, frames.height), factor),
            (frames.tile_w // factor, frames.tile_h // factor),
            lambda addresses: self._decode_frames(level, addresses, factor),
            self.metadata.background,
        )

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        stated = self._contradicted.get(level)
        if stated is None:
            return super().read_region(level, l0_x, l0_y, l_w, l_h)
        if level in self._frames:
            ds = self.metadata.levels[level].downsample
            return self._paint(level, round(l0_x / ds), round(l0_y / ds), l_w, l_h, 1)
        return _undo_openslide_transform(super().read_region(level, l0_x, l0_y, l_w, l_h),
                                         stated)

    def read_scaled(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray | None:
        frames = self._frames.get(level)
        if (level not in self._contradicted or frames is None
                or frames.tile_w % factor or frames.tile_h % factor):
            return None
        return self._paint(level, l_x // factor, l_y // factor, math.ceil(l_w / factor),
                           math.ceil(l_h / factor), factor)

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        frames = self._frames.get(level)
        if frames is None or not (0 <= col < frames.cols and 0 <= row < frames.rows):
            return None
        if (col + 1) * frames.tile_w > frames.width or (row + 1) * frames.tile_h > frames.height:
            return None
        # The codestream as it is: a browser decodes JFIF as YCbCr and Adobe transform 0
        # as RGB, the colours the frames are shown in everywhere.
        data = self._frame(frames, row * frames.cols + col)
        if data is None:
            return None
        return RawTile(data, codecs.JPEG, (frames.tile_w, frames.tile_h))

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        super().close()


class DicomBackend:
    name = "dicom"
    priority = 20

    def __init__(self, cache: openslide.OpenSlideCache | None = None) -> None:
        self.cache = cache if cache is not None else openslide_cache()

    def can_open(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        return any(c.suffix.lower() == ".dcm" for c in path.iterdir())

    def open(self, path: Path) -> DicomReader:
        return DicomReader(path, self.cache)
