"""Assembling a region from a grid of stored tiles, for the backends that decode tiles
themselves (tifffile, zarr). Coordinates are in pixels of one level, possibly scaled by a
DCT factor; a tile the file does not store, or stores short, leaves background."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from wsi_server import codecs

Address = tuple[int, int]
DecodeMany = Callable[[list[Address]], Sequence[np.ndarray | None]]


def paint(
    region: tuple[int, int, int, int],
    level_size: tuple[int, int],
    tile_size: tuple[int, int],
    decode: DecodeMany,
    background: tuple[int, int, int],
) -> np.ndarray:
    """RGB pixels of ``region`` (x, y, w, h) of a level of ``level_size`` stored as tiles of
    ``tile_size``; ``decode`` turns a list of (col, row) into their pixels (or None)."""
    l_x, l_y, l_w, l_h = region
    tw, th = tile_size
    out = np.empty((l_h, l_w, 3), np.uint8)
    x0, y0 = max(l_x, 0), max(l_y, 0)
    x1, y1 = min(l_x + l_w, level_size[0]), min(l_y + l_h, level_size[1])
    if (x0, y0, x1, y1) != (l_x, l_y, l_x + l_w, l_y + l_h):
        codecs.fill(out, background)  # the region reaches past the level
    if x1 <= x0 or y1 <= y0:
        return out
    addresses = [
        (col, row)
        for row in range(y0 // th, (y1 - 1) // th + 1)
        for col in range(x0 // tw, (x1 - 1) // tw + 1)
    ]
    for (col, row), tile in zip(addresses, decode(addresses), strict=True):
        tx, ty = col * tw, row * th
        sx0, sy0 = max(x0, tx), max(y0, ty)
        sx1, sy1 = min(x1, tx + tw), min(y1, ty + th)
        dest = out[sy0 - l_y : sy1 - l_y, sx0 - l_x : sx1 - l_x]
        if tile is None:  # a tile the file does not store (sparse TIFF)
            codecs.fill(dest, background)
            continue
        src = tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        if src.shape != dest.shape:  # a short stored tile: pad with background
            codecs.fill(dest, background)
            dest = dest[: src.shape[0], : src.shape[1]]
        dest[...] = src
    return out


def scaled_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """Size of a level (or tile) decoded at 1/``factor`` (libjpeg rounds up)."""
    return (math.ceil(size[0] / factor), math.ceil(size[1] / factor))
