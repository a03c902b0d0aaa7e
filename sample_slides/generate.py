"""Write synthetic pyramidal slides with tifffile.

The texture is procedural and looks like H&E-stained tissue: a smooth tissue mask over a
white background, pink stroma and purple nuclei. It is a pure function of level-0
coordinates, so any level or tile can be produced on its own and large slides are written
tile by tile in bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

_BACKGROUND = np.array([243, 243, 243], np.float32)
_STROMA = np.array([232, 160, 200], np.float32)
_NUCLEUS = np.array([95, 60, 150], np.float32)


def _field(x: np.ndarray, y: np.ndarray, seed: int, scale: float) -> np.ndarray:
    """Smooth pseudo-random field in [0, 1] from a sum of sines (no global state)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros(np.broadcast(x, y).shape, np.float32)
    for _ in range(5):
        fx, fy = rng.uniform(0.5, 2.0, 2) / scale
        px, py = rng.uniform(0, 2 * math.pi, 2)
        acc += np.sin(x * fx + px) * np.cos(y * fy + py)
    return (acc / 5.0 + 1.0) / 2.0


def tissue_tile(
    l0_x: int,
    l0_y: int,
    width: int,
    height: int,
    downsample: float = 1.0,
    seed: int = 0,
    grain: float = 0.0,
) -> np.ndarray:
    """RGB pixels of the region whose top-left is level-0 ``(l0_x, l0_y)``, sampled every
    ``downsample`` level-0 pixels. ``grain`` adds pixel-scale noise of that amplitude to the
    tissue, as real stained tissue has: it makes JPEG tiles as heavy as a scanner's
    (~20 kB at q90 for 256 px instead of ~5 kB), which matters for benchmarks."""
    xs = (l0_x + (np.arange(width, dtype=np.float32) + 0.5) * downsample)[None, :]
    ys = (l0_y + (np.arange(height, dtype=np.float32) + 0.5) * downsample)[:, None]
    tissue = _field(xs, ys, seed, 900.0)
    mask = np.clip((tissue - 0.42) * 12.0, 0.0, 1.0)
    cells = _field(xs, ys, seed + 1, 5.0) + _field(xs, ys, seed + 2, 23.0) * 0.6
    nuclei = np.clip((cells - 1.05) * 6.0, 0.0, 1.0) * mask
    stain = _STROMA + (_field(xs, ys, seed + 3, 60.0)[..., None] - 0.5) * 40.0
    rgb = _BACKGROUND * (1 - mask[..., None]) + stain * mask[..., None]
    rgb = rgb * (1 - nuclei[..., None]) + _NUCLEUS * nuclei[..., None]
    if grain:
        # a hash of the level-0 coordinate: the same pixel has the same grain in any tile
        h = np.sin(xs.astype(np.float64) * 12.9898 + ys.astype(np.float64) * 78.233) * 43758.5453
        noise = (h - np.floor(h) - 0.5) * (2 * grain)
        rgb = rgb + (noise * mask)[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _tiles(
    width: int, height: int, tile: int, downsample: float, seed: int, grain: float = 0.0
) -> Iterator[np.ndarray]:
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            w, h = min(tile, width - tx), min(tile, height - ty)
            out = np.full((tile, tile, 3), 243, np.uint8)
            out[:h, :w] = tissue_tile(
                round(tx * downsample), round(ty * downsample), w, h, downsample, seed, grain
            )
            yield out


def _j2k_tiles(tiles: Iterator[np.ndarray], ycbcr: bool) -> Iterator[bytes]:
    """Encode tiles as JPEG 2000 codestreams, in YCbCr (BT.601, full range) or RGB."""
    for t in tiles:
        if ycbcr:
            f = t.astype(np.float32)
            r, g, b = f[..., 0], f[..., 1], f[..., 2]
            ycc = np.stack(
                (
                    0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
                ),
                axis=-1,
            )
            t = np.clip(np.rint(ycc), 0, 255).astype(np.uint8)
        yield bytes(imagecodecs.jpeg2k_encode(np.ascontiguousarray(t), level=0, codecformat="J2K"))


def _compression(spec: str | tuple[str, int]) -> dict[str, Any]:
    if isinstance(spec, tuple):
        return {"compression": spec[0], "compressionargs": {"level": spec[1]}}
    return {"compression": spec}


def _label(width: int = 400, height: int = 400) -> np.ndarray:
    img = np.full((height, width, 3), 250, np.uint8)
    img[40:80, 40:360] = 20  # a "barcode" bar
    img[120:140, 40:300] = 60
    return img


def write_svs_like(
    path: Path,
    width: int,
    height: int,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 4, 16),
    quality: int = 90,
    mpp: float = 0.25,
    photometric: str = "rgb",
    seed: int = 0,
    associated: bool = True,
    codec: str = "jpeg",
    grain: float = 0.0,
) -> Path:
    """An Aperio-style SVS: tiled JPEG levels (RGB-encoded like Aperio by default), a
    stripped thumbnail as the second page, then label (LZW) and macro (JPEG).

    ``codec="j2k-ycbcr"`` or ``"j2k-rgb"`` writes the levels as Aperio's JPEG 2000
    (TIFF compression 33003 with YCbCr components, or 33005 with RGB ones)."""
    mag = 40 if mpp <= 0.3 else 20
    desc0 = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} ({tile}x{tile}) JPEG/RGB "
        f"Q={quality}|AppMag = {mag}|MPP = {mpp}|ScanScope ID = SYNTHETIC|Filename = sample"
    )
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        opts: dict[str, Any] = {**_compression(("jpeg", quality)), "photometric": photometric}

        def level(ds: int, desc: str) -> None:
            lw, lh = max(1, width // ds), max(1, height // ds)
            tiles: Iterator[Any] = _tiles(
                lw, lh, tile, width / lw if ds > 1 else 1.0, seed, grain
            )
            level_opts = opts
            if codec != "jpeg":
                tiles = _j2k_tiles(tiles, ycbcr=codec == "j2k-ycbcr")
                level_opts = {
                    "compression": 33003 if codec == "j2k-ycbcr" else 33005,
                    "photometric": "rgb",
                }
            tif.write(
                tiles,
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=desc,
                metadata=None,
                **level_opts,
            )

        level(downsamples[0], desc0)
        if associated:
            scale = max(width, height) / 768
            tw, th = max(1, int(width / scale)), max(1, int(height / scale))
            tif.write(
                tissue_tile(0, 0, tw, th, width / tw, seed),
                description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {tw}x{th}",
                metadata=None,
                **opts,
            )
        for ds in downsamples[1:]:
            level(ds, f"Aperio Image Library v12.0.15 \r\n{width}x{height} ({tile}x{tile})")
        if associated:
            tif.write(
                _label(),
                compression="lzw",
                photometric="rgb",
                description="Aperio Image Library v12.0.15\r\nlabel 400x400",
                subfiletype=1,
                metadata=None,
            )
            macro = np.concatenate([_label(400, 300), tissue_tile(0, 0, 900, 300, 40.0, seed)], 1)
            tif.write(
                macro,
                description="Aperio Image Library v12.0.15\r\nmacro 1300x300",
                subfiletype=9,
                metadata=None,
                **opts,
            )
    return path


def write_generic_tiff(
    path: Path,
    width: int,
    height: int,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 2, 4),
    compression: str | tuple[str, int] = ("jpeg", 90),
    photometric: str = "ycbcr",
    mpp: float | None = 0.5,
    seed: int = 1,
) -> Path:
    """A generic tiled pyramidal TIFF (one tiled page per level, like OpenSlide's
    generic-tiff reader expects), with resolution tags when ``mpp`` is given."""
    res: dict[str, Any] = {}
    if mpp:
        res = {"resolution": (10000 / mpp, 10000 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for i, ds in enumerate(downsamples):
            lw, lh = max(1, width // ds), max(1, height // ds)
            tif.write(
                _tiles(lw, lh, tile, width / lw if ds > 1 else 1.0, seed),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric=photometric,
                **_compression(compression),
                subfiletype=1 if i else 0,
                metadata=None,
                **res,
            )
    return path


def write_samples(folder: Path) -> list[Path]:
    """The small slides the quick start serves."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_svs_like(folder / "synthetic-aperio.svs", 6000, 4000, downsamples=(1, 4, 16)),
        write_generic_tiff(folder / "synthetic-generic.tiff", 3000, 2000),
        write_generic_tiff(
            folder / "synthetic-odd-size.tiff", 1999, 1023, tile=128, downsamples=(1, 3),
            compression="zlib", photometric="rgb",
        ),
    ]
