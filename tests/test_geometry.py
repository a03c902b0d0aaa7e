"""Deep Zoom geometry against openslide-python's DeepZoomGenerator, without any file.

DeepZoomGenerator only asks its slide for dimensions, downsamples, properties and the
best level for a downsample, so a small AbstractSlide stands in for a scanner file here;
the generator under comparison is the real one.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from openslide import AbstractSlide
from openslide.deepzoom import DeepZoomGenerator

from wsi_server.geometry import (
    GeometryParams,
    Pyramid,
    deep_zoom,
    dzi_xml,
    level_downsamples,
    native_tile_size,
    thumbnail_size,
)


class ShapeOnlySlide(AbstractSlide):
    """Dimensions and properties of a slide, no pixels."""

    def __init__(self, dims: list[tuple[int, int]], props: dict[str, str] | None = None):
        self._dims = tuple(dims)
        self._downs = level_downsamples(dims)
        self._props = props or {}

    @classmethod
    def detect_format(cls, filename: Any) -> str | None:
        return None

    def close(self) -> None:
        pass

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downs

    @property
    def properties(self) -> dict[str, str]:  # type: ignore[override]
        return self._props

    @property
    def associated_images(self) -> dict[str, Any]:  # type: ignore[override]
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        for i in range(1, len(self._downs)):
            if downsample < self._downs[i]:
                return i - 1
        return len(self._downs) - 1

    def read_region(self, location: Any, level: Any, size: Any) -> Any:
        raise NotImplementedError

    def set_cache(self, cache: Any) -> None:
        pass


def _pyramid(slide: ShapeOnlySlide, bounds: tuple[int, int, int, int] | None) -> Pyramid:
    return Pyramid(slide.level_dimensions, slide.level_downsamples, bounds)


def _levels(w: int, h: int, factors: list[int]) -> list[tuple[int, int]]:
    return [(max(1, w // f), max(1, h // f)) for f in factors]


def _shapes() -> list[tuple[list[tuple[int, int]], tuple[int, int, int, int] | None]]:
    rng = random.Random(7)
    shapes: list[tuple[list[tuple[int, int]], tuple[int, int, int, int] | None]] = [
        ([(1, 1)], None),
        ([(1, 5000)], None),
        ([(5000, 1)], None),
        ([(2, 3)], None),
        ([(255, 255)], None),
        ([(256, 256)], None),
        ([(257, 511)], None),
        (_levels(100_000, 80_000, [1, 4, 16, 64]), None),
        (_levels(100_001, 3, [1, 2]), None),
        (_levels(46000, 32914, [1, 4, 16, 32]), None),
        ([(3968, 4864), (1984, 2432), (992, 1216), (496, 608)], None),
        (_levels(1999, 1023, [1, 3]), None),
        (_levels(24000, 18000, [1, 4, 16]), (1234, 567, 20000, 15001)),
        (_levels(9999, 7777, [1, 2, 8]), (0, 0, 9999, 7777)),
        (_levels(9999, 7777, [1, 2, 8]), (3, 5, 17, 4000)),
    ]
    for _ in range(25):
        w, h = rng.randint(1, 60_000), rng.randint(1, 60_000)
        factors = sorted({1, *rng.sample([2, 3, 4, 8, 16, 32], rng.randint(0, 4))})
        bounds = None
        if rng.random() < 0.4:
            bx, by = rng.randint(0, w - 1), rng.randint(0, h - 1)
            bounds = (bx, by, rng.randint(1, w - bx), rng.randint(1, h - by))
        shapes.append((_levels(w, h, factors), bounds))
    return shapes


SHAPES = _shapes()
PARAMS = [(254, 1), (256, 0), (240, 0), (510, 1), (1, 0), (7, 3), (1024, 0)]


def _bounds_props(bounds: tuple[int, int, int, int] | None) -> dict[str, str]:
    if bounds is None:
        return {}
    keys = ("x", "y", "width", "height")
    return {f"openslide.bounds-{k}": str(v) for k, v in zip(keys, bounds, strict=True)}


def _sample_addresses(
    t_dims: tuple[int, int], rng: random.Random, n: int = 12
) -> list[tuple[int, int]]:
    cols, rows = t_dims
    corners = {(0, 0), (cols - 1, 0), (0, rows - 1), (cols - 1, rows - 1)}
    picks = {(rng.randrange(cols), rng.randrange(rows)) for _ in range(n)}
    return sorted(corners | picks)


# 1-px tiles only on small slides: on large ones that is millions of tiles per level.
CASES = [
    (i, tile, overlap)
    for i, (dims, _) in enumerate(SHAPES)
    for tile, overlap in PARAMS
    if tile > 1 or dims[0][0] * dims[0][1] <= 10**6
]


@pytest.mark.parametrize(("shape_index", "tile", "overlap"), CASES)
@pytest.mark.parametrize("limit_bounds", [False, True])
def test_geometry_matches_deepzoomgenerator(
    shape_index: int, tile: int, overlap: int, limit_bounds: bool
) -> None:
    dims, bounds = SHAPES[shape_index]
    slide = ShapeOnlySlide(dims, _bounds_props(bounds))
    ref = DeepZoomGenerator(slide, tile, overlap, limit_bounds)
    ours = deep_zoom(_pyramid(slide, bounds), GeometryParams(tile, overlap, limit_bounds))

    assert ours.level_count == ref.level_count
    assert ours.z_dimensions == ref.level_dimensions
    assert ours.t_dimensions == ref.level_tiles
    rng = random.Random(shape_index * 1000 + tile)
    for level in range(ref.level_count):
        for col, row in _sample_addresses(ref.level_tiles[level], rng):
            region = ours.tile_region(level, col, row)
            l0_loc, slide_level, l_size = ref.get_tile_coordinates(level, (col, row))
            assert region.l0_location == l0_loc
            assert region.slide_level == slide_level
            assert region.l_size == l_size
            assert region.z_size == ref.get_tile_dimensions(level, (col, row))


@pytest.mark.parametrize(
    ("level", "address"), [(-1, (0, 0)), (99, (0, 0)), (5, (-1, 0)), (5, (0, 10**6))]
)
def test_out_of_grid_is_refused_like_deepzoomgenerator(
    level: int, address: tuple[int, int]
) -> None:
    slide = ShapeOnlySlide(_levels(5000, 4000, [1, 4]))
    ref = DeepZoomGenerator(slide)
    ours = deep_zoom(_pyramid(slide, None), GeometryParams())
    with pytest.raises(ValueError):
        ref.get_tile_coordinates(level, address)
    assert not ours.contains(level, *address)
    with pytest.raises(ValueError):
        ours.tile_region(level, *address)


def test_dzi_is_byte_identical() -> None:
    slide = ShapeOnlySlide(_levels(24000, 18000, [1, 4, 16]))
    for tile, overlap in PARAMS:
        ref = DeepZoomGenerator(slide, tile, overlap)
        ours = deep_zoom(_pyramid(slide, None), GeometryParams(tile, overlap))
        for fmt in ("jpeg", "png"):
            assert dzi_xml(ours, fmt) == ref.get_dzi(fmt)


def test_thumbnail_size_follows_pillow() -> None:
    from PIL import Image

    rng = random.Random(3)
    for _ in range(300):
        src = (rng.randint(1, 700), rng.randint(1, 700))
        box = (rng.randint(1, 600), rng.randint(1, 600))
        img = Image.new("L", src)
        img.thumbnail(box)
        assert thumbnail_size(src, box) == img.size, (src, box)


def test_level_downsamples_mean_of_axes() -> None:
    ds = level_downsamples([(46000, 32914), (11500, 8228)])
    assert ds[0] == 1.0
    assert math.isclose(ds[1], (46000 / 11500 + 32914 / 8228) / 2)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [((240, 240), 240), ((256, 256), 256), ((3968, 8), 256), (None, 256), ((64, 64), 256),
     ((2048, 2048), 2048), ((4096, 4096), 256), ((512, 256), 256)],
)
def test_native_tile_size(stored: tuple[int, int] | None, expected: int) -> None:
    assert native_tile_size(stored) == expected
