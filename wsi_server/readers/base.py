"""The ``SlideReader`` protocol every backend implements, and the metadata it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from wsi_server.geometry import Pyramid, Size

DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, RuntimeError, OSError, IndexError, KeyError, TypeError, MemoryError,
    ArithmeticError,
)
"""What a parser or decoder raises on damaged bytes (tifffile's ``TiffFileError`` is a
``ValueError``, imagecodecs' errors are ``RuntimeError``s, ...): a backend turns them into
``UnreadableSlide`` at its boundary, so that no route has to catch them."""
MAX_DECODE_PIXELS = 2**28
"""The most pixels a backend decodes for one image (an associated image, a region): more
is a damaged header's size, not a slide's (768 MiB of RGB)."""


@dataclass(frozen=True, slots=True)
class LevelInfo:
    width: int
    height: int
    downsample: float
    tile_size: Size | None
    """Stored tile (width, height) of this level, or None when the level is not tiled."""


@dataclass(frozen=True)
class SlideMetadata:
    format: str
    """Backend-neutral format name: ``aperio``, ``hamamatsu``, ``dicom``, ``generic-tiff``..."""
    vendor: str | None
    levels: tuple[LevelInfo, ...]
    mpp: tuple[float, float] | None
    objective_power: float | None
    associated: tuple[str, ...]
    bounds: tuple[int, int, int, int] | None
    """Non-empty region (x, y, w, h) in level-0 pixels, when the file says."""
    background: tuple[int, int, int] = (255, 255, 255)
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def tile_size(self) -> Size | None:
        return self.levels[0].tile_size

    def pyramid(self) -> Pyramid:
        return Pyramid(
            l_dimensions=tuple((lv.width, lv.height) for lv in self.levels),
            l0_l_downsamples=tuple(lv.downsample for lv in self.levels),
            l0_bounds=self.bounds,
        )


@dataclass(frozen=True, slots=True)
class RawTile:
    """A stored tile, ready to send: complete encoded bytes and their media type."""

    data: bytes
    media_type: str
    size: Size
    """(width, height) of the pixels the stored tile holds inside the level."""


@runtime_checkable
class SlideReader(Protocol):
    """One open slide. Implementations must be safe to call from many threads at once."""

    path: Path
    metadata: SlideMetadata

    def read_region(self, level: int, l0_x: int, l0_y: int, l_w: int, l_h: int) -> np.ndarray:
        """RGB ``uint8`` array of shape ``(l_h, l_w, 3)`` from ``level``, top-left at the
        level-0 pixel ``(l0_x, l0_y)`` (OpenSlide's ``read_region`` convention). Pixels
        outside the level are the slide's background colour."""
        ...

    def read_raw_tile(self, level: int, col: int, row: int) -> RawTile | None:
        """The stored tile at (col, row) of ``level`` as a complete, browser-decodable image,
        or None when the level has no such passthrough-able tile (not tiled, not JPEG, or
        partial at the edge of the level)."""
        ...

    def read_scaled(
        self, level: int, l_x: int, l_y: int, l_w: int, l_h: int, factor: int
    ) -> np.ndarray | None:
        """Region of ``level`` (in that level's pixels) decoded at 1/``factor`` scale
        (factor 2, 4 or 8, using the JPEG decoder's DCT scaling), or None when the backend
        cannot do better than ``read_region`` followed by a resize."""
        ...

    def associated_image(self, name: str) -> np.ndarray:
        """RGB array of a label, macro or thumbnail image the file carries."""
        ...

    def close(self) -> None: ...


class ReaderBackend(Protocol):
    """A kind of reader the registry can choose."""

    name: str
    priority: int
    """Lower is tried first."""

    def can_open(self, path: Path) -> bool:
        """Cheap check (header bytes, extension, folder layout); no full parse."""
        ...

    def open(self, path: Path) -> SlideReader:
        """Open the slide; raise ``UnsupportedSlide`` or ``UnreadableSlide``."""
        ...
