"""Deep Zoom geometry as pure computations over frozen values.

Exact to openslide-python's ``DeepZoomGenerator`` for the same slide, tile size, overlap
and ``limit_bounds`` (including the final tile size that its ``Image.thumbnail`` call
produces). Coordinate spaces are named by prefix, as in ``deepzoom.py``:

- ``l0_``: level-0 (full resolution) pixels of the slide;
- ``l_``: pixels of one stored slide level;
- ``z_``: pixels of one Deep Zoom level;
- ``t_``: tile addresses (column, row) within a Deep Zoom level.

Nothing here reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Size = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Pyramid:
    """What geometry needs to know of a slide: its stored levels and its non-empty bounds."""

    l_dimensions: tuple[Size, ...]
    """(width, height) of each stored level, finest first."""
    l0_l_downsamples: tuple[float, ...]
    """Downsample of each stored level relative to level 0."""
    l0_bounds: tuple[int, int, int, int] | None = None
    """(x, y, width, height) of the non-empty region in level-0 pixels, when known."""

    @property
    def l0_dimensions(self) -> Size:
        return self.l_dimensions[0]

    def best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's ``get_best_level_for_downsample``."""
        if downsample < self.l0_l_downsamples[0]:
            return 0
        for i in range(1, len(self.l0_l_downsamples)):
            if downsample < self.l0_l_downsamples[i]:
                return i - 1
        return len(self.l0_l_downsamples) - 1


@dataclass(frozen=True, slots=True)
class TileRegion:
    """Where one Deep Zoom tile comes from and what size it ends up."""

    slide_level: int
    l0_location: tuple[int, int]
    """Top-left of the region to read, in level-0 pixels (``read_region`` arguments)."""
    l_size: Size
    """Size of the region to read, in pixels of ``slide_level``."""
    z_size: Size
    """Size the Deep Zoom descriptor promises for this tile."""
    out_size: Size
    """Size of the delivered tile: ``z_size`` after ``Image.thumbnail``'s aspect rule."""
    l_z_downsample: float
    """Scale from Deep Zoom pixels to ``slide_level`` pixels."""


@dataclass(frozen=True, slots=True)
class GeometryParams:
    tile_size: int = 254
    overlap: int = 1
    limit_bounds: bool = False

    def key(self) -> str:
        return f"t{self.tile_size}o{self.overlap}{'b' if self.limit_bounds else 'f'}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class DeepZoomGeometry:
    params: GeometryParams
    l0_offset: tuple[int, int]
    l_dimensions: tuple[Size, ...]
    z_dimensions: tuple[Size, ...]
    t_dimensions: tuple[Size, ...]
    slide_from_dz_level: tuple[int, ...]
    l_z_downsamples: tuple[float, ...]
    l0_l_downsamples: tuple[float, ...]

    @property
    def level_count(self) -> int:
        return len(self.z_dimensions)

    @property
    def l0_dimensions(self) -> Size:
        return self.l_dimensions[0]

    @property
    def tile_size(self) -> int:
        return self.params.tile_size

    @property
    def overlap(self) -> int:
        return self.params.overlap

    def contains(self, dz_level: int, col: int, row: int) -> bool:
        if not 0 <= dz_level < self.level_count:
            return False
        t_cols, t_rows = self.t_dimensions[dz_level]
        return 0 <= col < t_cols and 0 <= row < t_rows

    def tile_region(self, dz_level: int, col: int, row: int) -> TileRegion:
        """The read for one tile; raises ``ValueError`` for an address outside the grid."""
        if not self.contains(dz_level, col, row):
            raise ValueError("tile address outside the Deep Zoom grid")
        z_t = self.params.tile_size
        z_overlap = self.params.overlap
        slide_level = self.slide_from_dz_level[dz_level]
        l_z = self.l_z_downsamples[dz_level]
        l0_l = self.l0_l_downsamples[slide_level]
        t_location = (col, row)
        t_lims = self.t_dimensions[dz_level]
        z_lims = self.z_dimensions[dz_level]
        l_lims = self.l_dimensions[slide_level]
        l0_loc: list[int] = []
        l_size: list[int] = []
        z_size: list[int] = []
        for axis in (0, 1):
            t = t_location[axis]
            z_tl = z_overlap * int(t != 0)
            z_br = z_overlap * int(t != t_lims[axis] - 1)
            z_dim = min(z_t, z_lims[axis] - z_t * t) + z_tl + z_br
            l_loc = l_z * (z_t * t - z_tl)
            l0_loc.append(int(l0_l * l_loc + self.l0_offset[axis]))
            l_size.append(int(min(math.ceil(l_z * z_dim), l_lims[axis] - math.ceil(l_loc))))
            z_size.append(z_dim)
        l_wh = (l_size[0], l_size[1])
        z_wh = (z_size[0], z_size[1])
        return TileRegion(
            slide_level=slide_level,
            l0_location=(l0_loc[0], l0_loc[1]),
            l_size=l_wh,
            z_size=z_wh,
            out_size=thumbnail_size(l_wh, z_wh),
            l_z_downsample=l_z,
        )


