"""DICOM-WSI backend: a slide is a folder holding the instances of one series.

Pixels come from OpenSlide (its DICOM reader assembles the series); the JPEG frames of a
TILED_FULL instance are located once with pydicom and then passed through with one
``os.pread`` each, since a DICOM JPEG frame is already a complete, browser-decodable JPEG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.tag import Tag

from wsi_server import codecs
from wsi_server.readers.base import RawTile
from wsi_server.readers.openslide_backend import OpenSlideReader

_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_JPEG_BASELINE = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_PASSTHROUGH_PHOTOMETRIC = {"YBR_FULL_422", "YBR_FULL"}
_PIXEL_DATA = Tag(0x7FE00010)


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


def _index_instance(path: Path) -> _Frames | None:
    ds = pydicom.dcmread(path, defer_size=1024)
    if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS:
        return None
    if "VOLUME" not in list(ds.get("ImageType", [])):
        return None
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in _JPEG_BASELINE:
        return None
    if str(ds.get("PhotometricInterpretation", "")) not in _PASSTHROUGH_PHOTOMETRIC:
        return None
    if str(ds.get("DimensionOrganizationType", "TILED_FULL")) != "TILED_FULL":
        return None
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1:
        return None
    frames = int(ds.get("NumberOfFrames", 1))
    tile_w, tile_h = int(ds.Columns), int(ds.Rows)
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    cols, rows = -(-width // tile_w), -(-height // tile_h)
    if cols * rows != frames:
        return None
    raw = ds._dict.get(_PIXEL_DATA)
    value_tell = getattr(raw, "value_tell", None)
    if value_tell is None:
        return None
    with open(path, "rb") as f:
        f.seek(value_tell)
        parse_basic_offsets(f)
        count, offsets = parse_fragments(f)
    if count != frames:  # a frame split over several fragments: no single ranged read
        return None
    return _Frames(path, cols, rows, tile_w, tile_h, width, height, tuple(offsets))


class DicomReader(OpenSlideReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.metadata = dataclasses.replace(self.metadata, format="dicom", vendor="dicom")
        self._frames: dict[int, _Frames] = {}
        self._fds: dict[Path, int] = {}
        dims = {(lv.width, lv.height): i for i, lv in enumerate(self.metadata.levels)}
        for child in sorted(path.iterdir()) if path.is_dir() else [path]:
            if child.suffix.lower() != ".dcm":
                continue
            try:
                frames = _index_instance(child)
            except Exception:
                continue
            level = dims.get((frames.width, frames.height)) if frames else None
            if frames is not None and level is not None and level not in self._frames:
                self._frames[level] = frames
                self._fds[child] = os.open(child, os.O_RDONLY)

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        frames = self._frames.get(level)
        if frames is None or not (0 <= col < frames.cols and 0 <= row < frames.rows):
            return None
        if (col + 1) * frames.tile_w > frames.width or (row + 1) * frames.tile_h > frames.height:
            return None
        fd = self._fds[frames.path]
        offset = frames.offsets[row * frames.cols + col]
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
        return RawTile(data[: end + 2], codecs.JPEG, (frames.tile_w, frames.tile_h))

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        super().close()


class DicomBackend:
    name = "dicom"
    priority = 20

    def can_open(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        return any(c.suffix.lower() == ".dcm" for c in path.iterdir())

    def open(self, path: Path) -> DicomReader:
        return DicomReader(path)
