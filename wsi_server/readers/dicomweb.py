"""A ``SlideReader`` over WADO-RS: the slides of a ``--dicomweb-source`` archive.

Frames are fetched from the archive in batches (all the frames a region needs in one
request) and kept in a small per-slide buffer; the tile path asks for them ahead on the
event loop (``prefetch``, awaited before the render thread reads), so a cold Deep Zoom
tile costs one WADO-RS round trip and no render thread waits on the network. A Deep Zoom
tile that is exactly one stored JPEG frame passes through unchanged (``read_raw_tile``).
Rendered tiles are cached by the tile cache like any other slide's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import imagecodecs
import numpy as np

from wsi_server import codecs
from wsi_server.dicom.remote import (
    PATH_PREFIX,
    DicomwebSource,
    RemoteInstance,
    RemoteSeries,
    SourceSet,
)
from wsi_server.errors import NotFound, UnreadableSlide
from wsi_server.readers.base import RawTile, SlideMetadata

BUFFER_FRAMES = 256
_PASSTHROUGH = {"YBR_FULL_422", "YBR_FULL"}


def decode_frame(data: bytes, inst: RemoteInstance) -> np.ndarray:
    """RGB pixels of one frame as the archive sent it (stored transfer syntax)."""
    try:
        if data[:2] == b"\xff\xd8":
            try:
                return codecs.decode_jpeg(data)
            except Exception:  # RGB-component (Adobe) JPEG: libjpeg honours the marker
                return codecs.to_rgb(np.asarray(imagecodecs.jpeg8_decode(data)))
        if data[:4] == b"\xff\x4f\xff\x51" or data[4:8] == b"jP  ":
            return codecs.to_rgb(np.asarray(imagecodecs.jpeg2k_decode(data)))
        size = inst.tile_w * inst.tile_h * inst.samples
        arr = np.frombuffer(data[:size], np.uint8)
        return codecs.to_rgb(arr.reshape(inst.tile_h, inst.tile_w, inst.samples))
    except Exception as exc:
        raise UnreadableSlide("a frame from the DICOMweb archive cannot be decoded") from exc


class DicomwebReader:
    def __init__(self, source: DicomwebSource, series: RemoteSeries) -> None:
        self.source = source
        self.series = series
        self.path = series.path
        self.metadata: SlideMetadata = series.metadata
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    # -- the frame buffer ------------------------------------------------------------
    def _get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    def _put(self, inst: RemoteInstance, numbers: list[int], frames: list[bytes]) -> None:
        with self._lock:
            for n, data in zip(numbers, frames, strict=True):
                self._frames[(inst.uid, n)] = data
            while len(self._frames) > BUFFER_FRAMES:
                self._frames.popitem(last=False)

    def _frames_for(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int
                    ) -> tuple[RemoteInstance, float, list[tuple[int, int, int]]]:
        """The instance of ``level``, its downsample and (frame number, col, row) of every
        frame the region touches."""
        if not 0 <= level < len(self.series.levels):
            raise NotFound("no such level")
        inst = self.series.levels[level]
        ds = self.metadata.levels[level].downsample
        l_x, l_y = int(l0_x / ds), int(l0_y / ds)
        c0, r0 = max(0, l_x // inst.tile_w), max(0, l_y // inst.tile_h)
        c1 = min(inst.cols - 1, (l_x + max(l_w, 1) - 1) // inst.tile_w)
        r1 = min(inst.rows - 1, (l_y + max(l_h, 1) - 1) // inst.tile_h)
        out = [(r * inst.cols + c + 1, c, r) for r in range(r0, r1 + 1)
               for c in range(c0, c1 + 1)]
        return inst, ds, out

    def _missing(self, inst: RemoteInstance, numbers: list[int]) -> list[int]:
        return [n for n in numbers if self._get((inst.uid, n)) is None]

    async def prefetch(self, level: int, l0_location: tuple[int, int], l_size: tuple[int, int]
                       ) -> None:
        """Fetch the frames a region needs, in one request, on the event loop."""
        inst, _, frames = self._frames_for(level, l0_location[0], l0_location[1], *l_size)
        missing = self._missing(inst, [n for n, _, _ in frames])
        if missing:
            self._put(inst, missing, await self.source.fetch_async(self.series, inst, missing))

    def _load(self, inst: RemoteInstance, numbers: list[int]) -> dict[int, bytes]:
        got = {n: d for n in numbers if (d := self._get((inst.uid, n))) is not None}
        missing = [n for n in numbers if n not in got]
        if missing:
            fetched = self.source.fetch(self.series, inst, missing)
            self._put(inst, missing, fetched)
            got.update(zip(missing, fetched, strict=True))
        return got

    # -- SlideReader -----------------------------------------------------------------
    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        inst, ds, frames = self._frames_for(level, l0_x, l0_y, l_w, l_h)
        out = np.empty((l_h, l_w, 3), np.uint8)
        codecs.fill(out, self.metadata.background)
        if l_w <= 0 or l_h <= 0:
            return out
        data = self._load(inst, [n for n, _, _ in frames])
        l_x, l_y = int(l0_x / ds), int(l0_y / ds)
        for n, col, row in frames:
            pixels = decode_frame(data[n], inst)
            fx, fy = col * inst.tile_w, row * inst.tile_h
            # intersection of the frame (inside the level) with the region
            x0, y0 = max(fx, l_x), max(fy, l_y)
            x1 = min(fx + inst.tile_w, l_x + l_w, inst.width)
            y1 = min(fy + inst.tile_h, l_y + l_h, inst.height)
            if x1 <= x0 or y1 <= y0:
                continue
            out[y0 - l_y : y1 - l_y, x0 - l_x : x1 - l_x] = pixels[
                y0 - fy : y1 - fy, x0 - fx : x1 - fx]
        return out

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        """A stored JPEG frame, when it is already in the buffer (this runs on the event
        loop: it never waits on the network; the tile path prefetches it)."""
        if not 0 <= level < len(self.series.levels):
            return None
        inst = self.series.levels[level]
        if inst.photometric not in _PASSTHROUGH:
            return None
        if not (0 <= col < inst.cols and 0 <= row < inst.rows):
            return None
        if (col + 1) * inst.tile_w > inst.width or (row + 1) * inst.tile_h > inst.height:
            return None  # a partial frame at the edge: rendered (cropped) instead
        data = self._get((inst.uid, row * inst.cols + col + 1))
        if data is None or data[:2] != b"\xff\xd8":
            return None
        return RawTile(data, "image/jpeg", (inst.tile_w, inst.tile_h))

    def read_scaled(self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
                    ) -> np.ndarray | None:
        return None

    def associated_image(self, name: str) -> np.ndarray:
        inst = self.series.associated.get(name)
        if inst is None:
            raise NotFound("the slide has no associated image of this name")
        numbers = list(range(1, inst.frames + 1))
        if len(numbers) > 64:
            raise UnreadableSlide("the associated image is too large")
        data = self._load(inst, numbers)
        out = np.empty((inst.height, inst.width, 3), np.uint8)
        for n in numbers:
            col, row = (n - 1) % inst.cols, (n - 1) // inst.cols
            pixels = decode_frame(data[n], inst)
            fx, fy = col * inst.tile_w, row * inst.tile_h
            w, h = min(inst.tile_w, inst.width - fx), min(inst.tile_h, inst.height - fy)
            out[fy : fy + h, fx : fx + w] = pixels[:h, :w]
        return out

    def close(self) -> None:
        with self._lock:
            self._frames.clear()


class DicomwebBackend:
    """The registry's way to the slides of ``--dicomweb-source`` archives."""

    name = "dicomweb"
    priority = 0

    def __init__(self, sources: SourceSet) -> None:
        self.sources = sources

    def can_open(self, path: Path) -> bool:
        return str(path).startswith(PATH_PREFIX)

    def open(self, path: Path) -> DicomwebReader:
        found = self.sources.series_at(path)
        if found is None:
            raise UnreadableSlide("the DICOMweb archive no longer lists this series")
        return DicomwebReader(*found)