def halvings(z_size: Size) -> tuple[Size, ...]:
    """Deep Zoom level sizes, finest first: halving with ceil down to 1×1."""
    z_dims = [z_size]
    while z_size[0] > 1 or z_size[1] > 1:
        z_size = (max(1, _ceil_div(z_size[0], 2)), max(1, _ceil_div(z_size[1], 2)))
        z_dims.append(z_size)
    return tuple(z_dims)


def deep_zoom(pyramid: Pyramid, params: GeometryParams) -> DeepZoomGeometry:
    """The Deep Zoom pyramid that ``DeepZoomGenerator(slide, *params)`` would build."""
    if params.tile_size < 1 or params.overlap < 0:
        raise ValueError("tile size must be >= 1 and overlap >= 0")
    l_dims = pyramid.l_dimensions
    if params.limit_bounds and pyramid.l0_bounds is not None:
        bx, by, bw, bh = pyramid.l0_bounds
        l0_offset = (bx, by)
        scale = (bw / l_dims[0][0], bh / l_dims[0][1])
        l_dims = tuple(
            (math.ceil(w * scale[0]), math.ceil(h * scale[1])) for w, h in pyramid.l_dimensions
        )
    else:
        l0_offset = (0, 0)
    z_dims = list(reversed(halvings(l_dims[0])))
    t = params.tile_size
    t_dims = tuple((math.ceil(w / t), math.ceil(h / t)) for w, h in z_dims)
    n = len(z_dims)
    l0_z = [2 ** (n - z - 1) for z in range(n)]
    slide_from_dz = tuple(pyramid.best_level_for_downsample(d) for d in l0_z)
    l_z = tuple(l0_z[z] / pyramid.l0_l_downsamples[slide_from_dz[z]] for z in range(n))
    return DeepZoomGeometry(
        params=params,
        l0_offset=l0_offset,
        l_dimensions=tuple(l_dims),
        z_dimensions=tuple(z_dims),
        t_dimensions=t_dims,
        slide_from_dz_level=slide_from_dz,
        l_z_downsamples=l_z,
        l0_l_downsamples=tuple(pyramid.l0_l_downsamples),
    )


def thumbnail_size(src: Size, box: Size) -> Size:
    """The size Pillow's ``Image.thumbnail(box)`` gives an image of size ``src``.

    ``DeepZoomGenerator.get_tile`` resizes with ``thumbnail``, which keeps the aspect ratio
    and never enlarges, so a delivered tile can differ by a pixel from ``z_size``.
    """
    w, h = src
    x, y = box
    if w <= 0 or h <= 0 or (x >= w and y >= h):
        return (w, h)
    aspect = w / h

    def round_aspect(number: float, key_fn: object) -> int:
        lo, hi = math.floor(number), math.ceil(number)
        return max(min(lo, hi, key=key_fn), 1)  # type: ignore[call-overload]

    if x / y >= aspect:
        x = round_aspect(y * aspect, lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, lambda n: 0 if n == 0 else abs(aspect - x / n))
    return (x, y)


def native_tile_size(stored: Size | None) -> int:
    """Tile size of the native grid: the stored square tile when it is 128-2048 px, else 256."""
    if stored is not None and stored[0] == stored[1] and 128 <= stored[0] <= 2048:
        return stored[0]
    return 256


def dzi_xml(geometry: DeepZoomGeometry, fmt: str) -> str:
    """The ``.dzi`` descriptor, byte for byte as ``DeepZoomGenerator.get_dzi`` writes it."""
    w, h = geometry.l0_dimensions
    return (
        f'<Image TileSize="{geometry.tile_size}" Overlap="{geometry.overlap}" Format="{fmt}" '
        f'xmlns="http://schemas.microsoft.com/deepzoom/2008"><Size Width="{w}" Height="{h}" />'
        "</Image>"
    )


def level_downsamples(l_dimensions: Sequence[Size]) -> tuple[float, ...]:
    """OpenSlide's downsample of each level: the mean of the two axis ratios to level 0."""
    w0, h0 = l_dimensions[0]
    return tuple(((w0 / w) + (h0 / h)) / 2 for w, h in l_dimensions)
